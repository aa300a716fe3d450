"""Fields of the signed status report that both sides must agree on: the device writes them
(``modelward.agent._status``), the operator's fleet view checks them
(``modelward.publisher._report_schema``). Constants only, so the idle daemon imports nothing.
"""

COUNTERS = ("attempts", "installed", "failures", "fallbacks", "bytes_fetched",
            "signature_failures", "verification_failures")
MAX_TEXT = 4096  # characters of a message kept (the signed report copies it)

#: ``failure_reasons``: failed update attempts by the error's type name. At most
#: MAX_REASONS keys (a device's own map, and the operator's sum over the fleet, stay
#: bounded); a new reason once the map is full counts under OTHER_REASON.
MAX_REASONS = 16
OTHER_REASON = "other"
#: a reason is an identifier (a Python class name): letters, digits, "_", at most 64
REASON_MAX_LEN = 64
REASON_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")

#: ``durations``: seconds, measured on the device where the work happens. ``verify_s``:
#: download and verification (hash, extraction, fingerprint, health check) of the last
#: install attempt that passed its health check; ``boot_check_s``: the last boot-check.
DURATIONS = ("verify_s", "boot_check_s")
MAX_DURATION = 10**6  # s (11.6 days): anything longer is not a measurement
#: the duration histograms' upper bounds (s), for edge devices: a boot-check of a small
#: model takes tens of ms, a download and verification on a slow link minutes. The
#: device's own histograms and the fleet summary's (one sample per device) share them.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

#: ``rejected``: the releases this device refused and still refuses (its remembered
#: rejections in force: a failed health check, a malformed bundle, a fingerprint that
#: differs from the signed one), newest first, at most MAX_REJECTED ``{model, version}``.
#: A device that rejected a release goes back to ``ok`` on its old model at its next
#: attempt; this list is what keeps it ``failed`` for that release in the fleet view.
MAX_REJECTED = 8
MAX_REJECTED_TEXT = 256  # characters of a model name or version in it

#: ``last_error.type`` of a boot-check that fell back to the previous model (kept until the
#: next successful attempt clears it): the fleet view's ``fell back`` state.
FALLBACK_ERROR = "ActiveModelAltered"


def is_reason(name: object) -> bool:
    """Whether ``name`` may be a key of ``failure_reasons``."""
    return (isinstance(name, str) and 0 < len(name) <= REASON_MAX_LEN
            and not name[0].isdigit() and all(c in REASON_CHARS for c in name))
