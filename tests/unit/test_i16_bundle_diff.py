"""Issue 16, operator view: `bundle diff OLD NEW`, the estimate lines, the in-memory harness
serving indexes, and the metadata summary naming an index target for what it is."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater

from modelward.cli import main
from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._indexpub import (
    INDEX_FIELD,
    FetchEstimate,
    human,
    index_target,
    indexed_bundle,
)
from modelward.publisher._summary import _describe
from modelward.simulator._models import make_linear_model
from modelward.simulator._tufmem import METADATA_URL, TARGETS_URL, MemFetcher, MemRepo
from modelward.updater.bundle._chunkindex import index_path, parse_index


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1; v2 (another small model, the same 512 KiB of weights); an unrelated model."""
    d = tmp_path_factory.mktemp("i16diff")
    out = {}
    for key, seed, blob_seed in (("v1", 1, 7), ("v2", 2, 7), ("other", 3, 8)):
        blob = d / f"blob-{blob_seed}.bin"
        blob.write_bytes(random.Random(blob_seed).randbytes(512 * 1024))
        out[key] = d / f"{key}.tar"
        build_bundle(make_linear_model(d / f"{key}.onnx", seed), "classifier",
                     {"v1": "1.0.0", "v2": "1.1.0", "other": "2.0.0"}[key], out[key],
                     extra=[(blob, "weights.bin")], options=BuildOptions())
    return out


def test_bundle_diff_of_a_fine_tune(bundles: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "diff", str(bundles["v1"]), str(bundles["v2"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["old"]["version"] == "1.0.0" and d["new"]["version"] == "1.1.0"
    assert d["full_bytes"] == bundles["v2"].stat().st_size
    assert d["fetch_bytes"] < d["full_bytes"] // 4  # the 512 KiB of weights are reused
    assert d["bytes_reused"] >= 512 * 1024 - 256 * 1024 and d["chunks_reused"] >= 2
    assert d["fetch_bytes"] == d["bytes_new"] + d["index_bytes"]
    assert main(["bundle", "diff", str(bundles["v1"]), str(bundles["v2"])]) == 0
    text = capsys.readouterr().out
    assert "devices on 1.0.0 fetch " in text and "reused" in text


def test_bundle_diff_of_an_unrelated_model_is_about_full(bundles: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["bundle", "diff", str(bundles["v1"]), str(bundles["other"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["chunks_reused"] == 0
    assert 0.95 * d["full_bytes"] < d["fetch_bytes"] < 1.05 * d["full_bytes"]
    # the same bundle twice: nothing but the index
    assert main(["bundle", "diff", str(bundles["v1"]), str(bundles["v1"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fetch_bytes"] == d["index_bytes"] and d["chunks_new"] == 0


@pytest.mark.parametrize("what", ["missing", "not a bundle", "directory", "lies"])
def test_bundle_diff_refuses_bad_input_in_one_line(bundles: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   what: str) -> None:
    bad = tmp_path / "bad.tar"
    if what == "not a bundle":
        bad.write_bytes(b"hello" * 1000)
    elif what == "directory":
        bad.mkdir()
    elif what == "lies":  # a member's byte changed: the manifest's hashes are a lie
        data = bytearray(bundles["v2"].read_bytes())
        data[len(data) // 2] ^= 1  # (inside weights.bin)
        bad.write_bytes(bytes(data))
    assert main(["bundle", "diff", str(bundles["v1"]), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bad.name) in err, err


def test_estimate_lines() -> None:
    assert human(41 * 1024) == "41 KiB" and human(int(2.6 * (1 << 20))) == "2.6 MiB"
    e = FetchEstimate("1.0.0", int(2.6 * (1 << 20)), int(310.2 * (1 << 20)), 41 * 1024)
    assert e.text() == "devices on 1.0.0 fetch 2.6 MiB of 310.2 MiB (index 41 KiB)"
    full = FetchEstimate("0.9.0", None, 5 << 20, 0, "it has no chunk index", withdrawn=True)
    assert full.text() == ("devices on 0.9.0 (withdrawn) fetch the full bundle, 5.0 MiB "
                           "(it has no chunk index)")
    assert json.loads(json.dumps(e.to_json()))["fetch_bytes"] == e.fetch


def test_an_index_target_is_named_so_in_the_metadata_summary() -> None:
    tf = index_target(b"{}", "classifier/classifier-1.0.0.tar")
    assert indexed_bundle(tf) == "classifier/classifier-1.0.0.tar"
    assert "chunk index of classifier/classifier-1.0.0.tar (not a release)" in \
        _describe(tf.path, tf)
    # a target that only claims to be an index (no suffix) is not one
    liar = TargetFile(1, {"sha256": "00"}, "classifier/x.tar",
                      {"custom": {INDEX_FIELD: {"bundle": "classifier/x.tar"}}})
    assert indexed_bundle(liar) is None and "IGNORED" in _describe(liar.path, liar)


def test_the_in_memory_harness_serves_a_release_and_its_index(bundles: dict[str, Path],
                                                              tmp_path: Path) -> None:
    r = MemRepo()
    data = bundles["v1"].read_bytes()
    path = "classifier/classifier-1.0.0.tar"
    tf, itf = r.add_release("targets", path, data, {"modelward": {"name": "classifier"}})
    r.add_release("targets", "classifier/classifier-0.9.0.tar", data, with_index=False)
    r.publish()
    u = Updater(str(tmp_path), METADATA_URL, target_base_url=TARGETS_URL,
                fetcher=MemFetcher(r), bootstrap=r.root_bytes)
    info = u.get_targetinfo(index_path(path))
    assert itf is not None and info is not None and info.custom == {INDEX_FIELD: {"bundle": path}}
    ix = parse_index(Path(u.download_target(info, str(tmp_path / "ix"))).read_bytes(), "ix")
    ix.check_bundle(tf.length, dict(tf.hashes), "bundle")
    assert ix.bundle_sha256 == hashlib.sha256(data).hexdigest()
    assert u.get_targetinfo(index_path("classifier/classifier-0.9.0.tar")) is None


def test_bundle_diff_escapes_a_hostile_model_name(bundles: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import tarfile

    evil = tmp_path / "evil.tar"  # a team's bundle whose manifest names "\x1b[2J..."
    with tarfile.open(bundles["v2"]) as src, \
            tarfile.open(evil, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "manifest.json":
                doc = json.loads(data)
                doc["name"] = "x\x1b]0;pwned\x07\x1b[2J"
                data = json.dumps(doc).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    # refused (fixpub: the manifest parser applies the model-name rule), printed escaped
    assert main(["bundle", "diff", str(bundles["v1"]), str(evil)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "invalid manifest: model name" in err and "pwned" in err
    assert "\x1b" not in err and "\x07" not in err
