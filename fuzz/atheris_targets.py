"""Coverage-guided fuzz targets (atheris/libFuzzer), run on demand, not in CI.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python fuzz/atheris_targets.py TARGET [libFuzzer flags, e.g. -runs=1000000]

TARGET is one of: manifest, tar, mqtt-block, announcement, report, config. Each target
feeds the bytes to one parser of untrusted or operator input; anything other than success
or that parser's own typed error is a crash, and libFuzzer saves the input as
``crash-<sha1>``. The same parsers run under hypothesis in CI (tests/fuzz/).
"""

from __future__ import annotations

import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports():
    from tests.fuzz import targets

_DIR = Path(tempfile.mkdtemp(prefix="modelward-fuzz-"))


def mqtt_block(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    corr = targets.SESSION + struct.pack(">Q", fdp.ConsumeIntInRange(0, 256)) \
        if fdp.ConsumeBool() else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
    props = [(fdp.PickValueInList(["status", "offset", "size", "x"]),
              fdp.ConsumeUnicodeNoSurrogates(8)) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    total = fdp.ConsumeIntInRange(0, 300) if fdp.ConsumeBool() else None
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    targets.mqtt_block(corr, props, payload, {0, 64, 128}, total)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": targets.manifest, "tar": targets.tar, "mqtt-block": mqtt_block,
    "announcement": targets.announcement, "report": targets.report,
    "config": lambda data: targets.config(_DIR / "agent.toml", data),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
