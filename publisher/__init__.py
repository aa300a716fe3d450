"""Operator tooling: repository, keys, bundle writer, publishing.

Import from the concrete modules (``modelward.publisher._x``); this package exports nothing, so a
process loads only the modules it uses.
"""
