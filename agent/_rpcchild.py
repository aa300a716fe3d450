"""One operator request answered in its own process:
``python -I -m modelward.agent._rpcchild CONFIG`` (the request on stdin, as
:func:`modelward.updater.transport._rpc.parse_request` reads it).

Prints the answer document as one line of JSON and exits 0; exits 1 with a one-line
diagnosis on stderr when it cannot. The daemon (``modelward.agent._rpc``) bounds what it
reads back. ``attest`` is ``modelward.trust._measure.attest_answer`` over the device's
TPM, ``audit`` is ``modelward.trust._audit.audit_chunk``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TSS2_LOG", "all+NONE")

#: kind -> (module, function) answering it.
HANDLERS = {"attest": ("modelward.trust._measure", "attest_answer"),
            "audit": ("modelward.trust._audit", "audit_chunk")}


def answer(config_path: Path, payload: bytes) -> dict[str, Any]:
    """The answer document for the request ``payload``.

    Raises:
        ModelwardError: a malformed request, no such support on this device, or what the
            TPM or the state directory raised.
    """
    from modelward.agent._config import load_config
    from modelward.trust.errors import LocalDeviceError
    from modelward.updater.transport._rpc import MAX_REQUEST, parse_request

    cfg = load_config(config_path)
    req = parse_request(payload[:MAX_REQUEST + 1], "the request")
    module, name = HANDLERS[req.kind]
    try:  # (by name: steps 2a/2b of issue 18 build these modules)
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise LocalDeviceError(f"this device's modelward has no {req.kind} support") from e
    if req.kind == "audit":
        return dict(fn(cfg.state_dir, req.offset, req.limit, old=req.segment == "old"))
    from modelward.trust._tpm import Tpm
    from modelward.trust._tpmauth import auth_dir_for

    tpm = Tpm(cfg.tcti)
    try:
        tpm.use_auth_dir(auth_dir_for(cfg.state_dir))
        return dict(fn(tpm, cfg.state_dir, req.nonce, cfg.device_id))
    finally:
        tpm.close()


def main(argv: list[str]) -> int:
    """Entry point; ``argv`` is ``[config_path]``."""
    from modelward.trust.errors import ModelwardError

    if len(argv) != 1:
        print("usage: python -m modelward.agent._rpcchild CONFIG", file=sys.stderr)
        return 2
    try:
        doc = answer(Path(argv[0]), sys.stdin.buffer.read(4096))
    except (ModelwardError, OSError) as e:  # (a diagnosis line, never a traceback)
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
