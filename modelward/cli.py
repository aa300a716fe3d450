"""The ``modelward`` command line: one entry point, subcommands grouped by user.

Exit codes:
  0  success (``agent update``: installed, or nothing to do)
  1  a modelward error: one line says what is at fault, with a hint
  2  usage error (one line naming the argument)
  3  ``agent boot-check``: no trusted model is left; do not start inference
  70 an internal error, a bug: one line; its traceback with --debug (under journald, in
     the JSON record)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from modelward import __version__

if TYPE_CHECKING:  # (argparse: imported where a parser is built; not by `agent boot-check`)
    import argparse

    from modelward.agent._config import AgentConfig
    from modelward.publisher._passphrases import PassphraseProvider
    from modelward.publisher._repo import Repository
    from modelward.updater._config import MqttConfig

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOTHING_TRUSTED, EXIT_BUG = 0, 1, 2, 3, 70
EXIT_BUSY = 75  # EX_TEMPFAIL: another device command holds the device lock (agent/_lock.py)
PASSPHRASE_ENV = "MODELWARD_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
HSM_PIN_ENV = "MODELWARD_HSM_PIN"


def _secrets(what: str) -> str:
    """securesystemslib's secret prompts: the HSM PIN from the environment or a prompt."""
    value = os.environ.get(HSM_PIN_ENV) if what == "pin" else None
    if value is None:
        import getpass

        value = getpass.getpass(f"{what}: ")
    return value


def _repository(args: argparse.Namespace, confirm: bool = False) -> Repository:
    from modelward._inputs import existing_dir
    from modelward.publisher._online import ONLINE_DIR_ENV, attach, env_passphrases
    from modelward.publisher._repo import Repository

    # envvar: key URIs name variables of this environment, read here at the entry point.
    keys: Path = args.keys
    if not confirm:  # (only `repo init` makes them)
        existing_dir("--repo", args.repo)
        existing_dir("--keys", keys)

    def new_key(role: str) -> bool:  # a prompted passphrase for a new key file: ask twice
        return confirm or not any((keys / n).exists() for n in (f"{role}.pem",
                                                                 f"delegated-{role}.pem"))

    passphrase = _passphrase(confirm=new_key)
    repo = Repository(args.repo, args.keys, passphrase, secrets=_secrets,
                      environ=dict(os.environ))
    online = getattr(args, "online_dir", None) or os.environ.get(ONLINE_DIR_ENV)
    return attach(repo, Path(online) if online else None,
                  env_passphrases(os.environ, passphrase), _secrets, os.environ)


def _role_numbers(pairs: list[str] | None, flag: str) -> dict[str, int]:
    from modelward.trust.errors import OperatorInputError

    out = {}
    for pair in pairs or []:
        role, sep, n = pair.partition("=")
        if not sep or not n.isdigit():
            raise OperatorInputError(f"{flag} {pair!r}: expected ROLE=N")
        out[role] = int(n)
    return out


def _passphrase(confirm: bool | Callable[[str], bool], *, new: bool = False,
                fallback: PassphraseProvider | None = None) -> PassphraseProvider:
    """Passphrases per role: MODELWARD_KEY_PASSPHRASE_<ROLE>, MODELWARD_KEY_PASSPHRASE, or a
    prompt per role on a terminal (``new``: ``repo rekey``'s MODELWARD_NEW_KEY_PASSPHRASE*)."""
    import getpass

    from modelward.publisher._passphrases import NEW_PASSPHRASE_ENV, EnvPassphrases

    prompt = getpass.getpass if sys.stdin.isatty() else None
    if new:  # prompted only for `repo rekey --new-passphrase`, else the variables or fallback
        prompt = prompt if fallback is None else None
        return EnvPassphrases(os.environ, prompt, confirm=True, prefix=NEW_PASSPHRASE_ENV,
                              fallback=fallback, what="new passphrase")
    return EnvPassphrases(os.environ, prompt, confirm=confirm, prefix=PASSPHRASE_ENV)


# --- operator ---------------------------------------------------------------


