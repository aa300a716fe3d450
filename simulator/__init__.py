"""Tester tooling: swtpm lifecycle, test PKI, nginx HTTPS origin, model factory, demo.

Import from the concrete modules (``modelward.simulator._x``); this package exports nothing, so a
process loads only the modules it uses.
"""
