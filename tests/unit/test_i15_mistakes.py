"""Issue 15, must-show 5 (mistakes): every subcommand of ``modelward``, given an operator
mistake (a missing, unreadable or malformed file, a bad URL, a bad number, a missing
bundle), says so in exactly one line that names the thing at fault and gives a hint,
exits non-zero, and never prints a traceback.

The subcommands are enumerated from the argument parser itself: a new subcommand without
a row in :data:`CASES` fails :func:`test_every_subcommand_is_walked`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelward import cli
from modelward.simulator._demo import write_device_config


@dataclass(frozen=True)
class Files:
    """Inputs an operator gets wrong, made once per module."""

    tmp: Path
    missing: Path  # does not exist
    under_file: Path  # a path below a regular file: ENOTDIR, unreadable even for root
    adir: Path  # a directory where a file is expected
    garbage: Path  # bytes that are no JSON, TOML, PEM, tar, npz or ONNX
    repo: Path  # a valid repository ...
    keys: Path  # ... and its keys
    conf: Path  # a valid agent config (its TPM is not running)
    bundle: Path  # a file that is not a bundle
    fleet: Path  # a directory that holds no fleet
    model: Path  # a valid ONNX model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    from modelward.publisher._keyfile import ScryptParams
    from modelward.publisher._repo import Repository

    t = tmp_path_factory.mktemp("mistakes")
    (t / "afile").write_text("a file\n")
    (t / "adir").mkdir()
    (t / "garbage").write_bytes(b"\xff\x00{not [json] = toml -----BEGIN nothing\n")
    (t / "fleet").mkdir()
    from modelward.publisher._bundle_build import _graph_io, generate_vectors
    from modelward.simulator._models import make_linear_model

    for name, seed in (("model", 1), ("other", 2)):  # vectors of each
        make_linear_model(t / f"{name}.onnx", seed)
        generate_vectors(t / f"{name}.onnx", _graph_io(t / f"{name}.onnx")[1], 0,
                         t / f"{name}.npz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT", ScryptParams(2**10, 8, 1))
        Repository(t / "repo", t / "keys", PASSPHRASE.encode()).init()
    (t / "ca.pem").write_text("not checked before the TLS handshake\n")  # the config needs it
    conf = write_device_config(t / "agent.toml", device_id="dev-1", state=t / "state",
                               tcti="swtpm:host=127.0.0.1,port=9", origin_url="https://127.0.0.1:9",
                               ca=t / "ca.pem")
    yield Files(t, t / "missing.file", t / "afile" / "below", t / "adir", t / "garbage",
                t / "repo", t / "keys", conf, t / "garbage", t / "fleet",
                t / "model.onnx")


PASSPHRASE = "modelward test passphrase"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("MODELWARD_LOG_FORMAT", raising=False)
    monkeypatch.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT",
                        __import__("modelward.publisher._keyfile", fromlist=["x"])
                        .ScryptParams(2**10, 8, 1))
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield
    root.handlers[:] = saved
    root.setLevel(level)


# (subcommand path, argv after it with {placeholders} of Files, what the line must name).
# A number's case also gives a bad directory: should its check go, nothing starts.
Case = tuple[str, list[str], str]

R = ["--repo", "{repo}", "--keys", "{keys}"]
B = ["--broker", "mqtts://127.0.0.1:9", "--fleet", "f1"]

CASES: list[Case] = [
    # repo
    ("repo init", ["--repo", "{under_file}", "--keys", "{tmp}/k2"], "{under_file}"),
    ("repo init", ["--repo", "{tmp}/r3", "--keys", "{tmp}/k3", "--threshold", "root=x"],
     "--threshold"),
    ("repo init", ["--repo", "{tmp}/r4", "--keys", "{tmp}/k4", "--expiry", "root=soon"],
     "--expiry"),
    ("repo delegate", ["team", "--paths", "t/*", "--repo", "{missing}", "--keys", "{keys}"],
     "{missing}"),
    ("repo delegate", ["team", "--paths", "t/*", "--repo", "{repo}", "--keys", "{missing}"],
     "{missing}"),
    ("repo sign", ["root", "--key", "encfile:nope.pem", "--yes", *R], "root"),
    ("repo sign", ["root", "--key", "encfile:x", "--yes", "--repo", "{missing}",
                   "--keys", "{keys}"], "{missing}"),
    ("repo add-key", ["targets", "--uri", "envvar:X", "--public-key", "{missing}", *R],
     "{missing}"),
    ("repo add-key", ["targets", "--uri", "envvar:X", "--public-key", "{garbage}", *R],
     "{garbage}"),
    ("repo add-key", ["targets", "--uri", "envvar:X", "--public-key", "{adir}", *R],
     "{adir}"),
    ("repo add-key", ["targets", "--uri", "envvar:X", "--public-key", "{under_file}", *R],
     "{under_file}"),
    ("repo add-key", ["targets", "--threshold", "zero", *R], "--threshold"),
    ("repo rotate", ["timestamp", "--repo", "{garbage}", "--keys", "{keys}"], "{garbage}"),
    ("repo rotate", ["timestamp", "--repo", "{repo}", "--keys", "{under_file}"],
     "{under_file}"),
    ("repo rekey", ["--keys", "{missing}"], "{missing}"),
    ("repo rekey", ["--keys", "{garbage}"], "{garbage}"),
    ("repo refresh", ["--repo", "{missing}", "--keys", "{keys}"], "{missing}"),
    ("repo refresh", ["--repo", "{repo}", "--online-dir", "{missing}"], "{missing}"),
    ("repo sync", ["--repo", "{missing}", "--to", "{tmp}/www"], "{missing}"),
    ("repo export", ["--repo", "{missing}", "--to", "{tmp}/usb"], "{missing}"),
    ("repo export", ["--repo", "{adir}", "--to", "{tmp}/usb"], "{adir}"),
    ("repo export", ["--repo", "{repo}", "--to", "{under_file}"], "{under_file}"),
    ("repo sync", ["--repo", "{adir}", "--to", "{tmp}/www"], "{adir}"),
    ("repo sync", ["--repo", "{repo}", "--to", "https://cdn.example/r"], "--to"),
    ("repo sync", ["--repo", "{repo}", "--to", "s3://b-1/../x"], "'..'"),
    ("repo status", ["--repo", "{missing}", "--keys", "{keys}"], "{missing}"),
    ("repo status", ["--repo", "{adir}", "--keys", "{keys}"], "{adir}"),
    ("repo set-expiry", ["timestamp=1x", *R], "timestamp: '1x'"),
    ("repo set-expiry", ["timestamp=1d", "--repo", "{repo}", "--keys", "{under_file}"],
     "{under_file}"),
    # bundle
    ("bundle diff", ["{missing}", "{garbage}"], "{missing}"),
    ("bundle diff", ["{garbage}", "{garbage}"], "{garbage}"),
    ("bundle diff", ["{adir}", "{adir}"], "{adir}"),
    ("bundle build", ["{missing}", "--name", "m", "--version", "1.0.0", "-o", "{tmp}/o.tar"],
     "{missing}"),
    ("bundle build", ["{garbage}", "--name", "m", "--version", "1.0.0", "-o", "{tmp}/o.tar"],
     "{garbage}"),
    ("bundle build", ["{adir}", "--name", "m", "--version", "1.0.0", "-o", "{tmp}/o.tar"],
     "{adir}"),
    ("bundle build", ["{garbage}", "--name", "m", "--version", "1.0.0", "--vectors",
                      "{missing}", "-o", "{tmp}/o.tar"], "{missing}"),
    ("bundle build", ["{model}", "--name", "m", "--version", "1.0.0", "--vectors",
                      "{garbage}", "-o", "{tmp}/o.tar"], "{garbage}"),
    ("bundle build", ["{model}", "--name", "m", "--version", "1.0.0", "--vectors",
                      "{model}", "-o", "{tmp}/o.tar"], "{model}"),
    ("bundle build", ["{model}", "--name", "m", "--version", "1.0.0", "--vectors",
                      "{tmp}/other.npz", "-o", "{tmp}/o.tar"], "{tmp}/other.npz"),
    ("bundle build", ["{model}", "--name", "m", "--version", "not-semver", "-o",
                      "{tmp}/o.tar"], "not-semver"),
    ("bundle build", ["{garbage}", "--name", "m", "--version", "1.0.0", "--rtol", "nan",
                      "-o", "{tmp}/o.tar"], "--rtol"),
    ("bundle build", ["{garbage}", "--name", "m", "--version", "1.0.0", "--extra",
                      "{missing}:x", "-o", "{tmp}/o.tar"], "{missing}"),
    ("bundle build", ["{garbage}", "--name", "m", "--version", "1.0.0",
                      "-o", "{under_file}"], "{under_file}"),
    ("bundle build", ["{model}", "--name", "m", "--version", "1.0.0", "--model-signature",
                      "{garbage}", "--signer-key", "{garbage}", "-o", "{tmp}/o.tar"],
     "{garbage}"),
    ("bundle build", ["{model}", "--name", "m", "--version", "1.0.0", "--model-signature",
                      "{missing}", "--signer-key", "{garbage}", "-o", "{tmp}/o.tar"],
     "{missing}"),
    ("bundle build", ["{model}", "--name", "m", "--version", "1.0.0", "--provenance",
                      "{garbage}", "-o", "{tmp}/o.tar"], "{garbage}"),
    ("bundle inspect", ["{missing}"], "{missing}"),
    ("bundle inspect", ["{garbage}"], "{garbage}"),
    ("bundle inspect", ["{adir}"], "{adir}"),
    ("repo policy set", ["{missing}", *R], "{missing}"),
    ("repo policy set", ["{garbage}", *R], "provenance policy"),
    ("repo policy show", ["--repo", "{missing}", "--keys", "{keys}"], "{missing}"),
    # provenance (the training side)
    ("provenance sign", ["{model}", "--key", "{garbage}", "--builder-id", "x", "-o",
                         "{tmp}/p.json"], "--key"),
    ("provenance sign", ["{missing}", "--key", "{garbage}", "--builder-id", "x", "-o",
                         "{tmp}/p.json"], "{missing}"),
    ("provenance sign", ["{model}", "--key", "{garbage}", "--builder-id", "x", "--dataset",
                         "nodigest", "-o", "{tmp}/p.json"], "--dataset"),
    # publish
    ("publish", [*R, "{missing}"], "{missing}"),
    ("publish", [*R, "{garbage}"], "{garbage}"),
    ("publish", [*R, "{adir}"], "{adir}"),
    ("publish", [*R, "{garbage}", "--rollout", "nan"], "--rollout"),
    ("publish", [*R, "{garbage}", "--rollout", "101"], "--rollout"),
    ("publish", [*R, "{garbage}", "--announce", "--broker", "http://h:1", "--fleet", "f"],
     "http://h:1"),
    ("publish", [*R, "{garbage}", "--announce", *B, "--tls-ca", "{missing}"], "{missing}"),
    # rollout
    ("rollout set", ["m", "1.0.0", "--percent", "nan", *R], "--percent"),
    ("rollout set", ["m", "1.0.0", "--percent", "50", "--repo", "{missing}",
                     "--keys", "{keys}"], "{missing}"),
    ("rollout pin", ["m", "1.0.0", "--repo", "{repo}", "--keys", "{missing}"], "{missing}"),
    ("rollout unpin", ["m", "--repo", "{adir}", "--keys", "{keys}"], "{adir}"),
    ("rollout withdraw", ["m", "1.0.0", "--repo", "{under_file}", "--keys", "{keys}"],
     "{under_file}"),
    # MQTT operator commands
    ("announce", ["--repo", "{repo}", "--broker", "http://127.0.0.1:9", "--fleet", "f"],
     "http://127.0.0.1:9"),
    ("announce", ["--repo", "{repo}", "--broker", "mqtts://", "--fleet", "f"], "mqtts://"),
    ("announce", ["--repo", "{repo}", "--broker", "mqtts://h:99999", "--fleet", "f"],
     "mqtts://h:99999"),
    ("announce", ["--repo", "{repo}", "--broker", "mqtts://h:port", "--fleet", "f"],
     "mqtts://h:port"),
    ("announce", ["--repo", "{repo}", *B, "--tls-ca", "{missing}"], "{missing}"),
    ("announce", ["--repo", "{repo}", *B, "--tls-ca", "{garbage}"], "{garbage}"),
    ("announce", ["--repo", "{repo}", *B, "--tls-ca", "{adir}"], "{adir}"),
    ("announce", ["--repo", "{repo}", *B, "--password-file", "{missing}"], "{missing}"),
    ("announce", ["--repo", "{repo}", *B, "--cert", "{missing}", "--key", "{missing}"],
     "{missing}"),
    ("announce", ["--repo", "{missing}", *B], "{missing}"),
    ("serve-mqtt", ["--repo", "{repo}", "--broker", "ftp://h", "--fleet", "f"], "ftp://h"),
    ("serve-mqtt", ["--repo", "{repo}", *B, "--tls-ca", "{under_file}"], "{under_file}"),
    ("serve-mqtt", ["--repo", "{missing}", *B], "{missing}"),
    ("serve-mqtt", ["--repo", "{repo}", *B, "--group", "g" * 20, "--device-requests-per-s",
                    "inf"], "--device-requests-per-s"),
    # fleet
    ("fleet broker-config", ["--fleet", "f", "--devices", "a", "-o", "{under_file}"],
     "{under_file}"),
    ("fleet broker-config", ["--fleet", "f", "--devices", "a", "-o", "{garbage}"],
     "{garbage}"),
    ("fleet broker-config", ["--fleet", "f", "--devices", "a", "-o", "{tmp}/bc",
                             "--dynsec-plugin", "{missing}"], "{missing}"),
    ("fleet add-device", ["--fleet-dir", "{tmp}/fd", "--device", "d", "--key", "{missing}"],
     "{missing}"),
    ("fleet add-device", ["--fleet-dir", "{tmp}/fd", "--device", "d", "--key", "{garbage}"],
     "{garbage}"),
    ("fleet add-device", ["--fleet-dir", "{under_file}", "--device", "d", "--key",
                          "{garbage}"], "{under_file}"),
    ("fleet audit", ["--fleet-dir", "{tmp}/fd", "--device", "d", "--log", "{missing}"],
     "{tmp}/fd/devices/d.pem"),
    ("fleet audit", ["--fleet-dir", "{tmp}/fd", "--device", "d", *B], "not enrolled"),
    ("fleet audit", ["--fleet-dir", "{tmp}/fd", "--device", "d", "--head", "7:zz", *B],
     "--head"),
    ("agent audit", ["--config", "{missing}"], "{missing}"),
    ("agent attest", ["--config", "{missing}", "--nonce", "00" * 16], "{missing}"),
    ("fleet attest", ["--fleet-dir", "{tmp}/fd", "--all", *B], "--repo and --keys"),
    ("fleet status", ["--fleet-dir", "{tmp}/fd", "--wait", "nan", *B], "--wait"),
    ("fleet status", ["--fleet-dir", "{tmp}/fd", "--poll-interval", "inf", *B],
     "--poll-interval"),
    ("fleet status", ["--fleet-dir", "{tmp}/fd", "--broker", "mqtts://:1", "--fleet", "f"],
     "mqtts://:1"),
    ("fleet status", ["--fleet-dir", "{tmp}/fd", *B, "--tls-ca", "{missing}"], "{missing}"),
    ("fleet report", ["-o", "{adir}", "--fleet-dir", "{tmp}/fd", *B], "{adir}"),
    ("fleet report", ["-o", "{under_file}", "--fleet-dir", "{tmp}/fd", *B],
     "{tmp}/afile: it is not a directory"),
    ("fleet report", ["-o", "{tmp}/r.html", "--fleet-dir", "{tmp}/fd", "--wait", "nan", *B],
     "--wait"),
    ("fleet exporter", ["--listen", "nowhere", "--fleet-dir", "{tmp}/fd", *B], "nowhere"),
    ("fleet exporter", ["--listen", "127.0.0.1:99999", "--fleet-dir", "{tmp}/fd", *B],
     "127.0.0.1:99999"),
    ("fleet exporter", ["--listen", "127.0.0.1:9", "--interval", "0", "--fleet-dir",
                        "{tmp}/fd", *B], "--interval"),
    ("fleet exporter", ["--listen", "127.0.0.1:9", "--fleet-dir", "{tmp}/fd", "--repo",
                        "{adir}", *B], "--keys"),
    ("fleet exporter", ["--listen", "192.0.2.1:9817", "--fleet-dir", "{tmp}/fd", *B],
     "192.0.2.1:9817"),  # (not this machine's: cannot be bound)
    ("fleet exporter", ["--listen", "127.0.0.1:9", "--fleet-dir", "{tmp}/fd", "--broker",
                        "mqtts://:1", "--fleet", "f"], "mqtts://:1"),
    # agent
    *[(f"agent {cmd}", ["--config", p, *more], p)
      for cmd, more in (("provision", ["--root", "{garbage}"]), ("update", []),
                        ("enroll", []), ("run", []), ("status", []), ("boot-check", []))
      for p in ("{missing}", "{adir}", "{under_file}", "{garbage}")],
    ("agent provision", ["--config", "{conf}", "--root", "{missing}"], "{missing}"),
    ("agent provision", ["--config", "{conf}", "--root", "{garbage}"], "{garbage}"),
    ("agent provision", ["--config", "{conf}", "--root", "{adir}"], "{adir}"),
    ("agent enroll", ["--config", "{conf}"], "swtpm:host=127.0.0.1,port=9"),
    ("agent activate-credential", ["--config", "{conf}", "--challenge", "{missing}",
                                   "--response", "{tmp}/resp.json"], "{missing}"),
    ("agent activate-credential", ["--config", "{conf}", "--challenge", "{garbage}",
                                   "--response", "{tmp}/resp.json"], "{garbage}"),
    ("agent boot-check", ["--config", "{conf}", "--tpm-wait", "0"],
     "swtpm:host=127.0.0.1,port=9"),
    ("agent boot-check", ["--config", "{conf}", "--tpm-wait", "nan"], "--tpm-wait"),
    ("agent boot-check", ["--config", "{conf}", "--tpm-wait", "-1"], "--tpm-wait"),
    # sim
    ("sim tpm start", ["--state", "{under_file}"], "{under_file}"),
    ("sim tpm start", ["--state", "{under_file}", "--port", "99999"], "--port"),
    ("sim tpm stop", ["--state", "{under_file}"], "{under_file}"),
    ("sim fleet up", ["--dir", "{under_file}"], "{under_file}"),
    ("sim fleet up", ["--dir", "{under_file}", "--devices", "0"], "--devices"),
    ("sim fleet up", ["--dir", "{under_file}", "--poll", "nan"], "--poll"),
    ("sim fleet down", ["--dir", "{missing}"], "{missing}"),
    ("sim fleet publish", ["--dir", "{fleet}"], "{fleet}"),
    ("sim fleet status", ["--dir", "{under_file}"], "{under_file}"),
    ("sim fleet enroll", ["--dir", "{missing}"], "{missing}"),
    ("sim attack", ["rollback-metadata", "--dir", "{fleet}"], "{fleet}"),
    ("sim attack", ["rollback-metadata", "--dir", "{fleet}", "--timeout", "nan"], "--timeout"),
    ("sim fault", ["origin-down", "--dir", "{missing}"], "{missing}"),
    ("sim report", ["--devices", "0", "--dir", "{under_file}"], "--devices"),
    ("sim report", ["--dir", "{under_file}"], "{under_file}"),
    ("sim demo", ["--dir", "{under_file}"], "{under_file}"),
]


# Subcommands other branches of issue 15 add: walked once they exist.
COMING: list[Case] = [
    ("agent check-config", ["--config", "{missing}"], "{missing}"),
    ("agent check-config", ["--config", "{garbage}"], "{garbage}"),
]


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[str]:
    """Every runnable subcommand of ``parser``, as "group action ..."."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path)
        return
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, (*path, name))