@contextlib.contextmanager
def _progress(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal; silence otherwise (logs, CI, pipes), and where
    rich (of [operator]) is not installed: the online host's `publish`."""
    from modelward._extras import installed

    if not sys.stderr.isatty() or not installed("rich"):
        yield lambda _n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def _repo_init(args: argparse.Namespace) -> int:
    from modelward.publisher._expiry import parse_assignments, save_expiry

    lifetimes = parse_assignments(args.expiry or [], "--expiry")
    repo = _repository(args, confirm=True)
    repo.expiry = repo.expiry.changed(lifetimes)
    root = repo.init(_role_numbers(args.threshold, "--threshold"),
                     _role_numbers(args.keys_per_role, "--keys-per-role"))
    if lifetimes:
        save_expiry(args.keys, repo.expiry)
    print(f"created TUF repository in {args.repo} (keys in {args.keys})")
    if args.online_dir:
        print(f"snapshot and timestamp keys in {args.online_dir}: move that directory to the "
              "online host (README \"Production layout\"); keep the key directory offline")
    print(f"provision devices with {root}")
    print(_OFFLINE_ADVICE)
    return EXIT_OK


_OFFLINE_ADVICE = """\
Keep the root and targets keys offline: they decide what every device trusts.
  - best: an HSM (`repo add-key ROLE --hsm-keyid N`), or
  - move KEYS/root*.pem and KEYS/targets*.pem to a separate machine that is not on the
    network, and sign there (`repo sign`, `publish`, `rotate`, `delegate`);
  - the online host that runs `repo refresh` needs only snapshot and timestamp keys.
Give each role its own passphrase (12 characters at least): MODELWARD_KEY_PASSPHRASE_ROOT,
_TARGETS, _SNAPSHOT, _TIMESTAMP and _<TEAM> for a delegated team, falling back to
MODELWARD_KEY_PASSPHRASE (or one prompt per role on a terminal). Older key files are
upgraded to scrypt with `repo rekey`."""


def _repo_rekey(args: argparse.Namespace) -> int:
    from modelward._inputs import existing_dir
    from modelward.publisher._rekey import rekey
    from modelward.trust.errors import OperatorInputError

    existing_dir("--keys", args.keys)
    current = _passphrase(confirm=False)
    if args.new_passphrase and not sys.stdin.isatty():
        raise OperatorInputError("--new-passphrase prompts on a terminal; without one set "
                                 "MODELWARD_NEW_KEY_PASSPHRASE[_<ROLE>]")
    new = _passphrase(False, new=True, fallback=None if args.new_passphrase else current)
    steps = rekey(args.keys, current, new, set(args.roles) if args.roles else None)
    for step in steps:
        after = f"scrypt N={step.params.n} r={step.params.r} p={step.params.p}" \
            if step.params else "unchanged"
        print(f"{step.path.relative_to(args.keys)} ({step.role}): {step.before.describe()} "
              f"-> {step.action} ({after})")
    if not steps:
        print(f"no key files to rekey in {args.keys}")
    return EXIT_OK


def _rollout(args: argparse.Namespace) -> int:
    from modelward.trust.errors import OperatorInputError

    repo = _repository(args)
    if args.action == "set":
        if args.percent is None and not args.halt and not args.resume:
            raise OperatorInputError("rollout set needs --percent, --halt or --resume")
        v = repo.set_rollout(args.name, args.version, percent=args.percent,
                             halted=True if args.halt else (False if args.resume else None))
        what = "halted" if args.halt else f"at {args.percent}%" if args.percent is not None \
            else "resumed"
        print(f"{args.name} {args.version} {what}; targets v{v}")
    elif args.action == "pin":
        v = repo.pin(args.name, args.version)
        print(f"{args.name} pinned to {args.version}; targets v{v}")
    elif args.action == "withdraw":
        v = repo.withdraw(args.name, args.version)
        print(f"{args.name} {args.version} withdrawn; targets v{v}")
    else:
        v = repo.pin(args.name, None)
        print(f"{args.name} unpinned; targets v{v}")
    return EXIT_OK


def _repo_delegate(args: argparse.Namespace) -> int:
    key = _repository(args).delegate(args.name, args.paths, parent=args.parent,
                                     terminating=not args.non_terminating)
    print(f"delegated {', '.join(args.paths)} to role {args.name!r} (by {args.parent!r}); "
          f"its key: {key}")
    return EXIT_OK


def _repo_sign(args: argparse.Namespace) -> int:
    from modelward.trust.errors import OperatorInputError

    repo = _repository(args)
    pending, lines = repo.review_pending(args.role)  # refuses a file edited after signing
    print(f"pending {pending.path} (sha256 {pending.digest[:16]}), compared with what is "
          "published:")
    print("\n".join(lines), flush=True)
    if not args.yes:
        if not sys.stdin.isatty():
            raise OperatorInputError("not signed: no terminal to confirm on",
                                     hint="read the summary above, then pass --yes to sign it")
        try:
            answer = input(f"sign this {args.role} metadata with {args.key}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise OperatorInputError("not signed: the signer did not confirm")
    have, need = repo.sign_pending(args.role, args.key, reviewed=pending.digest)
    print(f"{args.role}: {have} of {need} signatures; published")
    return EXIT_OK


def _repo_add_key(args: argparse.Namespace) -> int:
    from modelward.trust.errors import OperatorInputError

    repo = _repository(args)
    if args.hsm_keyid is not None:
        from securesystemslib.signer import HSMSigner

        try:
            uri, key = HSMSigner.import_(hsm_keyid=args.hsm_keyid, token_label=args.token_label,
                                         secrets_handler=_secrets)
        except (ValueError, OSError) as e:
            raise OperatorInputError(f"cannot read key {args.hsm_keyid} from the HSM: {e}",
                                     hint="set PYKCS11LIB to the PKCS#11 module") from e
    elif args.uri and args.public_key:
        from modelward._inputs import read_file
        from modelward.publisher._keys import public_key_from_pem
        from modelward.publisher.errors import KeyError_

        pem = read_file("--public-key", args.public_key)
        try:
            uri, key = args.uri, public_key_from_pem(pem)
        except KeyError_ as e:
            raise KeyError_(f"--public-key {args.public_key}: {e}", path=str(args.public_key),
                            hint="give the PEM public key of the --uri key") from e
    else:
        raise OperatorInputError("repo add-key needs --hsm-keyid, or --uri with --public-key")
    v = repo.add_key(args.role, uri, key, threshold=args.threshold)
    from modelward.publisher._rootstage import outcome

    print(f"added {uri} ({key.keyid[:16]}) to {args.role}; {outcome(repo, v)}")
    return EXIT_OK


def _repo_policy_set(args: argparse.Namespace) -> int:
    from modelward._inputs import read_file
    from modelward.publisher._policy import set_policy
    from modelward.publisher._rootstage import outcome

    repo = _repository(args)
    v, sha256 = set_policy(repo, read_file("POLICY", args.policy, 1 << 18),
                           args.policy.parent)
    print(f"provenance policy {sha256[:16]} pinned by root v{v}; {outcome(repo, v)}")
    return EXIT_OK


def _repo_policy_show(args: argparse.Namespace) -> int:
    from modelward.publisher._policy import published_policy
    from modelward.trust._display import escape

    found = published_policy(_repository(args))
    if found is None:
        if args.json:
            print(json.dumps({"policy": None}))
        else:
            print("no provenance policy: devices install models without a model signature")
        return EXIT_OK
    policy, sha256 = found
    if args.json:
        print(json.dumps({"sha256": sha256, "policy": json.loads(policy.to_bytes())},
                         indent=1))
        return EXIT_OK
    from modelward.updater.bundle._provenance import BIND_DIGEST, DIGEST_BIND_RISK

    print(f"provenance policy {sha256} (pinned by root)")
    for rule in policy.rules:
        print(f"rule {escape(rule.name, 128)}: models {escape(', '.join(rule.models), 512)}")
        if rule.bind == BIND_DIGEST:
            print(f"  UNSAFE: it {DIGEST_BIND_RISK}")
        for signer in rule.signers:
            if signer.public_key:
                what = "EC public key"
            else:
                what = f"certificate for {escape(signer.identity, 256)}"
            print(f"  signer {escape(signer.name, 128)}: {what}")
    for r in policy.revoked:
        print(f"revoked model file sha256 {r.sha256}"
              + (f": {escape(r.note, 256)}" if r.note else ""))
    return EXIT_OK


def _repo_rotate(args: argparse.Namespace) -> int:

    repo = _repository(args)
    v = repo.rotate(args.role)
    from modelward.publisher._rootstage import outcome

    print(f"rotated the {args.role} key; {outcome(repo, v)}")
    return EXIT_OK


SYNC_FAIL_AFTER_ENV = "MODELWARD_SYNC_FAIL_AFTER"  # test hook: SIGKILL after N writes


def _repo_sync(args: argparse.Namespace) -> int:
    """``repo sync --to DEST``: the served repository to an S3 prefix or a directory,
    targets and versioned metadata first, timestamp.json last (publisher/_sync.py)."""
    import logging
    import signal

    from modelward._inputs import existing_dir
    from modelward.publisher import _sync
    from modelward.publisher._sync_dest import destination
    from modelward.trust.errors import OperatorInputError

    existing_dir("--repo", args.repo)
    # botocore logs request headers (the access key id, signatures) at DEBUG: never
    # shown, whatever -v asks for
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    fail_after: int | None = None
    raw = os.environ.get(SYNC_FAIL_AFTER_ENV)
    if raw:  # a fault hook for tests: the process dies as a crash or a kill would
        if not raw.isdigit():
            raise OperatorInputError(f"{SYNC_FAIL_AFTER_ENV}={raw!r}: not a whole number",
                                     hint="unset it (a test hook)")
        fail_after = int(raw)
    dest = destination(args.to, args.repo, args.endpoint_url, args.region)
    plan = _sync.plan(args.repo, dest, _sync.SyncConfig())
    if args.dry_run:
        for up in plan.uploads:
            print(f"would put {up.file.key} ({up.file.size} bytes, {up.cache_control})")
        print(f"{dest.describe()}: {len(plan.uploads)} to upload, "
              f"{len(plan.unchanged)} unchanged (dry run: nothing written)")
        return EXIT_OK
    with _progress("sync", plan.upload_bytes) as advance:
        def after(n: int, up: _sync.Upload) -> None:
            advance(up.file.size)
            if fail_after is not None and n >= fail_after:
                os.kill(os.getpid(), signal.SIGKILL)

        result = _sync.run(plan, dest, after)
    last = f"; {result.uploaded[-1]} last" if result.uploaded else ""
    print(f"synced {args.repo} to {dest.describe()}: {len(result.uploaded)} uploaded "
          f"({result.uploaded_bytes} bytes), {len(result.unchanged)} unchanged{last}")
    return EXIT_OK


def _repo_export(args: argparse.Namespace) -> int:
    """``repo export --to DIR``: a self-contained repository snapshot on local media for
    ``agent update --once --from DIR`` (publisher/_export.py)."""
    from modelward._inputs import existing_dir
    from modelward.publisher import _export

    existing_dir("--repo", args.repo)
    models = args.model or None
    planned = _export.plan(args.repo, args.to, models)
    with _progress("export", planned[0].upload_bytes) as advance:
        result = _export.run(args.repo, args.to, models,
                             lambda _n, up: advance(up.file.size), planned=planned)
    v = result.selection.versions
    print(f"exported {args.repo} to {args.to}: {len(result.selection.targets)} targets "
          f"({', '.join(models) if models else 'all models'}), root v{v.get('root')}, "
          f"timestamp v{v.get('timestamp')}, targets v{v.get('targets')}; "
          f"{len(result.written)} files written ({result.written_bytes} bytes), "
          f"{len(result.unchanged)} unchanged; {_export.MANIFEST} last")
    return EXIT_OK


def _repo_refresh(args: argparse.Namespace) -> int:
    from modelward.publisher._online import (
        ONLINE_DIR_ENV,
        attach,
        credential_secrets,
        env_passphrases,
    )
    from modelward.publisher._repo import Repository
    from modelward.trust.errors import OperatorInputError

    secrets = credential_secrets(os.environ, _secrets)
    online = args.online_dir or (Path(os.environ[ONLINE_DIR_ENV])
                                 if os.environ.get(ONLINE_DIR_ENV) else None)
    if online is not None and args.keys is None:
        # The online host: only the online directory, never the offline key directory.
        repo = attach(Repository(args.repo, online, b"", secrets=secrets,
                                 environ=dict(os.environ)), online,
                      env_passphrases(os.environ, _passphrase(confirm=False)),
                      secrets, os.environ)
    elif args.keys is None:
        raise OperatorInputError("repo refresh needs --online-dir (the online host) or --keys")
    else:
        repo = _repository(args)
    done = repo.refresh()  # logs a WARNING for each role inside its expiry window
    print(f"re-signed {', '.join(done)}")
    return EXIT_OK


def _repo_set_expiry(args: argparse.Namespace) -> int:
    from modelward._inputs import existing_dir
    from modelward.publisher._expiry import (
        TOP_ROLES,
        format_duration,
        load_expiry_to_replace,
        parse_assignments,
    )
    from modelward.publisher._repo import Repository
    from modelward.trust.errors import OperatorInputError

    lifetimes = parse_assignments(args.lifetimes, "set-expiry")
    windows = parse_assignments(args.warn or [], "--warn")
    if not lifetimes and not windows:
        raise OperatorInputError("repo set-expiry needs ROLE=DURATION or --warn ROLE=DURATION")
    existing_dir("--repo", args.repo)
    existing_dir("--keys", args.keys)
    repo = Repository(args.repo, args.keys, b"unused: set-expiry signs nothing",
                      expiry=load_expiry_to_replace(args.keys))  # a corrupt file is replaced
    path = repo.set_expiry(lifetimes, windows)
    print(f"wrote {path}; metadata signed from now on uses:")
    for role in TOP_ROLES:
        print(f"  {role:10} lifetime {format_duration(repo.expiry.lifetime(role)):>8}  "
              f"warned {format_duration(repo.expiry.window(role))} ahead")
    return EXIT_OK


def _repo_status(args: argparse.Namespace) -> int:
    from modelward._inputs import existing_dir
    from modelward.publisher._repo import Repository
    from modelward.publisher._summary import escape

    existing_dir("--repo", args.repo)
    repo = Repository(args.repo, args.keys, b"unused: status reads public metadata only")
    rows = repo.status()
    repo.expiry_warnings()  # the same warnings as log lines
    for note in repo.waiting():  # pending/staged changes, KEYS' own targets vs served
        print(f"{note.level}: {escape(note.text, 2000)}",  # (--json: stdout stays JSON)
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps([{"role": r.role, "version": r.version,
                           "expires": r.expires.isoformat(), "threshold": r.threshold,
                           "signatures": r.signatures, "warning": r.warning,
                           "warn_within_seconds": int(r.window.total_seconds())}
                          for r in rows], allow_nan=False, indent=2))
        return EXIT_OK
    print(f"{'ROLE':10} {'VERSION':>7}  {'EXPIRES':25} {'SIGNED':>7}  WARNING")
    for r in rows:  # a delegated role's name is a team's string
        print(f"{escape(r.role, 64):10} {r.version:>7}  {r.expires.isoformat():25} "
              f"{r.signatures:>3}/{r.threshold:<3}  {r.warning}")
    return EXIT_OK


def _bundle_build(args: argparse.Namespace) -> int:
    from modelward._inputs import output_file, readable_file
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.trust.errors import OperatorInputError

    readable_file("MODEL", args.model)
    if args.vectors is not None:
        readable_file("--vectors", args.vectors)
    if args.provenance is not None:
        readable_file("--provenance", args.provenance)
    extra = []
    for spec in args.extra or []:
        src, sep, arc = spec.partition(":")
        if not sep:
            raise OperatorInputError(f"--extra {spec!r}: expected SRC:PATH_IN_BUNDLE")
        extra.append((readable_file("--extra", Path(src)), arc))
    signers, bind = _build_signers(args)
    output_file("-o", args.output)
    encryption = None
    if args.encrypt_for is not None:
        from modelward._inputs import existing_dir
        from modelward.publisher._encrypt import content_key, recipients_of

        if args.fleet_dir is None:
            raise OperatorInputError("--encrypt-for needs --fleet-dir (where the devices' "
                                     "decryption keys and the content keys are)")
        existing_dir("--fleet-dir", args.fleet_dir)
        encryption = content_key(args.fleet_dir, args.name, recipients_of(args.encrypt_for))
        state = ("new: the recipients changed or it is the first" if encryption.rotated
                 else "kept: the same recipients")
        print(f"content key {encryption.key.key_id} of {args.name} ({state}), wrapped for "
              f"{len(encryption.recipients)} device(s)", file=sys.stderr)
    elif args.fleet_dir is not None:
        raise OperatorInputError("--fleet-dir goes with --encrypt-for")
    size = sum(p.stat().st_size for p in [args.model, *(src for src, _ in extra)]
               if p.is_file())
    with _progress("building", 2 * size) as advance:
        m = build_bundle(
            args.model, args.name, args.version, args.output, vectors=args.vectors,
            extra=extra, progress=advance, options=BuildOptions(
                rtol=args.rtol, atol=args.atol, seed=args.seed, check_vectors=True,
                model_signature=args.model_signature, signers=signers,
                signature_bind=bind, provenance_attestation=args.provenance,
                encryption=encryption),
        )
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {m.name} {m.version}, {len(m.files)} files, {size} bytes")
    return EXIT_OK


def _build_signers(args: argparse.Namespace) -> tuple[tuple[Any, ...], str]:
    """The model signers ``bundle build`` verifies ``--model-signature`` against, and what
    the signature must be for: this release (name and version), unless ``--policy``'s rule
    for the model opts out (``bind: digest``)."""
    from modelward._inputs import read_file, readable_file
    from modelward.trust.errors import OperatorInputError
    from modelward.updater.bundle._provenance import (
        BIND_DIGEST,
        BIND_NAME_VERSION,
        DIGEST_BIND_RISK,
        parse_policy,
    )
    from modelward.updater.errors import PolicyFormatError

    bind = BIND_NAME_VERSION
    if args.model_signature is None:
        if args.signer_key or args.signer_chain or args.policy:
            raise OperatorInputError("--signer-key, --signer-chain and --policy verify "
                                     "--model-signature, which is not given")
        return (), bind
    readable_file("--model-signature", args.model_signature)
    if bool(args.signer_chain) != bool(args.signer_identity):
        raise OperatorInputError("--signer-chain and --signer-identity go together")
    signers: list[dict[str, str]] = []
    for i, key in enumerate(args.signer_key or []):
        signers.append({"name": f"key-{i + 1}", "public_key":
                        read_file("--signer-key", key, 1 << 16).decode(errors="replace")})
    if args.signer_chain is not None:
        signers.append({"name": "chain", "identity": args.signer_identity, "certificate_chain":
                        read_file("--signer-chain", args.signer_chain, 1 << 16)
                        .decode(errors="replace")})
    try:
        if args.policy is not None:
            policy = parse_policy(read_file("--policy", args.policy, 1 << 18),
                                  str(args.policy), base=args.policy.parent)
            rule = policy.rule_for(args.name)
            if rule is None:
                raise OperatorInputError(f"--policy {args.policy}: no rule covers {args.name!r}")
            found = list(rule.signers)
            if rule.bind == BIND_DIGEST:  # (the rule's explicit opt-out)
                bind = BIND_DIGEST
                import logging

                logging.getLogger("modelward").warning(
                    "--policy rule %r %s", rule.name, DIGEST_BIND_RISK)
        else:
            found = []
    except PolicyFormatError as e:
        raise OperatorInputError(str(e)) from e
    flags = [f"--signer-key {k}" for k in args.signer_key or []] + (
        [f"--signer-chain {args.signer_chain}"] if args.signer_chain else [])
    for flag, signer in zip(flags, signers, strict=True):
        doc = {"format": "modelward-provenance-policy/1", "rules": [
            {"name": "given", "models": ["*"], "signers": [signer]}]}
        try:
            found += parse_policy(json.dumps(doc).encode(), flag).rules[0].signers
        except PolicyFormatError as e:
            raise OperatorInputError(f"{flag}: not an EC public key or CA certificate PEM",
                                     hint="the training team's public key (model-signing "
                                     "signs with EC keys), or its CA's certificates") from e
    return tuple(found), bind


def _bundle_inspect(args: argparse.Namespace) -> int:
    from modelward._inputs import readable_file
    from modelward.publisher._inspect import inspect

    readable_file("BUNDLE", args.bundle)
    return inspect(args.bundle, as_json=args.json)


def _provenance_sign(args: argparse.Namespace) -> int:
    from modelward._inputs import output_file, read_file, readable_file
    from modelward.publisher._attestation import make_attestation
    from modelward.trust._atomic import write_atomic
    from modelward.trust.errors import OperatorInputError

    readable_file("MODEL", args.model)
    output_file("-o", args.output)
    datasets, params = [], {}
    for spec in args.dataset or []:
        name, sep, digest = spec.rpartition("=sha256:")
        if not sep or not name:
            raise OperatorInputError(f"--dataset {spec!r}: expected NAME=sha256:HEX")
        datasets.append((name, digest))
    for spec in args.param or []:
        k, sep, val = spec.partition("=")
        if not sep or not k:
            raise OperatorInputError(f"--param {spec!r}: expected KEY=VALUE")
        params[k] = val
    data = make_attestation(args.model, read_file("--key", args.key, 1 << 16),
                            args.builder_id, datasets=datasets, source=args.source or "",
                            parameters=params)
    write_atomic(args.output, data)
    print(f"wrote {args.output}: SLSA provenance of {args.model.name} by {args.builder_id}")
    return EXIT_OK


def _bundle_diff(args: argparse.Namespace) -> int:
    from modelward._inputs import readable_file
    from modelward.publisher._bundlediff import run

    readable_file("OLD", args.old)
    readable_file("NEW", args.new)
    return run(args)


def _publish(args: argparse.Namespace) -> int:
    from modelward._inputs import readable_file
    from modelward.publisher._bridge import announce
    from modelward.publisher._indexpub import publish_lines

    mqtt = _broker_config(args, "modelward-operator") if args.announce else None
    readable_file("BUNDLE", args.bundle)
    repo = _repository(args)
    size = args.bundle.stat().st_size if args.bundle.is_file() else 0
    with _progress("publishing", 3 * size) as advance:
        r = repo.publish(args.bundle, channel=args.channel, rollout=args.rollout,
                         sign_with=args.sign_with, role=args.role, progress=advance,
                         unsafe_plaintext=args.unsafe_plaintext)
    print("\n".join(publish_lines(r)))  # (escaped; and what earlier releases fetch)
    if mqtt is not None:
        v = announce(args.repo, mqtt)
        print(f"announced timestamp v{v} on {mqtt.topic('announce')}")
    return EXIT_OK


def _broker_config(args: argparse.Namespace, default_user: str) -> MqttConfig:
    from modelward.trust.errors import OperatorInputError
    from modelward.updater._config import MqttConfig
    from modelward.updater.transport._mqtt import parse_broker_url

    if not args.broker or not args.fleet:
        raise OperatorInputError("--broker and --fleet are required for MQTT")
    from modelward._inputs import read_file, tls_files

    host, port = parse_broker_url(args.broker)
    tls_files(args.tls_ca, args.cert, args.key)
    password = None
    if args.password_file:
        raw = read_file("--password-file", args.password_file, 4096)
        try:
            password = raw.decode().strip()
        except UnicodeDecodeError as e:
            raise OperatorInputError(f"--password-file {args.password_file}: not UTF-8 text",
                                     hint="the file holds the password alone") from e
    return MqttConfig(
        host=host, port=port, fleet=args.fleet, client_name=args.username or default_user,
        ca_file=str(args.tls_ca) if args.tls_ca else None,
        cert_file=str(args.cert) if args.cert else None,
        key_file=str(args.key) if args.key else None,
        password=password,
    )


def _add_broker_options(p: argparse.ArgumentParser, required: bool) -> None:
    from modelward._inputs import local_path

    g = p.add_argument_group("MQTT broker")
    g.add_argument("--broker", required=required, help="mqtts://HOST:PORT")
    g.add_argument("--fleet", required=required, help="fleet name (topic prefix)")
    g.add_argument("--tls-ca", type=local_path, help="CA of the broker's certificate (pinned)")
    g.add_argument("--cert", type=local_path, help="client certificate")
    g.add_argument("--key", type=local_path, help="client key")
    g.add_argument("--username", help="MQTT username (default: the service's own)")
    g.add_argument("--password-file", type=local_path, help="file holding the MQTT password")


def _serve_mqtt(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from modelward.publisher._bridge import Bridge
    from modelward.publisher._fairness import limits_from_args

    bridge = Bridge(args.repo, _broker_config(args, "modelward-bridge"), group=args.group,
                    limits=limits_from_args(args))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"serving {args.repo} for fleet {args.fleet} on {args.broker}", flush=True)
    dead = None
    while dead is None and not stop.wait(1.0):
        dead = bridge.healthy()  # a dead network thread: exit, so systemd restarts us
    bridge.close()
    s = bridge.stats
    print(f"stopped: {s.requests} requests, {s.served_bytes} bytes, {s.refused} refused, "
          f"{s.dropped} dropped")
    if dead is not None:
        logging.getLogger("modelward.serve-mqtt").error("exiting: %s", dead)
        return EXIT_ERROR
    return EXIT_OK


def _announce(args: argparse.Namespace) -> int:
    from modelward.publisher._bridge import announce

    cfg = _broker_config(args, "modelward-operator")
    v = announce(args.repo, cfg)
    print(f"announced timestamp v{v} on {cfg.topic('announce')}")
    return EXIT_OK


def _fleet_add_device(args: argparse.Namespace) -> int:
    from modelward._inputs import creatable_dir, output_file, read_file
    from modelward.trust.errors import OperatorInputError

    creatable_dir("--fleet-dir", args.fleet_dir)
    if args.key is not None:
        if args.challenge or args.ek_ca:
            raise OperatorInputError("--challenge and --ek-ca go with --enrollment, not --key")
        from modelward.publisher._fleet import add_device

        pem = read_file("--key", args.key)
        path = add_device(args.fleet_dir, args.device, pem, source=f"--key {args.key}")
        print(f"enrolled {args.device}: {path}")
        return EXIT_OK
    from modelward.publisher import _enroll

    if args.response is not None:
        if args.challenge or args.ek_ca:
            raise OperatorInputError("--challenge and --ek-ca go with --enrollment, not "
                                     "--response")
        data = read_file("--response", args.response, _enroll.MAX_RESPONSE_BYTES)
        pem_path, ak_path = _enroll.finish_enrollment(args.fleet_dir, args.device, data)
        print(f"enrolled {args.device} (its TPM answered the credential challenge): "
              f"{pem_path}, {ak_path}")
        return EXIT_OK
    if args.challenge is None:
        raise OperatorInputError("--enrollment needs --challenge OUT (where to write the "
                                 "challenge for the device)")
    output_file("--challenge", args.challenge)
    enrollment = read_file("--enrollment", args.enrollment, _enroll.MAX_ENROLLMENT_BYTES)
    ca = None
    if args.ek_ca is not None:
        ca = _enroll.load_ek_ca(read_file("--ek-ca", args.ek_ca), f"--ek-ca {args.ek_ca}")
    enr = _enroll.begin_enrollment(args.fleet_dir, args.device, enrollment, ca,
                                   args.challenge)
    if not enr.ek_certified:
        print("warning: the EK is not checked against a TPM manufacturer's CA (no --ek-ca): "
              "the challenge proves the AK shares a TPM with this EK, not that the EK is a "
              "real TPM's", file=sys.stderr)
    print(f"challenge for {args.device} written to {args.challenge} (expires in "
          f"{int(_enroll.CHALLENGE_TTL // 60)} min): on the device run `modelward agent "
          f"activate-credential --challenge FILE --response OUT`, then `fleet add-device "
          f"--device {args.device} --response OUT`")
    return EXIT_OK


def _add_fleet_view_options(f: argparse.ArgumentParser, repo_help: str) -> None:
    """The options of ``fleet status``, ``report`` and ``exporter``: where the devices'
    reports come from and the repository whose rollouts to show."""
    from modelward._inputs import local_path, number

    f.add_argument("--fleet-dir", type=local_path, required=True)
    f.add_argument("--wait", type=number(0, 3600), default=2.0,
                   help="seconds the broker may take for each batch of 16 devices' "
                   "reports (at least the connect timeout)")
    f.add_argument("--poll-interval", type=number(0, above=True), default=3600.0,
                   help="poll interval (s) of devices whose reports do not carry one; a "
                   "report older than 3 of them is STALE")
    f.add_argument("--repo", type=local_path, help=repo_help)
    f.add_argument("--keys", type=local_path,
                   help="with --repo: the key directory holding its trusted root")
    _add_broker_options(f, required=True)


def _fleet_rows(args: argparse.Namespace, *, summary: bool) -> list[Any]:
    """The judged rows of ``fleet status`` / ``fleet report`` (their shared options)."""
    from modelward.publisher._fleet import collect_status

    _check_fleet_view(args, summary=summary)
    return collect_status(_broker_config(args, "modelward-operator"), args.fleet_dir,
                          wait=args.wait, default_poll=args.poll_interval)


def _check_fleet_view(args: argparse.Namespace, *, summary: bool) -> None:
    """The options of :func:`_add_fleet_view_options`, checked before the broker is asked."""
    from modelward.trust.errors import OperatorInputError

    if not args.poll_interval > 0:
        raise OperatorInputError(f"--poll-interval must be positive, not {args.poll_interval}")
    if not 0 <= args.wait <= 3600:  # also NaN
        raise OperatorInputError(f"--wait must be 0 to 3600 seconds, not {args.wait}")
    if args.repo is not None:
        if not summary or args.keys is None:
            raise OperatorInputError("--repo goes with --summary and --keys",
                                     hint="--keys: the key directory whose trusted root "
                                     "verifies --repo (as for `repo status`)")
        from modelward._inputs import existing_dir

        existing_dir("--repo", args.repo)
        existing_dir("--keys", args.keys)
        from modelward.publisher._served import TRUSTED_ROOT_FILE

        if not (args.keys / TRUSTED_ROOT_FILE).is_file():  # (read-only: never adopted here)
            raise OperatorInputError(
                f"--keys {args.keys} holds no {TRUSTED_ROOT_FILE}: the summary verifies "
                "--repo only from a root the key directory already trusts",
                hint="give the key directory of `repo init` for --repo")


def _fleet_summary(args: argparse.Namespace, rows: list[Any]) -> dict[str, Any]:
    from modelward.publisher._fleet_summary import model_names, repository_releases, summarize

    releases = [] if args.repo is None else repository_releases(
        args.repo, args.keys, model_names(rows))
    return summarize(rows, releases)


def _fleet_report(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from modelward._inputs import creatable_dir
    from modelward.publisher._fleet_report import render_report
    from modelward.trust._atomic import write_atomic
    from modelward.trust.errors import OperatorInputError

    creatable_dir("-o", args.output.parent).mkdir(parents=True, exist_ok=True)
    if args.output.is_dir():
        raise OperatorInputError(f"-o {args.output} is a directory, not the HTML file to write",
                                 hint="e.g. -o fleet.html")
    if args.output.exists() and not args.output.is_file():
        # (the page replaces -o by a rename: /dev/null, /dev/stdout or a named pipe would
        # be replaced by a file of HTML, not written to)
        raise OperatorInputError(f"-o {args.output} is not a regular file (a device, pipe or "
                                 "socket): the page replaces the file at -o",
                                 hint="give the path of an HTML file, e.g. -o fleet.html")
    summary = _fleet_summary(args, _fleet_rows(args, summary=True))
    page = render_report(summary, fleet=args.fleet,
                         generated=datetime.now(UTC).isoformat(timespec="seconds"))
    write_atomic(args.output, page.encode("utf-8"), 0o644)
    s = summary["states"]
    print(f"wrote {args.output}: {summary['devices']} devices, "
          + ", ".join(f"{k} {n}" for k, n in s.items() if n))
    return EXIT_OK


def _fleet_status(args: argparse.Namespace) -> int:
    from modelward.publisher._fleet import format_table, rows_json
    from modelward.trust._display import for_encoding

    rows = _fleet_rows(args, summary=args.summary)
    if args.summary:
        from modelward.publisher._fleet_summary import format_summary, summary_json

        summary = _fleet_summary(args, rows)
        text = summary_json(summary) if args.json else format_summary(summary)
        print(for_encoding(text, getattr(sys.stdout, "encoding", None)))
        return EXIT_OK
    if args.json:
        print(rows_json(rows))  # strict JSON; the table escapes every device string
    else:
        text = format_table(rows) if rows else "no enrolled devices and no status reports"
        # under LANG=C / ISO-8859-1 one device's CJK state must not end the command
        print(for_encoding(text, getattr(sys.stdout, "encoding", None)))
    return EXIT_OK


def _fleet_audit(args: argparse.Namespace) -> int:
    from modelward.publisher._audit import audit_device, history_text
    from modelward.trust._display import for_encoding
    from modelward.trust.errors import OperatorInputError

    head = None
    if args.head is not None:
        from modelward.publisher._audit import parse_head

        if args.status is not None:
            raise OperatorInputError("--head and --status both name the head: give one")
        head = parse_head(args.head)
    if args.log is not None:
        h = audit_device(args.fleet_dir, args.device, args.log, checkpoint=args.checkpoint,
                         status=args.status, allow_tail=args.allow_unsigned_tail, head=head)
    else:
        if args.checkpoint is not None:
            raise OperatorInputError("--checkpoint goes with --log (over MQTT the device "
                                     "sends its own)")
        from modelward.publisher._devrpc import RpcClient, fetch_audit, verify_fetched_audit

        args.all, devices = False, args.device
        args.device = [devices]
        (device,) = _attest_targets(args)
        args.device = devices
        client = RpcClient(_broker_config(args, "modelward-operator"))
        try:
            chunks = fetch_audit(client, device, args.timeout)
            # rotated: the kept older segment too (a head signed before the rotation lies
            # there, and the live checkpoint must stand for exactly it)
            old = fetch_audit(client, device, args.timeout, segment="old") \
                if chunks and chunks[0].get("checkpoint") is not None else None
        finally:
            client.close()
        h = verify_fetched_audit(chunks, args.fleet_dir, device, status=args.status,
                                 allow_tail=args.allow_unsigned_tail, head=head, old=old)
    print(for_encoding(history_text(args.device, h, args.json),
                       getattr(sys.stdout, "encoding", None)))
    return EXIT_OK


def _add_attest_parsers(fsub: Any) -> None:
    """``fleet attest`` and ``fleet audit`` (the request channel to devices)."""
    from modelward._inputs import number

    f = fsub.add_parser("attest", help="ask devices for a TPM-signed answer over MQTT and "
                        "verify which model each runs (docs/attestation.md)")
    which = f.add_mutually_exclusive_group(required=True)
    which.add_argument("--device", action="append", metavar="ID",
                       help="a device to attest (repeatable)")
    which.add_argument("--all", action="store_true", help="every enrolled device")
    f.add_argument("--json", action="store_true")
    f.add_argument("--timeout", type=number(0, 600, above=True), default=10.0,
                   help="seconds each device may take to answer")
    _add_fleet_view_options(f, "the repository whose signed releases name the attested "
                            "fingerprints (required)")
    f.set_defaults(func=_fleet_attest)


def _attest_targets(args: argparse.Namespace) -> list[str]:
    from modelward.publisher._broker_config import check_id
    from modelward.publisher._fleet import enrolled_devices
    from modelward.trust.errors import OperatorInputError

    known = enrolled_devices(args.fleet_dir)
    if args.all:
        if not known:
            raise OperatorInputError(f"--fleet-dir {args.fleet_dir} has no enrolled devices")
        return known
    out: list[str] = []
    for d in args.device:
        check_id("--device", d)
        if d not in known:
            raise OperatorInputError(f"--device {d}: not enrolled in {args.fleet_dir}",
                                     hint="fleet add-device it first")
        if d not in out:
            out.append(d)
    return out


def _attest_line(row: Any) -> str:
    from modelward.trust._display import escape

    if row.attested is None:
        detail = f" ({escape(row.detail)[:300]})" if row.detail and \
            row.detail != row.reason else ""
        return f"{row.device}: FAILED: {row.reason}{detail}"
    a = row.attested
    fp = str(getattr(a, "fingerprint", "?"))
    since = getattr(a, "since", None)
    reason = getattr(a, "reason", None)
    if isinstance(since, dict):
        reason, since = since.get("reason", reason), since.get("at", since.get("time"))
    when = f", since {escape(str(reason or 'event'))} at {escape(str(since))}" \
        if since is not None else ""
    return (f"{row.device}: attested: {escape(str(getattr(a, 'name', '?')))} "
            f"{escape(str(getattr(a, 'version', '?')))} (fingerprint {escape(fp[:16])}…, "
            f"slot {escape(str(getattr(a, 'slot', '?')))}{when})")


def _attested_json(a: Any) -> Any:
    import dataclasses

    if a is None:
        return None
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return {k: v for k, v in dataclasses.asdict(a).items()
                if isinstance(v, str | int | float | bool | type(None) | dict | list)}
    return a if isinstance(a, dict) else str(a)


def _fleet_attest(args: argparse.Namespace) -> int:
    import json

    from modelward.publisher._devrpc import RpcClient, attest_devices, percentile, release_index
    from modelward.trust.errors import OperatorInputError

    if args.repo is None or args.keys is None:
        raise OperatorInputError("fleet attest needs --repo and --keys: the signed releases "
                                 "name the attested fingerprints")
    _check_fleet_view(args, summary=True)
    devices = _attest_targets(args)
    releases = release_index(args.repo, args.keys)
    client = RpcClient(_broker_config(args, "modelward-operator"))
    try:
        rows = attest_devices(client, args.fleet_dir, devices, args.timeout, releases)
    finally:
        client.close()
    lat = [r.latency_s * 1000 for r in rows if r.latency_s is not None]
    ver = [r.verify_s * 1000 for r in rows if r.verify_s is not None]
    ok = sum(r.attested is not None for r in rows)
    lat_q = {"p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95)}
    ver_q = {"p50": percentile(ver, 0.5), "p95": percentile(ver, 0.95)}
    summary = {"devices": len(rows), "attested": ok, "failed": len(rows) - ok,
               "stale_answers": client.stale, "malformed_answers": client.malformed,
               "latency_ms": lat_q, "verify_ms": ver_q}
    if args.json:
        print(json.dumps({"devices": [
            {"device": r.device, "attested": r.attested is not None,
             "release": _attested_json(r.attested), "reason": r.reason, "detail": r.detail,
             "latency_ms": None if r.latency_s is None else r.latency_s * 1000,
             "verify_ms": None if r.verify_s is None else r.verify_s * 1000}
            for r in rows], "summary": summary}, indent=1, sort_keys=True))
    else:
        for r in rows:
            print(_attest_line(r))

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f} ms"

        print(f"{ok} of {len(rows)} attested; latency p50 {ms(lat_q['p50'])} "
              f"p95 {ms(lat_q['p95'])}; verify p50 {ms(ver_q['p50'])} p95 {ms(ver_q['p95'])}; "
              f"{client.stale} stale answers ignored")
    return EXIT_OK if ok == len(rows) else EXIT_ERROR


def _listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) for ``--listen``."""
    from modelward.trust.errors import OperatorInputError

    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (not sep or not host or not port.isascii() or not port.isdigit()
            or not 0 < int(port) < 65536):  # (isascii: int() takes other scripts' digits)
        raise OperatorInputError(f"--listen {text!r} is not HOST:PORT",
                                 hint="e.g. 127.0.0.1:9817 (an address of this machine)")
    return host, int(port)


def _fleet_exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    from modelward.publisher._fleet import collect_status
    from modelward.publisher._fleet_exporter import serve

    host, port = _listen_address(args.listen)
    from modelward.publisher._metrics_http import is_wildcard

    if is_wildcard(host):
        print(f"warning: --listen {args.listen} serves the fleet's figures (device names, "
              "versions, failure reasons) to every network this machine is on; the exporter "
              "has no authentication: prefer 127.0.0.1 or one interface's address behind "
              "a firewall", file=sys.stderr, flush=True)
    _check_fleet_view(args, summary=True)
    cfg = _broker_config(args, "modelward-operator")

    def compute() -> dict[str, Any]:
        return _fleet_summary(args, collect_status(cfg, args.fleet_dir, wait=args.wait,
                                                   default_poll=args.poll_interval))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"serving fleet {args.fleet} metrics on http://{args.listen}/metrics, refreshed "
          f"every {args.interval:g}s", flush=True)
    serve(compute, host, port, args.interval, stop)
    return EXIT_OK


def _fleet_broker_config(args: argparse.Namespace) -> int:
    from modelward.publisher._broker_config import write_broker_config

    devices = [d for d in args.devices.split(",") if d]
    rotate = True if args.rotate == "*" else [u for u in (args.rotate or "").split(",") if u]
    bc = write_broker_config(args.fleet, devices, args.output, plugin=args.dynsec_plugin,
                             rotate=rotate, broker_group=args.broker_group, fmt=args.format)
    if args.format == "emqx":
        print(f"wrote {bc.dynsec.parent}: users.json (built-in database users, 0600), "
              "authz-rules.json (their rules), modelward.hocon (authentication, "
              "authorization with no_match = deny, byte bounds; the import commands at "
              "its top; docs/brokers.md \"EMQX 5\")")
        print(f"credentials for {len(bc.credentials)} identities in "
              f"{args.output / 'credentials'} (the same files work with mosquitto)")
        return EXIT_OK
    mode = (f"0640, group {bc.dynsec_group}" if bc.dynsec_group is not None else "0600")
    print(f"wrote {bc.dynsec} (mosquitto dynamic security: clients, client ids, ACLs; {mode})")
    print(f"wrote {bc.conf}: include it from mosquitto.conf (the dynamic-security plugin and "
          "that file, no anonymous access, TCP_NODELAY, byte bounds on packets, in-flight and "
          "queued messages, session expiry; docs/brokers.md has EMQX and HiveMQ equivalents)")
    print(f"credentials for {len(bc.credentials)} identities in {args.output / 'credentials'}")
    for what, users in (("new (install their credential)", bc.created),
                        ("rotated (install their new credential)", bc.rotated),
                        ("removed (credential file deleted)", bc.removed),
                        ("unchanged (password kept)", bc.kept)):
        if users:
            print(f"  {what}: {', '.join(users)}")
    if bc.note:
        print(f"note: {bc.note}")
    print("restart mosquitto to apply (its plugin reads the file at start)")
    return EXIT_OK


# --- device -----------------------------------------------------------------


def _load(args: argparse.Namespace, *, need_transport: bool = False) -> AgentConfig:
    """The agent configuration; ``need_transport``: it must configure [https] or [mqtt]
    (the daemon, a network update); the local commands also run on a device that is only
    ever updated from media (``agent update --from DIR``)."""
    from modelward.agent._config import load_config

    # The journal's test hook: SIGKILL the agent right after journaling this step.
    return load_config(args.config, test_kill_at=os.environ.get("MODELWARD_TEST_KILL_AT"),
                       need_transport=need_transport)


def _agent_provision(args: argparse.Namespace) -> int:
    from modelward._inputs import root_metadata
    from modelward.agent._commands import provision

    cfg = _load(args)
    root_metadata("--root", args.root)  # before the TPM is touched
    rep = provision(cfg, args.root, keep_identity=args.keep_identity)

    def word(created: bool) -> str:
        return "created" if created else "already present"

    print(f"TPM at {cfg.tcti} provisioned for {cfg.device_id}:")
    print(f"  storage root key 0x81000001: {word(rep.srk_created)}")
    print(f"  identity key     0x81000102: {word(rep.identity_created)}")
    print(f"  record-MAC key   0x81000103: {word(rep.mac_key_created)}")
    print(f"  attestation key  0x81000104: {word(rep.ak_created)}")
    print(f"  root anchor      0x01000101: {word(rep.anchor_defined)}")
    print(f"  update counter   0x01000111: {word(rep.counter_defined)}")
    print(f"  measurement reg. 0x01000131: {word(rep.register_defined)}")
    if rep.owner_auth_set is False:
        print("warning: the TPM owner hierarchy has no password: any process on this device "
              "can undefine modelward's NV indexes (the measurement register's history, the "
              "anchor); set one (tpm2_changeauth -c owner) and give it to `agent provision` "
              "in MODELWARD_TPM_OWNER_AUTH (docs/attestation.md)", file=sys.stderr)
    if rep.migrated:
        print("  migrated from the unauthorized objects of an older provisioning "
              "(0x81000101, 0x01000100, 0x01000110 removed)")
    if rep.record_heals:
        print("  the trust record did not verify under the old objects and was not carried "
              "over: the next `agent update` heals the device from the anchored root")
    if rep.identity_replaced:
        print("  the identity key is new (any TPM client could use the old one): re-enrol "
              "with `agent enroll` and `fleet add-device`, or migrate with --keep-identity")
    return EXIT_OK


def _agent_update(args: argparse.Namespace) -> int:
    with _no_cycle_collection(freeze=True):
        from modelward.agent._commands import update
        from modelward.agent._malloc import tune_malloc
        from modelward.updater.install import _install  # noqa: F401 - (imported here, frozen)

    tune_malloc()  # a short-lived process: see agent/_malloc.py
    medium = args.source_dir
    if medium is not None and args.transport:
        from modelward.trust.errors import OperatorInputError

        raise OperatorInputError("--from DIR and --transport: one or the other",
                                 hint="--from reads the medium, no transport is used")
    # (with --from, no [https] or [mqtt] is needed: device id, state dir, model, health
    # and idle settings still apply)
    cfg = _load(args, need_transport=medium is None)
    if args.transport:
        cfg = cfg.with_transport(args.transport)
    result = update(cfg, source_dir=medium, expired_grace=args.expired_grace)
    _print_done(result.message)
    return EXIT_OK


def _print_done(message: str) -> None:
    """Print what ``agent update`` did, once it is done: a stdout whose reader is gone
    (EPIPE; a closed pipe under a service manager) is one warning naming stdout, not a
    failed command (the update itself is complete and committed: a script must not read
    it as a failed install), and stdout goes to /dev/null so that the exit's flush does
    not fail again."""
    try:
        print(message, flush=True)
    except OSError as e:
        import logging

        logging.getLogger("modelward").warning(
            "cannot write to stdout (%s); the command itself is done: %s",
            e.strerror or e, message)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, sys.stdout.fileno())
            os.close(fd)


def _agent_enroll(args: argparse.Namespace) -> int:
    from modelward.agent._commands import enroll, enrollment

    cfg = _load(args)
    if args.json:
        print(json.dumps(enrollment(cfg)))
        return EXIT_OK
    device, pem = enroll(cfg)
    print(f"device_id {device}")
    print(pem.decode(), end="")
    return EXIT_OK


def _agent_activate_credential(args: argparse.Namespace) -> int:
    from modelward._inputs import output_file, read_file
    from modelward.agent._commands import activate_credential
    from modelward.trust._atomic import write_atomic

    cfg = _load(args)
    output_file("--response", args.response)
    response = activate_credential(cfg, read_file("--challenge", args.challenge, 8192),
                                   source=f"--challenge {args.challenge}")
    write_atomic(args.response, response)
    print(f"response written to {args.response}: give it to `fleet add-device --device "
          f"{cfg.device_id} --response FILE`")
    return EXIT_OK


def _agent_run(args: argparse.Namespace) -> int:
    from modelward.agent._daemon import run_daemon
    from modelward.agent._log import LOG_FORMAT_ENV

    # the attempt processes log in the same format (auto: they share this stderr) and at
    # the same verbosity (main's: the agent's default is one more)
    cfg = _load(args, need_transport=True)
    run_daemon(cfg, {**os.environ, LOG_FORMAT_ENV: args.log_format,
                     "MODELWARD_VERBOSITY": str(args.verbose + 1)})
    return EXIT_OK


def _agent_audit(args: argparse.Namespace) -> int:
    from modelward.agent._commands import audit_history
    from modelward.trust._auditview import history_text
    from modelward.trust._display import for_encoding

    cfg = _load(args)
    print(for_encoding(history_text(cfg.device_id, audit_history(cfg), args.json),
                       getattr(sys.stdout, "encoding", None)))
    return EXIT_OK


def _agent_attest(args: argparse.Namespace) -> int:
    import json

    from modelward.agent._commands import attest

    cfg = _load(args)
    doc = attest(cfg, args.nonce)
    if args.json:
        print(json.dumps(doc, sort_keys=True))
        return EXIT_OK
    print(f"{cfg.device_id}: measurement register {doc['register']} certified by the "
          f"attestation key over nonce {args.nonce[:16]}…; {len(doc['events'])} event(s) "
          "this boot:")
    from modelward.trust._display import escape, for_encoding
    from modelward.trust._measure import event_json

    for line in doc["events"]:
        ev = event_json(line.encode()) or {}
        what = (f"{ev.get('model')} {ev.get('version')} slot {ev.get('slot')} "
                f"(fingerprint {str(ev.get('fingerprint'))[:16]}…)"
                if "fingerprint" in ev else str(ev.get("reason", ""))[:120])
        # (every field came off the disk: escaped, as the operator's tools do)
        print(for_encoding(f"  {ev.get('seq')}: {escape(str(ev.get('time')))} "
                           f"{ev.get('kind')}: {escape(what)}",
                           getattr(sys.stdout, "encoding", None)))
    return EXIT_OK


def _agent_status(args: argparse.Namespace) -> int:
    from modelward.agent._commands import status
    from modelward.agent._status_offline import status_lines

    doc = status(_load(args), use_tpm=not args.no_tpm)
    if args.json:
        print(json.dumps(doc))
        return EXIT_OK
    import shutil

    width = shutil.get_terminal_size().columns - 1  # (80 when not a terminal)
    for line in status_lines(doc, width):  # escaped, labelled rows; "verified": TPM only
        print(line)
    return EXIT_OK


def _agent_check_config(args: argparse.Namespace) -> int:
    from modelward.agent._config import check_config

    for line in check_config(args.config):
        print(line)
    return EXIT_OK


def _agent_boot_check(args: argparse.Namespace) -> int:
    from modelward.agent._commands import run_boot_check
    from modelward.agent._config_rules import load_boot_config
    from modelward.updater.errors import NothingTrustedError

    cfg = load_boot_config(args.config)  # (validated in full, only booting's part built)
    if args.tpm_wait is not None:
        cfg = cfg.replace(tpm_wait=args.tpm_wait)
    try:
        result = run_boot_check(cfg)
    except NothingTrustedError as e:
        from modelward.agent._log import report_error

        report_error(e, fmt=args.log_used, prefix="modelward: boot check",
                     traceback=args.debug)
        return EXIT_NOTHING_TRUSTED
    # (plain print: a boot check whose result line cannot be written is never an exit 0,
    # a10-boot; the flush at the end fails and the exit says so)
    print(result.message)
    return EXIT_OK


# --- tester -----------------------------------------------------------------


def _sim_tpm_start(args: argparse.Namespace) -> int:
    from modelward.simulator._swtpm import ek_ca_bundle, start_swtpm

    h = start_swtpm(args.state, args.port, args.ek_ca)
    print(h.tcti)
    if args.ek_ca is not None:
        print(f"EK CA certificates (for `fleet add-device --ek-ca`): {ek_ca_bundle(args.ek_ca)}",
              file=sys.stderr)
    return EXIT_OK


def _sim_tpm_stop(args: argparse.Namespace) -> int:
    from modelward.simulator._swtpm import stop_swtpm

    print("stopped" if stop_swtpm(args.state) else "not running")
    return EXIT_OK


def _say(text: str) -> None:
    print(text, flush=True)


def _sim_fleet(args: argparse.Namespace) -> int:
    from modelward._inputs import existing_dir
    from modelward.simulator._fleet import Fleet, fleet_down, fleet_up

    if args.action != "up":
        existing_dir("--dir", args.dir)
    if args.action == "up":
        fleet = fleet_up(args.dir, args.devices, poll_interval=args.poll,
                         announce_spread=args.announce_spread, say=_say)
        print(f"fleet of {len(fleet.devices)} up in {fleet.dir}")
    elif args.action == "down":
        stopped = fleet_down(args.dir)
        print(f"stopped {len(stopped)}: {', '.join(stopped) or 'nothing was running'}")
    elif args.action == "publish":
        fleet = Fleet.load(args.dir)
        version = fleet.publish(args.version)
        print(f"published and announced classifier {version}")
    elif args.action == "enroll":
        import shlex

        fleet = Fleet.load(args.dir)
        registry = fleet.enroll()
        print(f"enrolled {len(fleet.devices)} devices by credential activation in {registry}")
        print("attest them with:\n  " + shlex.join([
            "modelward", "fleet", "attest", "--all", "--fleet-dir", str(registry), "--repo",
            str(fleet.repo), "--keys", str(fleet.keys), *fleet.operator_args()]))
    else:
        fleet = Fleet.load(args.dir)
        from modelward.trust._display import escape, escape_id

        rows = [{"device": d.id, "transport": d.transport, "active": d.active(),
                 "attempts": d.attempts(), "last_error": d.last_error()}
                for d in fleet.devices]
        if args.json:
            print(json.dumps(rows, indent=1, allow_nan=False))
        else:  # active and last error come from the device's disk: escaped
            print(f"{'device':10} {'over':6} {'active':10} {'attempts':>8}  last error")
            for r in rows:
                print(f"{escape_id(r['device']):10} {escape_id(r['transport'], 8):6} "
                      f"{escape(r['active'] or '-', 64):10} {r['attempts']:>8}  "
                      f"{escape(r['last_error'] or '-')}")
    return EXIT_OK


def _sim_scenario(args: argparse.Namespace) -> int:
    from modelward.simulator._fleet import Fleet
    from modelward.simulator._scenarios import SCENARIOS, result_json, run, table

    say = (lambda text: print(text, file=sys.stderr, flush=True)) if args.json else _say
    result = run(Fleet.load(args.dir), SCENARIOS[args.name], timeout=args.timeout, say=say)
    print(json.dumps(result_json(result), indent=1) if args.json else table([result]))
    return EXIT_OK if result.ok else EXIT_ERROR


def _sim_report(args: argparse.Namespace) -> int:
    import datetime
    import platform

    from modelward.simulator._scenarios import run_report, table

    results = run_report(args.dir, args.devices, say=_say if args.verbose else lambda s: None)
    text = (f"Fleet of {args.devices} simulated devices (swtpm each; even ids over MQTT, odd "
            f"over HTTPS), {platform.node()}, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
            f"`modelward sim report --devices {args.devices}`.\n\n{table(results)}\n")
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return EXIT_OK if all(r.ok for r in results) else EXIT_ERROR


def _sim_demo(args: argparse.Namespace) -> int:
    from modelward.simulator._demo import run_demo

    return run_demo(args.dir)


def _top_parser() -> argparse.ArgumentParser:
    """The top-level parser and its global options, without the commands."""
    import argparse

    from modelward._inputs import OneLineParser

    p = OneLineParser(
        prog="modelward",
        description="Over-the-air updates of ML models, verified with TUF and a TPM.",
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"modelward {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more output (repeatable)")
    p.add_argument("--log-format", choices=["auto", "human", "json"],
                   help="log lines for people, or JSON lines with a journald priority "
                   "(default: $MODELWARD_LOG_FORMAT, else auto: json when stderr is the "
                   "journal)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (for a bug report)")
    return p


AGENT_HELP = "device: provision, update, status, boot check"


def _add_config_option(a: argparse.ArgumentParser) -> None:
    from modelward._inputs import local_path

    a.add_argument("--config", type=local_path, metavar="PATH",
                   help="the agent configuration (default: /etc/modelward/agent.toml)")


MAX_TPM_WAIT = 86400  # (s: `agent boot-check --tpm-wait`)
BOOT_CHECK_PROG = "modelward agent boot-check"


def _boot_unit_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """The arguments of ``argv`` if it is the boot unit's plain command line, read without
    an argument parser; else None, and the parser reads it (help, errors, every other form).

    Plain: ``agent boot-check`` then ``--config PATH`` or ``--tpm-wait SECONDS`` pairs
    (the last of each counts, as with the parser), each value one that the parser takes
    as it is: not empty, not starting with ``-``, no URL, a wait a number in range. For those,
    the result is what the parser gives; anything else, a global option included, goes to
    the parser. argparse and the parser's construction (with shutil, locale, gettext)
    cost the boot unit several ms on every boot (issue 15).
    """
    if len(argv) % 2 or list(argv[:2]) != ["agent", "boot-check"]:
        return None
    config: Path | None = None
    tpm_wait: float | None = None
    for i in range(2, len(argv), 2):
        option, value = argv[i], argv[i + 1]
        if not value or value.startswith("-"):
            return None
        if option == "--config":
            if "://" in value:  # (a URL: the parser's local_path refuses it)
                return None
            config = Path(value)
        elif option == "--tpm-wait":
            try:
                wait = float(value)  # (as _inputs.number: the parser's type)
            except ValueError:
                return None
            if not (math.isfinite(wait) and 0 <= wait <= MAX_TPM_WAIT):
                return None
            tpm_wait = wait
        else:
            return None
    from types import SimpleNamespace

    return cast("argparse.Namespace", SimpleNamespace(
        verbose=0, log_format=None, debug=False, group="agent", cmd="boot-check",
        config=config, tpm_wait=tpm_wait, func=_agent_boot_check,
        command_prog=BOOT_CHECK_PROG))


def _add_boot_check(asub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from modelward._inputs import number

    a = asub.add_parser("boot-check", help="verify the active model at boot, else fall back")
    a.add_argument("--tpm-wait", type=number(0, MAX_TPM_WAIT), metavar="SECONDS",
                   help="how long to wait for a TPM that does not answer yet "
                        "(default: [agent] tpm_wait, 120)")
    a.set_defaults(func=_agent_boot_check)


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: for ``agent boot-check``, one that has only that command.

    Building every command's parser imports operator and tester modules (choices, option
    groups); boot-check runs before inference on every boot and loads only what booting
    needs (issue 15, tests/integration/test_i15_boot_imports.py).
    """
    p = _top_parser()
    takes_value = {o for a in p._actions if a.nargs != 0 for o in a.option_strings}
    words: list[str] = []
    args = iter(argv)
    for arg in args:  # the first two words, skipping the global options and their values
        if arg == "--":  # (everything after is a word: rare, the full parser says it right)
            return build_parser()
        if arg in takes_value:
            next(args, None)
        elif not arg.startswith("-"):
            words.append(arg)
        if len(words) == 2:
            break
    if words != ["agent", "boot-check"]:
        return build_parser()
    sub = p.add_subparsers(dest="group", required=True, metavar="COMMAND")
    agent = sub.add_parser("agent", help=AGENT_HELP)
    asub = agent.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    _add_boot_check(asub)
    _add_config_option(asub.choices["boot-check"])
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    import argparse
    from datetime import timedelta

    from modelward._inputs import duration, local_path, number, whole

    p = _top_parser()
    sub = p.add_subparsers(dest="group", required=True, metavar="COMMAND")

    repo = sub.add_parser("repo", help="operator: manage the TUF repository")
    rsub = repo.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    r = rsub.add_parser("init", help="create keys and a new repository",
                        description="Create the role keys and version 1 of the metadata.",
                        epilog=_OFFLINE_ADVICE,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--repo", type=local_path, required=True,
                   help="served directory (metadata/, targets/)")
    r.add_argument("--keys", type=local_path, required=True, help="key directory, outside --repo")
    r.add_argument("--threshold", action="append", metavar="ROLE=N",
                   help="signatures a role needs (default 1; repeatable)")
    r.add_argument("--keys-per-role", action="append", metavar="ROLE=N",
                   help="encrypted-file keys made for a role (default 1; repeatable)")
    r.add_argument("--expiry", action="append", metavar="ROLE=DURATION",
                   help="metadata lifetime, e.g. timestamp=1d, root=365d (repeatable; "
                        "kept in KEYS/expiry.json, see `repo set-expiry`)")
    r.add_argument("--online-dir", type=local_path, metavar="DIR",
                   help="put the snapshot and timestamp keys here, apart from --keys (the "
                        "online host's directory; passphrases MODELWARD_KEY_PASSPHRASE_SNAPSHOT "
                        "and _TIMESTAMP)")
    r.set_defaults(func=_repo_init)
    r = rsub.add_parser("delegate", help="give a team its own key for some model paths")
    r.add_argument("name", help="the delegated role (team) name")
    r.add_argument("--paths", nargs="+", required=True, metavar="PATTERN",
                   help='target path patterns, e.g. "detector/*"')
    r.add_argument("--parent", default="targets",
                   help="the delegating role: top-level targets, or a team whose key is here")
    r.add_argument("--non-terminating", action="store_true",
                   help="let TUF's search go on to later roles for these paths")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_delegate)
    r = rsub.add_parser("sign", help="add a signature to metadata waiting for its threshold")
    r.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    r.add_argument("--key", required=True, metavar="URI",
                   help="encfile:NAME.pem, hsm:N?label=L, or another securesystemslib URI")
    r.add_argument("--yes", action="store_true",
                   help="sign without asking (the change summary is still printed)")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_sign)
    r = rsub.add_parser("add-key", help="add an HSM, KMS or envvar: key to a role")
    r.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    r.add_argument("--hsm-keyid", type=int, help="CKA_ID of the key on the token")
    r.add_argument("--token-label", help="PKCS#11 token label")
    r.add_argument("--uri", help="any other signer URI: envvar:NAME, gcpkms:…, awskms:…, …")
    r.add_argument("--public-key", type=local_path, help="PEM public key of the --uri key")
    r.add_argument("--threshold", type=whole(1), help="the role's new threshold")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_add_key)
    r = rsub.add_parser("policy", help="the provenance policy: which model signers each "
                        "model needs (pinned by root)")
    psub = r.add_subparsers(dest="policy_cmd", required=True, metavar="ACTION")
    pp = psub.add_parser("set", help="publish a policy file and stage the root that pins it")
    pp.add_argument("policy", type=local_path, metavar="POLICY",
                   help="JSON: format, rules (name, models, signers); key files may be "
                   "named by public_key_file / certificate_chain_file")
    pp.add_argument("--repo", type=local_path, required=True)
    pp.add_argument("--keys", type=local_path, required=True)
    pp.set_defaults(func=_repo_policy_set)
    pp = psub.add_parser("show", help="print the policy the published root pins")
    pp.add_argument("--json", action="store_true", help="one JSON object")
    pp.add_argument("--repo", type=local_path, required=True)
    pp.add_argument("--keys", type=local_path, required=True)
    pp.set_defaults(func=_repo_policy_show)
    r = rsub.add_parser("rotate", help="replace a role's key (root: chained, devices re-anchor)")
    r.add_argument("role", choices=["root", "targets", "snapshot", "timestamp"])
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_rotate)
    r = rsub.add_parser("rekey", help="re-encrypt key files with scrypt (and new passphrases)",
                        description="Rewrite every encrypted key file under KEYS (or those "
                        "of ROLE...) as scrypt PKCS#8, atomically and mode 0600. Files "
                        "already at the current KDF are kept; new passphrases come from "
                        "MODELWARD_NEW_KEY_PASSPHRASE[_<ROLE>] or --new-passphrase prompts, "
                        "else each file keeps its passphrase.")
    r.add_argument("roles", nargs="*", metavar="ROLE",
                   help="top-level roles or team names (default: every key file)")
    r.add_argument("--new-passphrase", action="store_true",
                   help="prompt for a new passphrase per role")
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_rekey)
    r = rsub.add_parser("refresh", help="re-sign timestamp (and snapshot when due); for a timer")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, help="key directory (single-machine layout)")
    r.add_argument("--online-dir", type=local_path, metavar="DIR",
                   help="the online keys only (the online host; KEYS is never opened)")
    r.set_defaults(func=_repo_refresh)
    r = rsub.add_parser(
        "sync", help="upload the repository to s3://BUCKET/PREFIX or a directory (a CDN "
        "origin): targets and versioned metadata first, timestamp.json last",
        description="Upload what devices fetch (metadata/, targets/) in the order that "
        "keeps every device consistent: targets, versioned metadata, then timestamp.json "
        "last; only new or changed files (size and sha256). Versioned and hash-prefixed "
        "files get 'Cache-Control: public, max-age=31536000, immutable', timestamp.json "
        "'no-cache'. Nothing is deleted. S3 credentials come from boto3's usual chain "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role).")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--to", required=True, metavar="DEST",
                   help="s3://BUCKET/PREFIX, or a local directory (written atomically per "
                        "file, symlinks refused)")
    r.add_argument("--endpoint-url", metavar="URL",
                   help="an S3-compatible endpoint (MinIO, Ceph, R2, moto), path-style")
    r.add_argument("--region", help="the bucket's region (default: boto3's configuration)")
    r.add_argument("--dry-run", action="store_true",
                   help="print what would be uploaded, in order; write nothing")
    r.set_defaults(func=_repo_sync)
    r = rsub.add_parser(
        "export", help="write a self-contained repository snapshot to local media (a USB "
        "stick) for `agent update --once --from DIR`",
        description="Copy what is published (as `repo sync` decides it) onto a medium: "
        "every N.root.json, timestamp.json, the snapshot and the targets metadata it "
        "names (top-level and delegated) under the names devices fetch, and the targets "
        "of the chosen models (their releases and chunk indexes) plus every top-level "
        "_modelward/ target, hash-prefixed. Each file is written to a temporary name and "
        "renamed, never through a symlink; timestamp.json last, then modelward-export.json "
        "(informational). A medium holding an earlier export of this repository gets what "
        "changed.")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--to", type=local_path, required=True, metavar="DIR",
                   help="the medium's directory (made if absent; its parent must exist)")
    r.add_argument("--model", action="append", metavar="NAME",
                   help="export this model's releases only (repeatable; default: all)")
    r.set_defaults(func=_repo_export)
    r = rsub.add_parser("status", help="version, expiry, threshold and signatures per role")
    r.add_argument("--json", action="store_true", help="one JSON array of the rows")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_status)
    r = rsub.add_parser("set-expiry", help="change metadata lifetimes and expiry warnings")
    r.add_argument("lifetimes", nargs="*", metavar="ROLE=DURATION",
                   help="e.g. timestamp=1d targets=180d (units w, d, h, m, s)")
    r.add_argument("--warn", action="append", metavar="ROLE=DURATION",
                   help="warn this long before ROLE expires (defaults: root and targets "
                        "30d, snapshot 1d, timestamp 6h)")
    r.add_argument("--repo", type=local_path, required=True)
    r.add_argument("--keys", type=local_path, required=True)
    r.set_defaults(func=_repo_set_expiry)

    bundle = sub.add_parser("bundle", help="operator: build model bundles")
    bsub = bundle.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    b = bsub.add_parser("build", help="write a v1 bundle from an ONNX model")
    b.add_argument("model", type=local_path, help="the .onnx file")
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True, help="semantic version")
    b.add_argument("--vectors", type=local_path,
                   help=".npz with input:<name>/output:<name> arrays; "
                   "generated with onnxruntime if absent")
    b.add_argument("--extra", action="append", metavar="SRC:PATH", help="add a file (repeatable)")
    b.add_argument("--rtol", type=number(0), default=1e-4)
    b.add_argument("--atol", type=number(0), default=1e-5)
    b.add_argument("--seed", type=int, default=0, help="seed of generated test inputs")
    b.add_argument("--model-signature", type=local_path, metavar="FILE",
                   help="the training team's model-signing signature of the model file "
                   "(carried as model.sig; verified against --signer-key, --signer-chain "
                   "or --policy)")
    b.add_argument("--signer-key", type=local_path, action="append", metavar="PEM",
                   help="a trusted model signer's EC public key (repeatable)")
    b.add_argument("--signer-chain", type=local_path, metavar="PEM",
                   help="CA certificate(s) a certificate-signed model chains to")
    b.add_argument("--signer-identity", metavar="ID",
                   help="with --signer-chain: the e-mail, URI or DNS name the signing "
                   "certificate must carry")
    b.add_argument("--policy", type=local_path, metavar="FILE",
                   help="verify against the signers this provenance policy gives the model")
    b.add_argument("--provenance", type=local_path, metavar="FILE",
                   help="a signed SLSA provenance attestation of the model file (`modelward "
                   "provenance sign`), carried as provenance.dsse.json")
    b.add_argument("--encrypt-for", metavar="DEVICE[,DEVICE...]",
                   help="encrypt the model files for these enrolled devices (their TPM "
                   "decryption keys); the model's content key is kept in --fleet-dir and "
                   "replaced when the recipients change")
    b.add_argument("--fleet-dir", type=local_path, metavar="DIR",
                   help="with --encrypt-for: the fleet directory of `fleet enroll`")
    b.add_argument("-o", "--output", type=local_path, required=True)
    b.set_defaults(func=_bundle_build)
    b = bsub.add_parser("inspect", help="print a bundle's manifest, model signature and "
                        "provenance (verifies the bundle's own hashes, nobody's signature)")
    b.add_argument("bundle", type=local_path, metavar="BUNDLE")
    b.add_argument("--json", action="store_true", help="one JSON object")
    b.set_defaults(func=_bundle_inspect)
    d = bsub.add_parser("diff", help="bytes a device on OLD fetches for NEW (chunk index)")
    d.add_argument("old", type=local_path, metavar="OLD", help="the earlier bundle file")
    d.add_argument("new", type=local_path, metavar="NEW", help="the new bundle file")
    d.add_argument("--json", action="store_true", help="one JSON object")
    d.set_defaults(func=_bundle_diff)

    prov = sub.add_parser("provenance", help="training side: attest how a model was built")
    prsub = prov.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    pr = prsub.add_parser("sign", help="write a signed SLSA v1 provenance attestation (in-toto "
                          "statement, DSSE) of a model file")
    pr.add_argument("model", type=local_path, metavar="MODEL", help="the model file")
    pr.add_argument("--key", type=local_path, required=True,
                    help="the builder's EC private key (PEM, unencrypted)")
    pr.add_argument("--builder-id", required=True, metavar="URI",
                    help="the SLSA builder id (what the policy's builders name)")
    pr.add_argument("--dataset", action="append", metavar="NAME=sha256:HEX",
                    help="a training dataset and its digest (repeatable)")
    pr.add_argument("--source", metavar="URI", help="the training code, e.g. git+https://…@COMMIT")
    pr.add_argument("--param", action="append", metavar="KEY=VALUE",
                    help="a training parameter (repeatable)")
    pr.add_argument("-o", "--output", type=local_path, required=True)
    pr.set_defaults(func=_provenance_sign)

    pub = sub.add_parser("publish", help="operator: sign and publish a bundle")
    pub.add_argument("--repo", type=local_path, required=True)
    pub.add_argument("--keys", type=local_path, required=True)
    pub.add_argument("bundle", type=local_path)
    pub.add_argument("--channel", default="stable", help="release channel (default: stable)")
    pub.add_argument("--role", help="publish as this delegated (team) role, with its key")
    pub.add_argument("--sign-with", action="append", metavar="URI",
                     help="targets key to sign with (repeatable; default: the first key)")
    pub.add_argument("--rollout", type=number(0, 100), default=100.0, metavar="PCT",
                     help="share of the channel's devices eligible at first (default: 100)")
    pub.add_argument("--announce", action="store_true",
                     help="announce the new timestamp over MQTT afterwards")
    pub.add_argument("--unsafe-plaintext", action="store_true",
                     help="publish a bundle that is not encrypted although the model's "
                     "newest release is (its weights then reach the origin in the clear)")
    _add_broker_options(pub, required=False)
    pub.set_defaults(func=_publish)

    ro = sub.add_parser("rollout", help="operator: phased rollout, halt, pin-back")
    rosub = ro.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = rosub.add_parser("set", help="change a release's rollout percentage, halt or resume it")
    x.add_argument("name")
    x.add_argument("version")
    x.add_argument("--percent", type=number(0, 100))
    g = x.add_mutually_exclusive_group()
    g.add_argument("--halt", action="store_true", help="no further device installs it")
    g.add_argument("--resume", action="store_true")
    x = rosub.add_parser("pin", help="devices on the channel run this version, even if older")
    x.add_argument("name")
    x.add_argument("version")
    x = rosub.add_parser("unpin", help="back to the newest eligible release")
    x.add_argument("name")
    x = rosub.add_parser("withdraw", help="take a bad release out of the signed targets")
    x.add_argument("name")
    x.add_argument("version")
    for x in rosub.choices.values():
        x.add_argument("--repo", type=local_path, required=True)
        x.add_argument("--keys", type=local_path, required=True)
    ro.set_defaults(func=_rollout)

    ann = sub.add_parser("announce", help="operator: publish the retained MQTT update hint")
    ann.add_argument("--repo", type=local_path, required=True)
    _add_broker_options(ann, required=True)
    ann.set_defaults(func=_announce)

    srv = sub.add_parser("serve-mqtt", help="operator: answer device block requests over MQTT")
    srv.add_argument("--repo", type=local_path, required=True)
    srv.add_argument("--group", help="shared-subscription group, a secret of at least 20 "
                     "characters (default: derived from the bridge's password or key)")
    from modelward.publisher._fairness import add_limit_options

    add_limit_options(srv)
    _add_broker_options(srv, required=True)
    srv.set_defaults(func=_serve_mqtt)

    fleet = sub.add_parser("fleet", help="operator: fleet and broker set-up")
    fsub = fleet.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    f = fsub.add_parser("broker-config",
                        help="mosquitto dynamic-security file, settings fragment and "
                        "per-device credentials")
    f.add_argument("--fleet", required=True)
    f.add_argument("--devices", required=True, help="comma-separated device ids")
    f.add_argument("-o", "--output", type=local_path, required=True)
    f.add_argument("--dynsec-plugin", type=local_path, default=None,
                   help="path of mosquitto_dynamic_security.so on the broker host "
                   "(default: the one installed here)")
    f.add_argument("--rotate", nargs="?", const="*", default=None, metavar="USERS",
                   help="new passwords for these comma-separated identities (device ids, "
                   "modelward-bridge, modelward-operator), or for all if none are given; "
                   "otherwise existing credentials in the output directory are kept")
    f.add_argument("--format", choices=("mosquitto", "emqx"), default="mosquitto",
                   help="mosquitto: dynamic-security.json and modelward.conf; emqx: "
                   "emqx/users.json, emqx/authz-rules.json, emqx/modelward.hocon for an "
                   "EMQX 5 cluster (same identities, passwords and ACL)")
    f.add_argument("--broker-group", default=None, metavar="GROUP",
                   help="the group that may read dynamic-security.json (mode 0640); "
                   "default: mosquitto, if it exists and may be given")
    f.set_defaults(func=_fleet_broker_config)
    f = fsub.add_parser("add-device", help="record a device's enrolled TPM identity key: "
                        "from its PEM (--key), or by credential activation (--enrollment "
                        "FILE --challenge OUT, then --response R; docs/attestation.md)")
    f.add_argument("--fleet-dir", type=local_path, required=True,
                   help="the operator's fleet registry")
    f.add_argument("--device", required=True)
    how = f.add_mutually_exclusive_group(required=True)
    how.add_argument("--key", type=local_path, help="PEM from `agent enroll`")
    how.add_argument("--enrollment", type=local_path,
                     help="the output of `agent enroll --json`: verify it and write a "
                     "credential challenge to --challenge")
    how.add_argument("--response", type=local_path,
                     help="the output of `agent activate-credential`: record the device")
    f.add_argument("--challenge", type=local_path, metavar="OUT",
                   help="with --enrollment: where to write the challenge for the device")
    f.add_argument("--ek-ca", type=local_path, metavar="PEM",
                   help="with --enrollment: CA certificates the EK certificate must be "
                   "issued by (the TPM manufacturer's)")
    f.set_defaults(func=_fleet_add_device)
    f = fsub.add_parser("status", help="every enrolled device and its signed status report: "
                        "verified, flagged REPLAYED, STALE, FUTURE, OTHER_FLEET or MISSING")
    f.add_argument("--json", action="store_true")
    f.add_argument("--summary", action="store_true",
                   help="counts per model, version, channel and state, rollouts, fallback "
                   "rate, failure reasons, p50/p95 durations (README \"Fleet summary\")")
    _add_fleet_view_options(f, "with --summary: the repository whose releases' rollouts "
                            "to show")
    f.set_defaults(func=_fleet_status)
    f = fsub.add_parser("audit", help="fetch a device's audit log over MQTT (chunked, "
                        "bounded), or read an exported copy (--log), and verify it against "
                        "the head its newest signed status report holds; names the first "
                        "bad entry")
    f.add_argument("--fleet-dir", type=local_path, required=True)
    f.add_argument("--device", required=True)
    f.add_argument("--log", type=local_path, metavar="FILE|DIR",
                   help="verify a copy of the device's state_dir/audit (or its live.jsonl) "
                   "instead of fetching it over MQTT")
    f.add_argument("--timeout", type=number(0, 600, above=True), default=10.0,
                   help="seconds the device may take for each chunk (over MQTT)")
    f.add_argument("--checkpoint", type=local_path, help="the segment's checkpoint.json "
                   "(default: the one in --log's directory)")
    f.add_argument("--status", type=local_path, help="a signed status report to take the "
                   "head from (default: the newest `fleet status` kept)")
    f.add_argument("--head", metavar="SEQ:HASH", help="verify up to this head instead: the "
                   "`audit` of the device's release in `fleet attest --json` (the TPM "
                   "measured it with that event)")
    f.add_argument("--allow-unsigned-tail", action="store_true", help="accept entries after "
                   "the signed head (appended since that report), marked so")
    f.add_argument("--json", action="store_true")
    _add_broker_options(f, required=False)
    f.set_defaults(func=_fleet_audit)
    f = fsub.add_parser("report", help="write the fleet summary as one self-contained HTML "
                        "page of charts (README \"Fleet report\")")
    f.add_argument("-o", "--output", type=local_path, required=True, metavar="FILE",
                   help="the HTML file to write (replaced atomically)")
    _add_fleet_view_options(f, "the repository whose releases' rollouts to show")
    f.set_defaults(func=_fleet_report)
    f = fsub.add_parser("exporter", help="serve the fleet summary as Prometheus metrics "
                        "(README \"Prometheus\")")
    f.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="the one address to serve /metrics on (e.g. 127.0.0.1:9817)")
    f.add_argument("--interval", type=number(1, 86400), default=60.0,
                   help="seconds between refreshes of the summary")
    _add_fleet_view_options(f, "the repository whose releases' rollouts to export")
    f.set_defaults(func=_fleet_exporter)
    _add_attest_parsers(fsub)

    agent = sub.add_parser("agent", help=AGENT_HELP)
    asub = agent.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    a = asub.add_parser("provision", help="create the TPM trust store and anchor the root")
    a.add_argument("--root", type=local_path, required=True, help="the repository's root.json")
    a.add_argument("--keep-identity", action="store_true",
                   help="migrating an older device: keep its enrolled identity key pair "
                   "(see README \"TPM\" for the risk) instead of making a new one")
    a.set_defaults(func=_agent_provision)
    a = asub.add_parser("update", help="check for a newer model and install it")
    a.add_argument("--once", action="store_true",
                   help="one attempt, then exit (what this command always does)")
    a.add_argument("--transport", choices=["https", "mqtt"],
                   help="use only this configured transport for this run")
    a.add_argument("--from", dest="source_dir", type=local_path, metavar="DIR",
                   help="install from the repository snapshot `repo export` wrote to DIR "
                   "(a mounted USB stick or SD card) instead of the network: verified "
                   "exactly as over HTTPS (TPM-anchored root, rollback floor, expiry, "
                   "fingerprint, health check); the config needs no [https] or [mqtt]")
    # (365 days: _install.MAX_EXPIRED_GRACE, not imported by the parser)
    a.add_argument("--expired-grace", type=duration(timedelta(days=365)),
                   metavar="DURATION", help="with --from only, for a device without a "
                   "trustworthy clock: accept metadata that expired less than DURATION "
                   "ago (e.g. 30d; at most 365d; default: none, expired metadata is "
                   "refused); signatures and rollback checks still apply")
    a.set_defaults(func=_agent_update)
    a = asub.add_parser("enroll", help="print the device id and its TPM identity public key")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_agent_enroll)
    a = asub.add_parser("activate-credential", help="answer the operator's enrollment "
                        "challenge with this TPM (ActivateCredential with the AK and EK)")
    a.add_argument("--challenge", type=local_path, required=True,
                   help="the file `fleet add-device --challenge` wrote")
    a.add_argument("--response", type=local_path, required=True, metavar="OUT",
                   help="where to write the response for `fleet add-device --response`")
    a.set_defaults(func=_agent_activate_credential)
    a = asub.add_parser("run", help="the daemon: update on a poll timer and on announcements")
    a.set_defaults(func=_agent_run)
    a = asub.add_parser("status", help="show the active and previous model and the last error")
    a.add_argument("--json", action="store_true", help="one JSON object")
    a.add_argument("--no-tpm", action="store_true", help="do not use the TPM: show the "
                   "files on disk, marked UNVERIFIED (also what happens when it is absent)")
    a.set_defaults(func=_agent_status)
    a = asub.add_parser("audit", help="print this device's audit log (chain and checkpoint "
                        "verified with the TPM identity key)")
    a.add_argument("--json", action="store_true", help="one JSON object")
    a.set_defaults(func=_agent_audit)
    a = asub.add_parser("attest", help="certify the TPM measurement register over a nonce "
                        "with the attestation key and print it with this boot's events (what "
                        "`fleet attest` asks for over MQTT)")
    a.add_argument("--nonce", required=True, metavar="HEX", help="16 to 64 bytes, as hex")
    a.add_argument("--json", action="store_true", help="the answer document")
    a.set_defaults(func=_agent_attest)
    _add_boot_check(asub)
    a = asub.add_parser("check-config", help="validate the config and print every setting "
                        "with its effective value (secrets as <set>)")
    a.set_defaults(func=_agent_check_config)
    for a in asub.choices.values():  # every agent command reads the same file
        _add_config_option(a)

    from modelward.simulator._catalogue import ATTACK_NAMES, FAULT_NAMES

    sim = sub.add_parser("sim", help="tester: simulated TPMs and fleets, attacks, faults, demo")
    ssub = sim.add_subparsers(dest="cmd", required=True, metavar="ACTION")
    tpm = ssub.add_parser("tpm", help="software TPM (swtpm)")
    tsub = tpm.add_subparsers(dest="tpm_cmd", required=True, metavar="ACTION")
    t = tsub.add_parser("start", help="manufacture (first time) and start; prints the TCTI")
    t.add_argument("--state", type=local_path, required=True)
    t.add_argument("--port", type=whole(1, 65534), help="server port (control port is +1)")
    t.add_argument("--ek-ca", type=local_path, metavar="DIR",
                   help="on first start: issue EK and platform certificates from a local CA "
                   "kept in DIR (created if needed), as a TPM manufacturer does")
    t.set_defaults(func=_sim_tpm_start)
    t = tsub.add_parser("stop", help="stop by pid")
    t.add_argument("--state", type=local_path, required=True)
    t.set_defaults(func=_sim_tpm_stop)
    fl = ssub.add_parser("fleet", help="a simulated fleet: mosquitto, nginx, bridge, N agents")
    flsub = fl.add_subparsers(dest="action", required=True, metavar="ACTION")
    f = flsub.add_parser("up", help="start N devices (own swtpm and state dir each)")
    f.add_argument("--devices", type=whole(1, 1000), default=3)
    f.add_argument("--poll", type=number(0, above=True), default=10.0,
                   help="agents' poll interval in seconds (default: 10)")
    f.add_argument("--announce-spread", type=number(0, hi=86400), default=0.0,
                   help="agents' [agent] announce_spread in seconds: each answers an "
                        "announcement after a random delay up to this (default: 0, at once)")
    f = flsub.add_parser("down", help="stop everything by pid")
    f = flsub.add_parser("publish", help="build, publish and announce the next good release")
    f.add_argument("--version", help="default: the next major version")
    flsub.add_parser("enroll", help="enroll every device in DIR/operator by credential "
                     "activation and print the `fleet attest` command for the fleet")
    f = flsub.add_parser("status", help="what each device runs")
    f.add_argument("--json", action="store_true")
    for f in flsub.choices.values():
        f.add_argument("--dir", type=local_path, required=True, help="the fleet's directory")
    fl.set_defaults(func=_sim_fleet)
    for kind, names in (("attack", ATTACK_NAMES), ("fault", FAULT_NAMES)):
        sc = ssub.add_parser(kind, help=f"apply one {kind} to the running fleet and report "
                             "what each device did" + (", then clear it and await recovery"
                                                       if kind == "fault" else ""))
        sc.add_argument("name", choices=names)
        sc.add_argument("--dir", type=local_path, required=True, help="the fleet's directory")
        sc.add_argument("--timeout", type=number(0, above=True), default=150.0,
                        help="seconds to wait for the devices (default: 150)")
        sc.add_argument("--json", action="store_true")
        sc.set_defaults(func=_sim_scenario)
    rp = ssub.add_parser("report", help="start a fleet, run every attack and fault, print "
                         "the table (exit 1 if any scenario did not behave)")
    rp.add_argument("--devices", type=whole(1, 1000), default=3)
    rp.add_argument("--dir", type=local_path, default=Path("fleet-report"), help="work directory")
    rp.add_argument("-o", "--output", type=local_path, help="also write the table here")
    rp.set_defaults(func=_sim_report)
    d = ssub.add_parser("demo", help="the end-to-end demo on loopback (swtpm + nginx)")
    d.add_argument("--dir", type=local_path, default=Path("demo-run"), help="work directory")
    d.set_defaults(func=_sim_demo)
    return p


