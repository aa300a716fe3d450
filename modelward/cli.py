"""The ``modelward`` command line: one entry point, subcommands grouped by user.

Exit codes:
  0  success (``agent update``: installed, or nothing to do)
  1  a modelward error: the one-line diagnosis says what is at fault and a hint
  2  usage error
  3  ``agent boot-check``: no trusted model is left; do not start inference
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from modelward import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOTHING_TRUSTED = 0, 1, 2, 3
PASSPHRASE_ENV = "MODELWARD_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret


def _passphrase(confirm: bool) -> bytes:
    from trust.errors import OperatorInputError

    value = os.environ.get(PASSPHRASE_ENV)
    if value is not None:
        if not value:
            raise OperatorInputError(f"{PASSPHRASE_ENV} is empty")
        return value.encode()
    if not sys.stdin.isatty():
        raise OperatorInputError(
            "no key passphrase: set MODELWARD_KEY_PASSPHRASE or run on a terminal"
        )
    first = getpass.getpass("key passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise OperatorInputError("the passphrases differ")
    if not first:
        raise OperatorInputError("an empty passphrase is not allowed")
    return first.encode()


# --- operator ---------------------------------------------------------------


def _repo_init(args: argparse.Namespace) -> int:
    from publisher import Repository

    repo = Repository(args.repo, args.keys, _passphrase(confirm=True))
    root = repo.init()
    print(f"created TUF repository in {args.repo} (keys in {args.keys})")
    print(f"provision devices with {root}")
    return EXIT_OK


def _bundle_build(args: argparse.Namespace) -> int:
    from publisher import BuildOptions, build_bundle
    from trust.errors import OperatorInputError

    extra = []
    for spec in args.extra or []:
        src, sep, arc = spec.partition(":")
        if not sep:
            raise OperatorInputError(f"--extra {spec!r}: expected SRC:PATH_IN_BUNDLE")
        extra.append((Path(src), arc))
    m = build_bundle(
        args.model, args.name, args.version, args.output, vectors=args.vectors, extra=extra,
        options=BuildOptions(rtol=args.rtol, atol=args.atol, seed=args.seed),
    )
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {m.name} {m.version}, {len(m.files)} files, {size} bytes")
    return EXIT_OK


def _publish(args: argparse.Namespace) -> int:
    from publisher import Repository

    repo = Repository(args.repo, args.keys, _passphrase(confirm=False))
    r = repo.publish(args.bundle)
    print(f"published {r.name} {r.version} as {r.target_path} ({r.length} bytes)")
    print(f"fingerprint {r.fingerprint}; targets v{r.targets_version}, "
          f"timestamp v{r.timestamp_version}")
    return EXIT_OK


# --- device -----------------------------------------------------------------


def _agent_provision(args: argparse.Namespace) -> int:
    from agent import load_config, provision

    cfg = load_config(args.config)
    rep = provision(cfg, args.root)

    def word(created: bool) -> str:
        return "created" if created else "already present"

    print(f"TPM at {cfg.tcti} provisioned for {cfg.device_id}:")
    print(f"  storage root key 0x81000001: {word(rep.srk_created)}")
    print(f"  identity key     0x81000101: {word(rep.identity_created)}")
    print(f"  root anchor      0x01000100: {word(rep.anchor_defined)}")
    print(f"  update counter   0x01000110: {word(rep.counter_defined)}")
    return EXIT_OK


def _agent_update(args: argparse.Namespace) -> int:
    from agent import load_config, update

    result = update(load_config(args.config))
    print(result.message)
    return EXIT_OK


def _agent_status(args: argparse.Namespace) -> int:
    from agent import load_config, status

    doc = status(load_config(args.config))
    if args.json:
        print(json.dumps(doc))
        return EXIT_OK
    for key in ("active", "previous"):
        m = doc[key]
        print(f"{key:9} " + (f"{m['name']} {m['version']}  {m['fingerprint']}" if m else "none"))
    err = doc["last_error"]
    print("last error " + (f"{err['type']}: {err['message']} ({err['at']})" if err else "none"))
    return EXIT_OK


def _agent_boot_check(args: argparse.Namespace) -> int:
    from agent import load_config, run_boot_check
    from updater.errors import NothingTrustedError

    try:
        result = run_boot_check(load_config(args.config))
    except NothingTrustedError as e:
        print(f"modelward: boot check: {e}", file=sys.stderr)
        return EXIT_NOTHING_TRUSTED
    print(result.message)
    return EXIT_OK


# --- tester -----------------------------------------------------------------


def _sim_tpm_start(args: argparse.Namespace) -> int:
    from simulator import start_swtpm

    h = start_swtpm(args.state, args.port)
    print(h.tcti)
    return EXIT_OK


def _sim_tpm_stop(args: argparse.Namespace) -> int:
    from simulator import stop_swtpm

    print("stopped" if stop_swtpm(args.state) else "not running")
    return EXIT_OK


def _sim_demo(args: argparse.Namespace) -> int:
    from simulator import run_demo

    return run_demo(args.dir)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(
        prog="modelward",
        description="Over-the-air updates of ML models, verified with TUF and a TPM.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"modelward {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (repeatable)")
    sub = p.add_subparsers(dest="group", required=True, metavar="COMMAND")

    repo = sub.add_parser("repo", help="operator: manage the TUF repository")
    rsub = repo.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    r = rsub.add_parser("init", help="create keys and a new repository")
    r.add_argument("--repo", type=Path, required=True,
                   help="served directory (metadata/, targets/)")
    r.add_argument("--keys", type=Path, required=True, help="key directory, outside --repo")
    r.set_defaults(func=_repo_init)

    bundle = sub.add_parser("bundle", help="operator: build model bundles")
    bsub = bundle.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    b = bsub.add_parser("build", help="write a v1 bundle from an ONNX model")
    b.add_argument("model", type=Path, help="the .onnx file")
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True, help="semantic version")
    b.add_argument("--vectors", type=Path,
                   help=".npz with input:<name>/output:<name> arrays; "
                   "generated with onnxruntime if absent")
    b.add_argument("--extra", action="append", metavar="SRC:PATH", help="add a file (repeatable)")
    b.add_argument("--rtol", type=float, default=1e-4)
    b.add_argument("--atol", type=float, default=1e-5)
    b.add_argument("--seed", type=int, default=0, help="seed of generated test inputs")
    b.add_argument("-o", "--output", type=Path, required=True)
    b.set_defaults(func=_bundle_build)

    pub = sub.add_parser("publish", help="operator: sign and publish a bundle")
    pub.add_argument("--repo", type=Path, required=True)
    pub.add_argument("--keys", type=Path, required=True)
    pub.add_argument("bundle", type=Path)
    pub.set_defaults(func=_publish)

    agent = sub.add_parser("agent", help="device: provision, update, status, boot check")
    asub = agent.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    a = asub.add_parser("provision", help="create the TPM trust store and anchor the root")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--root", type=Path, required=True, help="the repository's root.json")
    a.set_defaults(func=_agent_provision)
    a = asub.add_parser("update", help="check for a newer model and install it")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--once", action="store_true",
                   help="one attempt, then exit (what this command always does)")
    a.set_defaults(func=_agent_update)
    a = asub.add_parser("status", help="show the active and previous model and the last error")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--json", action="store_true", help="one JSON object")
    a.set_defaults(func=_agent_status)
    a = asub.add_parser("boot-check", help="verify the active model at boot, else fall back")
    a.add_argument("--config", type=Path, required=True)
    a.set_defaults(func=_agent_boot_check)

    sim = sub.add_parser("sim", help="tester: simulated TPMs and the end-to-end demo")
    ssub = sim.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    tpm = ssub.add_parser("tpm", help="software TPM (swtpm)")
    tsub = tpm.add_subparsers(dest="tpm_cmd", required=True, metavar="ACTION")
    t = tsub.add_parser("start", help="manufacture (first time) and start; prints the TCTI")
    t.add_argument("--state", type=Path, required=True)
    t.add_argument("--port", type=int, help="server port (control port is +1)")
    t.set_defaults(func=_sim_tpm_start)
    t = tsub.add_parser("stop", help="stop by pid")
    t.add_argument("--state", type=Path, required=True)
    t.set_defaults(func=_sim_tpm_stop)
    d = ssub.add_parser("demo", help="the end-to-end demo on loopback (swtpm + nginx)")
    d.add_argument("--dir", type=Path, default=Path("demo-run"), help="work directory")
    d.set_defaults(func=_sim_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    # The TSS libraries print their own warnings to stderr; our errors say it better.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    args = build_parser().parse_args(argv)
    from agent import setup_logging
    from trust.errors import ModelwardError

    setup_logging(args.verbose + (1 if args.group == "agent" else 0),
                  json_lines=args.group == "agent")
    try:
        return int(args.func(args))
    except ModelwardError as e:
        print(f"modelward: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
