"""One rule for model names, wherever a name enters (fixpub, after attack a16pub): the
manifest parser (publisher and device alike), ``bundle build``, the agent configuration;
the served-path writers; bundle paths and versions that a terminal would act on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.agent import _config_schema
from modelward.publisher._bundle_build import build_bundle
from modelward.publisher._indexpub import publish_lines, served_dest, served_name
from modelward.publisher._repo import PublishResult
from modelward.publisher.errors import OperatorInputError, RepositoryStateError
from modelward.updater.bundle._bundle import FORMAT, MANIFEST, parse_manifest
from modelward.updater.bundle._names import MODEL_NAME, check_model_name
from modelward.updater.bundle._semver import SemVer
from modelward.updater.bundle._tarstream import check_member_path
from modelward.updater.errors import BundleFormatError

BAD_NAMES = ["../escape", "..", ".", "", "a/b", "/abs", "a\x1b]0;pwned\x07", "-rf", "a b",
             "caf\u00e9", "a\u202eb", "a\u200bb", "a\nb", "x" * 129, "a*", "a+b", "a#"]
GOOD_NAMES = ["classifier", "a", "A.b_c-1", "v1..2", "x" * 128]


def _manifest(name: object) -> bytes:
    h = "00" * 32
    return json.dumps({
        "format": FORMAT, "name": name, "version": "1.0.0", "created": "2026-12-01",
        "files": [{"path": p, "size": 1, "sha256": h, "merkle_root": h}
                  for p in ("model.onnx", "vectors.npz")],
        "model": {"path": "model.onnx", "format": "onnx", "opset": 17, "inputs": [],
                  "outputs": []},
        "checks": {"vectors": "vectors.npz", "rtol": 0.0, "atol": 0.0}}).encode()


@pytest.mark.parametrize("name", [*BAD_NAMES, 7, None, ["a"]])
def test_the_manifest_parser_refuses_an_unsafe_model_name(name: object) -> None:
    with pytest.raises(BundleFormatError, match="model name") as e:
        parse_manifest(_manifest(name), "b.tar")
    assert e.value.member == MANIFEST
    assert all(c.isprintable() and c.isascii() for c in str(e.value))  # shown escaped


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_the_manifest_parser_keeps_a_good_name(name: str) -> None:
    assert parse_manifest(_manifest(name), "b.tar").name == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bundle_build_refuses_what_the_parser_refuses(name: str, tmp_path: Path) -> None:
    with pytest.raises(OperatorInputError, match="model name"):
        build_bundle(tmp_path / "m.onnx", name, "1.0.0", tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()


def test_the_agent_config_applies_the_same_rule() -> None:
    assert _config_schema._NAME is MODEL_NAME  # noqa: SLF001 - one rule, not two copies
    for name in BAD_NAMES:
        assert not MODEL_NAME.fullmatch(name)
    for name in GOOD_NAMES:
        assert check_model_name(name) == name


@pytest.mark.parametrize("v", ["1.0.0\n", "1.0.0\r", "1.0.0 ", "1.0.0\x1b[2J", "1.0.0+a\n"])
def test_a_version_with_a_final_newline_or_escape_is_refused(v: str) -> None:
    with pytest.raises(ValueError, match="not a semantic version"):
        SemVer.parse(v)


@pytest.mark.parametrize("path", ["a\x7fb", "a\x9b2J", "a\u202eb.bin", "a\u2028b", "\u200b",
                                  "a\u00a0b", "d/\x1b"])
def test_a_bundle_path_a_terminal_acts_on_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="unsafe path") as e:
        check_member_path(path)
    assert str(e.value).isascii() and str(e.value).isprintable()


def test_a_printable_bundle_path_is_kept() -> None:
    assert check_member_path("dir/weights caf\u00e9.bin") == "dir/weights caf\u00e9.bin"


SHA = "ab" * 32


@pytest.mark.parametrize(("path", "sha"), [
    ("../escape/escape-1.0.0.tar", SHA), ("classifier/../../x", SHA), ("classifier/a/b", SHA),
    ("classifier", SHA), ("classifier/", SHA), ("a\x1b]0;x\x07/f.tar", SHA),
    ("classifier/f.tar", "../../../etc/x"), ("classifier/f.tar", SHA.upper()),
    ("classifier/f.tar", ""),  # (no sha256 at all: another algorithm)
])
def test_a_target_with_no_place_in_the_served_directory_is_refused(path: str, sha: str,
                                                                  tmp_path: Path) -> None:
    tf = TargetFile(1, {"sha256": sha} if sha else {"sha512": SHA}, path)
    with pytest.raises(RepositoryStateError, match="no place in the served directory") as e:
        served_dest(tmp_path / "targets", tf)
    assert "\x1b" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # not even a directory made


def test_a_target_is_served_at_its_hash_prefixed_name(tmp_path: Path) -> None:
    tf = TargetFile(1, {"sha256": SHA}, "classifier/classifier-1.0.0.tar")
    assert served_name(tmp_path, tf) == tmp_path / "classifier" / f"{SHA}.classifier-1.0.0.tar"
    assert served_dest(tmp_path, tf).parent.is_dir()


def test_a_model_directory_linked_out_of_the_served_directory_is_refused(tmp_path: Path
                                                                         ) -> None:
    targets, outside = tmp_path / "targets", tmp_path / "outside"
    targets.mkdir()
    outside.mkdir()
    (targets / "classifier").symlink_to(outside)
    tf = TargetFile(1, {"sha256": SHA}, "classifier/classifier-1.0.0.tar")
    with pytest.raises(RepositoryStateError, match="leads out of the served directory"):
        served_dest(targets, tf)


def test_publish_lines_escape_what_the_bundle_names() -> None:
    evil = "a\x1b]0;pwned\x07"
    r = PublishResult(f"{evil}/{evil}-1.0.0.tar", evil, "1.0.0\x1b[2J", "f\x1b" * 32, 10, 2, 3,
                      f"{evil}/{evil}-1.0.0.tar.chunks.json")
    out = "\n".join(publish_lines(r))
    assert "\x1b" not in out and "\x07" not in out and out.count("\n") == 2
    assert "pwned" in out


def test_the_device_extraction_refuses_the_name_before_any_file(tmp_path: Path) -> None:
    import io
    import tarfile

    from modelward.updater.bundle._bundle import extract_bundle

    raw = _manifest("../../escape")
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in ((MANIFEST, raw), ("model.onnx", b"m"), ("vectors.npz", b"v")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    dest = tmp_path / "slot"
    dest.mkdir()
    bio.seek(0)
    with pytest.raises(BundleFormatError, match="model name"):
        extract_bundle(bio, dest, "classifier/classifier-1.0.0.tar")
    assert [p.name for p in tmp_path.rglob("*") if p != dest] in ([], [MANIFEST])
