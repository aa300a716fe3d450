"""Fields of the signed status report that both sides must agree on: the device writes them
(``modelward.agent._status``), the operator's fleet view checks them
(``modelward.publisher._report_schema``). Constants only, so the idle daemon imports nothing.
"""

COUNTERS = ("attempts", "installed", "failures", "fallbacks", "bytes_fetched",
            "signature_failures", "verification_failures")
MAX_TEXT = 4096  # characters of a message kept (the signed report copies it)
