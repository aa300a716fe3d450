"""One update attempt: the TUF session, staging, slots, journal, the health check
(and its sandboxed child), healing, and the boot check.
"""