@contextlib.contextmanager
def _no_cycle_collection(on: bool = True, *, freeze: bool = False) -> Iterator[None]:
    """If ``on``, no cyclic garbage collection inside (as it was after); ``freeze``: what
    was made inside is frozen after (``gc.freeze``: never walked by a later collection,
    nor at the exit).

    For boot-check (``on``): a short process whose memory goes at its exit; the collector
    walked the objects the TPM library's import makes, 5 ms of the boot unit's time on a
    small model (issue 15). Around a command's imports (``freeze``): imports make
    long-lived objects only, yet the collector walked all of them again and again as they
    grew: for ``agent update`` (TUF, securesystemslib's signers, requests, paho, ours:
    0.25 s of imports) 70-100 ms of a process's start and teardown (issue 16,
    benchmarks/README.md); the collector is on again for the command itself (a
    transfer's cycles are collected as before: the peak RSS stays flat)."""
    import gc

    if not on or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        gc.enable()


def _end_process(code: int) -> None:
    """End the process now with ``code``, without the interpreter's teardown (a third of
    what the boot unit waits for on a small model: freeing every module of the TPM library
    and ours, 14-18 ms; for ``agent update`` with TUF, requests and paho loaded, 40-80 ms
    more of every install, issue 16). Only once everything is written: the log handlers closed,
    stdout and stderr flushed (a stream that is None, its descriptor closed at start, has
    nothing to flush); returns instead (the usual exit follows) while another thread runs
    or if anything fails while flushing, for the interpreter to report it (never as the
    command's error: an output problem is no internal error)."""
    import logging
    import threading

    if threading.active_count() > 1:
        return
    try:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            # (None: the descriptor was closed when Python started; print wrote nothing to
            # it, so there is nothing to lose and the code stays the command's)
            if stream is not None:
                stream.flush()
    except Exception:  # noqa: BLE001 - (a closed pipe, a full device, a stream replaced by
        return  # a broken one: an output problem, never the command's; the usual exit says so)
    os._exit(code)


