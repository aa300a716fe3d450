"""The bundle format, pure and fuzzed: manifest, tar reader, semver, the signed
custom fields of a TUF target.
"""
