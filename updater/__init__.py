"""Getting and installing model bundles: TUF session, fetchers, bundle reader, slots, health.

Import from the concrete modules (``modelward.updater._x``); this package exports nothing, so a
process loads only the modules it uses.
"""
