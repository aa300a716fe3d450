"""Bounded property-based fuzzing of everything that parses untrusted or operator input
(issue #6 must-show 5): each target runs 10,000 examples in CI, derandomized so a run is
reproducible, and may only succeed or raise its own typed error.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelward.updater.transport._mqtt import block_header
from tests.fuzz import targets

pytestmark = pytest.mark.fuzz
# 10,000 examples per target (CI); FUZZ_EXAMPLES lowers it for a quick local run.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "10000")), deadline=None,
                derandomize=True, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)

GOOD_MANIFEST: dict[str, Any] = {
    "format": "modelward-bundle/1", "name": "m", "version": "1.0.0", "created": "x",
    "files": [{"path": "model.onnx", "size": 1, "sha256": "a" * 64, "merkle_root": "b" * 64},
              {"path": "v.npz", "size": 1, "sha256": "c" * 64, "merkle_root": "d" * 64}],
    "model": {"path": "model.onnx", "format": "onnx", "opset": 17, "inputs": [],
              "outputs": []},
    "checks": {"vectors": "v.npz", "rtol": 0.1, "atol": 0.1},
}


@FUZZ
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(sorted(GOOD_MANIFEST)), json_values)
                 .map(lambda d: json.dumps({**GOOD_MANIFEST, **d}).encode())))
def test_manifest_parser(data: bytes) -> None:
    targets.manifest(data)


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, typ, data in members:
            info = tarfile.TarInfo(name)
            info.type = typ
            info.size = len(data) if typ == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if typ == tarfile.REGTYPE else None)
    return buf.getvalue()


member = st.tuples(
    st.sampled_from(["manifest.json", "model.onnx", "v.npz", "../x", "/abs", "a/b", "",
                     "model.onnx/..", "x" * 120]),
    st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE,
                     tarfile.CHRTYPE, tarfile.FIFOTYPE]),
    st.one_of(st.binary(max_size=40), st.just(json.dumps(GOOD_MANIFEST).encode())),
)


@FUZZ
@given(st.one_of(
    st.binary(max_size=2048),
    st.lists(member, max_size=5).map(_tar),
    st.tuples(st.lists(member, min_size=1, max_size=4).map(_tar), st.integers(0, 4000),
              st.integers(0, 255)).map(
        lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
))
def test_tar_reader(data: bytes) -> None:
    targets.tar(data)


SESSION = targets.SESSION


@FUZZ
@given(
    corr=st.one_of(st.none(), st.binary(max_size=20),
                   st.integers(0, 2**20).map(lambda o: SESSION + struct.pack(">Q", o))),
    props=st.lists(st.tuples(st.sampled_from(["status", "offset", "size", "x"]),
                             st.text(max_size=8)), max_size=5),
    payload=st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from([200, 404, 416, 400, 0, 65535]), st.sampled_from([0, 64, 128, 7]),
                  st.integers(0, 300), st.binary(max_size=200))
        .map(lambda t: block_header(*t[:3]) + t[3]),  # format 2
    ),
    pending=st.sets(st.sampled_from([0, 64, 128]), max_size=3),
    total=st.one_of(st.none(), st.integers(0, 300)),
)
def test_mqtt_block_decoding(corr: bytes | None, props: list[tuple[str, str]], payload: bytes,
                             pending: set[int], total: int | None) -> None:
    targets.mqtt_block(corr, props, payload, pending, total)


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_announcement_decoding(payload: bytes) -> None:
    targets.announcement(payload)


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(json_values, st.text(max_size=100)).map(lambda t: json.dumps(
        {"report": {"device_id": "d", "x": t[0]}, "alg": "ecdsa-p256-sha256",
         "signature": t[1]}).encode()),
))
def test_status_report_verification(data: bytes) -> None:
    targets.report(data)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


scalars = st.one_of(st.booleans(), st.integers(-5, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3))
KEYS = ["device_id", "fleet", "state_dir", "tcti", "model", "transport", "channel"]
SECTIONS = {"https": ["metadata_url", "targets_url", "ca_file"],
            "mqtt": ["host", "port", "ca_file", "password", "username"],
            "idle": ["busy_file", "max_queue_depth", "min_cpu_idle", "windows", "poll"],
            "activation": ["command", "reload_unit", "restart"], "agent": ["poll_interval"],
            "health": ["timeout", "max_memory", "max_cpu_seconds", "nice", "unsafe_no_sandbox"],
            "metrics": ["textfile"]}


@st.composite
def configs(draw: Any) -> str:
    lines = [f"{k} = {_toml_value(draw(scalars))}" for k in KEYS if draw(st.booleans())]
    for sec, keys in SECTIONS.items():
        if draw(st.booleans()):
            lines.append(f"[{sec}]")
            lines += [f"{k} = {_toml_value(draw(scalars))}" for k in keys if draw(st.booleans())]
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.one_of(configs(), st.text(max_size=200),
                 st.binary(max_size=200)))  # atheris found b"\xf0": not UTF-8
def test_config_loader(tmp_path_factory: pytest.TempPathFactory, text: str | bytes) -> None:
    targets.config(_cfg_dir(tmp_path_factory) / "agent.toml", text)


_DIR: list[Path] = []


def _cfg_dir(factory: pytest.TempPathFactory) -> Path:
    if not _DIR:
        _DIR.append(factory.mktemp("fuzz-config"))
    return _DIR[0]