def _null_for_closed_streams() -> None:
    """``sys.stdout`` or ``sys.stderr`` that is None (its descriptor was closed when Python
    started, e.g. ``>&-`` or a service's closed descriptor) writes to /dev/null instead,
    as a closed stream discards: every write and flush of the command works, so a boot
    check still checks, falls back and ends with its own code, not an AttributeError."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - (for the process)


def _parse(argv: Sequence[str]) -> argparse.Namespace | int:
    """``argv`` parsed, or the exit code of a usage error (one line), --help or --version,
    once what the parser wrote is reported."""
    import io

    from modelward._inputs import mark_commands

    parser = mark_commands(_parser_for(argv))
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line), --help, --version
        code = e.code if isinstance(e.code, int) else EXIT_USAGE
        from modelward.agent._log import report_usage

        report_usage(usage.getvalue(), argv, error=code != 0)
        return code
    sys.stderr.write(usage.getvalue())
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code.

    Every error ends in one line (and a hint) on stderr, or one JSON record under
    journald: a modelward error (exit 1); an ``OSError`` or ``ValueError`` that escaped
    the checks where input is read, which names what it can (exit 1, and the hint says
    how to report it if no input is at fault); anything else is a bug (exit 70). The
    traceback is shown with ``--debug``; under journald, a bug's traceback is in its
    record.
    """
    # The TSS libraries print their own warnings to stderr; our errors say it better.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    _null_for_closed_streams()
    from_entry_point = argv is None
    argv = sys.argv[1:] if argv is None else argv
    plain = _boot_unit_args(argv)  # (the boot unit's command line: no parser, issue 15)
    parsed = plain if plain is not None else _parse(argv)
    if isinstance(parsed, int):
        return parsed
    args = parsed
    if getattr(getattr(args, "func", None), "__name__", "").startswith("_agent_"):
        # securesystemslib.signer (imported with tuf) imports boto3 for its AWS KMS signer
        # when boto3 is installed (beside the operator extra: `repo sync`): +150-260 ms,
        # and multiprocessing's atexit hook, for every agent command; no device command
        # signs with a cloud key, so there it stays unimported.
        sys.modules.setdefault("boto3", None)  # type: ignore[arg-type]
    from modelward.agent._log import LOG_FORMAT_ENV, LOG_FORMATS, report_error, setup_logging
    from modelward.agent.errors import DeviceBusyError
    from modelward.trust.errors import ModelwardError, OperatorInputError

    args.log_format = args.log_format or os.environ.get(LOG_FORMAT_ENV) or "auto"
    if args.log_format not in LOG_FORMATS:
        fmt = setup_logging(0, "auto")  # (a record under journald, like any error)
        report_error(OperatorInputError(
            f"${LOG_FORMAT_ENV} '{args.log_format}': not one of {', '.join(LOG_FORMATS)}"),
            fmt=fmt, hint="see `modelward --help`", one_line=True)
        return EXIT_USAGE
    fmt = setup_logging(args.verbose + (1 if args.group == "agent" else 0), args.log_format)
    args.log_used = fmt
    help_hint = f"see `{getattr(args, 'command_prog', 'modelward')} --help`"
    try:
        if args.group in ("repo", "publish", "rollout") and args.func is not _repo_status \
                and isinstance(getattr(args, "repo", None), Path):
            from modelward.publisher._lock import repository_lock

            with repository_lock(args.repo):  # one repository-changing command at a time
                return int(args.func(args))
        boot = args.func is _agent_boot_check
        with _no_cycle_collection(boot):
            code = int(args.func(args))
            if from_entry_point and (boot or args.func is _agent_update):
                _end_process(code)
        return code
    except DeviceBusyError as e:  # refused before it touched anything: run it again later
        report_error(e, fmt=fmt, hint=e.hint, traceback=args.debug, one_line=True)
        return EXIT_BUSY
    except ModelwardError as e:
        report_error(e, fmt=fmt, hint=e.hint or help_hint, traceback=args.debug)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - each kind gets one line, never silent
        from modelward._extras import missing_package

        missing = missing_package(e, args)  # a package of another role's extra
        if missing is not None:
            report_error(e, fmt=fmt, message=missing[0], hint=missing[1],
                         traceback=args.debug)
            return EXIT_ERROR
        if isinstance(e, OSError):  # a file or socket no check caught: name and reason
            what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
            report_error(e, fmt=fmt, traceback=args.debug, message=what,
                         hint="check that path and its permissions")
            return EXIT_ERROR
        if isinstance(e, ValueError):  # e.g. undecodable bytes in a file no check caught
            report_error(e, fmt=fmt, traceback=args.debug or fmt == "json",
                         hint="check the files and arguments given; if none is at fault, "
                         "this is a bug: rerun with --debug and report it")
            return EXIT_ERROR
        report_error(e, fmt=fmt, prefix=f"modelward: internal error: {type(e).__name__}",
                     traceback=args.debug or fmt == "json",
                     hint="this is a bug: rerun with --debug for the traceback and report it")
        return EXIT_BUG
