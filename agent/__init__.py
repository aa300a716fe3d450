"""The device agent: configuration, commands, logging.

Import from the concrete modules (``modelward.agent._x``); this package exports nothing, so a
process loads only the modules it uses.
"""