def _every() -> set[str]:
    return set(leaves(cli.build_parser()))


CASES += [c for c in COMING if c[0] in _every()]


def _fill(text: str, f: Files) -> str:
    return text.format(**{k: str(v) for k, v in vars(f).items()})


def test_every_subcommand_is_walked() -> None:
    walked = {path for path, _, _ in CASES}
    every = _every()
    assert every - walked == set(), "subcommands with no mistake case"
    assert walked - every == set(), "cases of subcommands that do not exist"


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("path", "argv", "names"), CASES,
                         ids=[f"{c[0].replace(' ', '-')}-{i}" for i, c in enumerate(CASES)])
def test_a_mistake_is_one_line_with_a_hint(
    files: Files, path: str, argv: list[str], names: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    full = [*path.split(), *(_fill(a, files) for a in argv)]
    code, out, err = run_main(full, capsys)
    assert code != 0, (full, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("modelward"), line
    assert _fill(names, files) in line, line
    assert "; hint: " in line, line


# -- a careless or hostile operator input ---------------------------------------------


def test_a_path_with_terminal_controls_is_one_escaped_line(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = files.tmp / "ca\x1b[2J\r\u202e.pem"
    code, out, err = run_main(["announce", "--repo", str(files.repo), "--broker",
                               "mqtts://127.0.0.1:9", "--fleet", "f", "--tls-ca", str(hostile)],
                              capsys)
    assert code == 1 and len(err.splitlines()) == 1
    for raw in ("\x1b", "\r", "\u202e"):
        assert raw not in err
    assert "\\x1b[2J\\r\\u202e.pem" in err


def test_a_path_with_a_newline_cannot_start_a_line_of_its_own(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["repo", "rekey", "--keys",
                             str(files.tmp / "x\nmodelward: ok: signed")], capsys)
    assert code == 1
    lines = err.splitlines()
    assert lines[0].startswith("modelward: error: --keys ")
    assert all(line.startswith("  ") for line in lines[1:]), lines


@pytest.mark.parametrize("flag", ["--public-key", "--password-file"])
def test_an_endless_file_is_read_bounded(
    files: Files, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    argv = (["repo", "add-key", "targets", "--uri", "envvar:X", "--public-key", "/dev/zero",
             "--repo", str(files.repo), "--keys", str(files.keys)] if flag == "--public-key"
            else ["announce", "--repo", str(files.repo), "--broker", "mqtts://127.0.0.1:9",
                  "--fleet", "f", "--password-file", "/dev/zero"])
    code, _, err = run_main(argv, capsys)
    assert code == 1
    (line,) = err.splitlines()
    assert f"{flag} /dev/zero: larger than" in line and "; hint: " in line


def test_the_models_own_vectors_still_build(files: Files,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = files.tmp / "own.tar"
    code, stdout, err = run_main(["bundle", "build", str(files.model), "--name", "m",
                                  "--version", "1.0.0", "--vectors", str(files.tmp / "model.npz"),
                                  "-o", str(out)], capsys)
    assert code == 0 and out.is_file(), err
