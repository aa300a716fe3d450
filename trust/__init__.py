"""Device trust: TPM access, trust record, root anchor and the model fingerprint.

Import from the concrete modules (``modelward.trust._x``); this package exports nothing, so a
process loads only the modules it uses.
"""
