"""Attack a19 on issue 17 (the device's disk): a status.json whose histogram ``sum`` (or
``verify_s``, ``last_success``) is a JSON integer too large for a float.

Tried: ``"sum": 999...9`` (400 digits: a valid JSON number, 0.4 kB, well inside
MAX_STATUS_BYTES; Python's json reads it as an int) in
``histograms.boot_check_duration_seconds``, read back by ``StatusFile.read`` with the TPM
(the path of every ``agent update``) and without (``read_status``: the idle daemon's
STATUS= line, ``agent status --no-tpm``).

What happened: ``OverflowError: int too large to convert to float`` escapes both reads; with
the TPM it is raised before the MAC is even checked, so a file nobody believes makes
``agent update`` end in an untyped error (not a ModelwardError: not counted, not reported)
until someone deletes the file. Planting it needs only write access to the state
directory: no MAC key.

Cause: ``agent._status._finite`` calls ``math.isfinite(v)`` on any ``int``, which converts
it to a float; ``clean_status`` runs it on the unverified document (``status_digest`` cleans
before the MAC comparison), and ``StatusFile.read`` catches only OSError and ValueError.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path

from modelward.agent._commands import StatusFile
from modelward.agent._status import BUCKETS, read_status

HUGE = int("9" * 400)


class StubTpm:
    counter = 3
    key = b"k" * 32

    def read_counter(self) -> int:
        return self.counter

    def mac(self, digest: bytes) -> bytes:
        return hmac.new(self.key, digest, "sha256").digest()

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        return hmac.compare_digest(self.mac(digest), mac)


def _plant(state: Path) -> bytes:
    doc = {"counters": {"attempts": 4},
           "histograms": {"boot_check_duration_seconds": {
               "counts": [0] * (len(BUCKETS) + 1), "sum": HUGE}},
           "auth": {"counter": StubTpm.counter, "mac": "00" * 32}}
    data = json.dumps(doc).encode()
    (state / "status.json").write_bytes(data)
    return data


def test_planted_huge_sum_is_not_believed_with_the_tpm(tmp_path: Path) -> None:
    data = _plant(tmp_path)
    assert StatusFile(tmp_path).read(StubTpm()) == {}  # type: ignore[arg-type]
    assert (tmp_path / "status.json").read_bytes() == data  # (read-only: left as found)


def test_planted_huge_sum_is_dropped_without_the_tpm(tmp_path: Path) -> None:
    data = _plant(tmp_path)
    got = read_status(tmp_path / "status.json")
    assert "histograms" not in got and got["counters"] == {"attempts": 4}
    assert (tmp_path / "status.json").read_bytes() == data
