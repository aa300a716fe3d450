"""Attacks on encrypted bundles (issue 19) through a real device: the swtpm TPM and its
decryption key (enrolled by credential activation), the nginx origin, the publisher's
``Repository.publish`` and the agent's ``update``.

Attackers: (1) the origin (any bytes, no signing key); (2) the device's disk (staging/,
slots/, hints), writing between the verification of the ciphertext and its decryption,
or leaving an interrupted attempt behind; (3) a revoked / non-recipient / replaced
device with its own TPM, which unwrapped earlier content keys; (4) a thief of the
targets key (and the snapshot/timestamp keys): any signed bundle, manifest, table and
index. The invariant checked each time: a typed refusal, the trusted state (record, TPM
counter and anchor, current, slots) unchanged, and a good release never turned into a
remembered rejection by someone who cannot sign.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._encrypt import content_key
from modelward.simulator._fleet import enroll_device
from modelward.updater.bundle import _bundle as _bundle_mod
from modelward.updater.bundle._bundle import parse_manifest
from modelward.updater.bundle._encryption import ContentKey, DecryptionError
from modelward.updater.errors import (
    BundleFormatError,
    EncryptionRefusedError,
    NotARecipientError,
)
from modelward.updater.install import _install
from modelward.updater.install._decrypt import Unlocker
from tests._a19_enc import (
    build_enc,
    edit,
    enroll_soft,
    entries_of,
    holds,
    members,
    open_bundle,
    plain_pattern,
    sign_raw,
    table_doc,
    trusted,
    with_entries,
)
from tests.conftest import PASSPHRASE, World
from tests.integration._i16_delta import big_model, drop_index


def _rejections(w: World) -> list[tuple[str, str]]:
    p = w.state / "rejections.json"
    if not p.exists():
        return []
    return [(r["version"], r["reason"]) for r in json.loads(p.read_bytes())["rejections"]
            if r["reason"] not in ("DeltaRefused", "DeltaStalled")]


def _bundle_gets(w: World, version: str) -> int:
    log = (w.tmp / "origin" / "access.log").read_text()
    return len(re.findall(rf'"GET /targets/classifier/\w+\.classifier-{re.escape(version)}'
                          r'\.tar HTTP/1\.1" 20[06]', log))


def _fleet(w: World) -> Path:
    fleet = w.tmp / "fleet"
    fleet.mkdir(exist_ok=True)
    assert enroll_device(fleet, w.conf_path, w.tmp / "challenge.json") == "dev-1"
    enroll_soft(fleet, "dev-2", "dev-3")
    return fleet


def _build(w: World, fleet: Path, version: str, devices: list[str], **kw: Any) -> Path:
    model = big_model(w.builds / f"big-{version}.onnx", **kw)
    return build_enc(model, w.builds / f"classifier-{version}.tar",
                     content_key(fleet, "classifier", devices), version)


def _real_unlock(w: World, bundle: Path) -> ContentKey:
    """What the device's own TPM unwraps from ``bundle``'s manifest (the key it then
    holds in memory, and could keep)."""
    store = w.store()
    try:
        m = parse_manifest(members(bundle)[0][1], "b")
        key = Unlocker("dev-1", store.tpm.shared_x).unlock(m)
        assert key is not None
        return key
    finally:
        store.tpm.close()


def _before_decrypt(monkeypatch: pytest.MonkeyPatch, act: Callable[[Path], None]) -> None:
    """Run ``act(incoming)`` when every staged chunk matched its signed hash and just
    before the files are decrypted (a disk attacker watching staging/ with inotify)."""
    real = _install.decrypt_incoming  # type: ignore[attr-defined]

    def spy(state_dir: Path, incoming: Path, *a: Any) -> None:
        act(incoming)
        real(state_dir, incoming, *a)

    monkeypatch.setattr(_install, "decrypt_incoming", spy)


# -- (2) the disk, between verification and decryption ---------------------------------

def _flip_ciphertext(incoming: Path) -> None:
    p = incoming / "model.onnx"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 1
    p.write_bytes(bytes(raw))


def _flip_table_iv(incoming: Path) -> None:
    p = incoming / "encryption.json"
    doc = json.loads(p.read_bytes())
    ent = entries_of(doc, "model.onnx")
    n, iv = ent[3]
    ent[3] = (n, bytes([iv[0] ^ 1]) + iv[1:])
    p.write_bytes(with_entries(doc, "model.onnx", ent))


def _garble_table(incoming: Path) -> None:
    p = incoming / "encryption.json"
    p.write_bytes(b"}" * p.stat().st_size)


@pytest.mark.parametrize("path", ["delta", "whole"])
@pytest.mark.parametrize("act", [_flip_ciphertext, _flip_table_iv, _garble_table],
                         ids=["ciphertext byte", "table iv", "table garbled"])
def test_disk_change_before_decryption_does_not_reject_a_good_release(
        world: World, monkeypatch: pytest.MonkeyPatch, act: Callable[[Path], None],
        path: str) -> None:
    """issue 13 "verify what you use" (updater/install/_rejections.py): a disk attacker
    must not be able to turn a good release into a remembered rejection. Decryption
    reads the staged ciphertext and table back from disk after they were verified, and
    a change there is raised as EncryptionRefusedError / BundleFormatError, both
    REJECTING: the device then skips the good release for a day (RELEASE_TTL)."""
    w = world
    fleet = _fleet(w)
    r = w.repo.publish(_build(w, fleet, "1.0.0", ["dev-1"]))
    if path == "whole":
        drop_index(w.repo, w.repo_dir, r.target_path)
    before = trusted(w)
    with pytest.MonkeyPatch.context() as mp:
        _before_decrypt(mp, act)
        with pytest.raises(Exception) as ei:
            w.update()
    first = f"{type(ei.value).__name__}: {ei.value}"
    assert trusted(w) == before
    rejected = _rejections(w)
    result = w.update()
    assert w.active_version() == "1.0.0", (
        f"tampered attempt: {first}; remembered: {rejected}; next attempt: "
        f"{result.outcome}: {result.message}")


def test_staged_file_swapped_for_a_hard_link_before_decryption(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged model replaced by a hard link to the active slot's model (or a
    symlink): refused as a local error (StagingError), nothing written through the link,
    the release installs at the next attempt."""
    w = world
    fleet = _fleet(w)
    w.repo.publish(_build(w, fleet, "1.0.0", ["dev-1"]))
    w.update()
    slot_model = (w.state / "current" / "model.onnx").resolve()
    plain = slot_model.read_bytes()
    w.repo.publish(_build(w, fleet, "1.1.0", ["dev-1"], changed_rows=16))
    before = trusted(w)

    def link(incoming: Path) -> None:
        import os

        (incoming / "model.onnx").unlink()
        os.link(slot_model, incoming / "model.onnx")

    from modelward.updater.errors import StagingError

    with pytest.MonkeyPatch.context() as mp:
        _before_decrypt(mp, link)
        with pytest.raises(StagingError):
            w.update()
    assert slot_model.read_bytes() == plain and trusted(w) == before
    assert _rejections(w) == []
    w.update()
    assert w.active_version() == "1.1.0"


@pytest.mark.parametrize("path", ["delta", "whole"])
def test_an_attempt_killed_after_decryption_is_not_retried_forever(
        world: World, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Power loss (SIGKILL) after the staged files were decrypted in place, before the
    commit: staging/incoming holds plaintext (outside the slot: README says staging only
    ever holds ciphertext). The next attempt must install the release, without an error
    blamed on the origin."""
    from modelward.updater.install._stage import Stage

    w = world
    fleet = _fleet(w)
    r = w.repo.publish(_build(w, fleet, "1.0.0", ["dev-1"]))
    if path == "whole":
        drop_index(w.repo, w.repo_dir, r.target_path)
    real = _install.decrypt_incoming  # type: ignore[attr-defined]

    def die(state_dir: Path, incoming: Path, *a: Any) -> None:
        real(state_dir, incoming, *a)
        raise KeyboardInterrupt  # (the process dies here: nothing is cleaned up)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_install, "decrypt_incoming", die)
        mp.setattr(Stage, "discard", lambda self: None)
        with pytest.raises(KeyboardInterrupt):
            w.update()
    leftover = holds(w.state / "staging", plain_pattern())
    outcomes = []
    for _ in range(2):
        try:
            res = w.update()
            outcomes.append(f"{res.outcome}")
        except Exception as e:  # noqa: BLE001 - recorded
            outcomes.append(f"{type(e).__name__}: {e}")
        if w.active_version() == "1.0.0":
            break
    assert w.active_version() == "1.0.0" and len(outcomes) == 1, (
        f"plaintext left in {leftover}; attempts after the crash: {outcomes}")


# -- (1) the origin --------------------------------------------------------------------

def test_a_non_recipient_is_refused_before_the_bundle_is_fetched_even_without_index(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The origin (no key needed) answers 404 for the chunk index. A device that is
    not a recipient then takes the whole-bundle path; it is refused as soon as the
    manifest (the tar's first member) is read, and stops the download there: no member
    is extracted. (Found by attack: it downloaded the whole bundle first. The GET itself
    starts: which devices a bundle is for is not in the signed target.)"""
    w = world
    fleet = _fleet(w)
    w.repo.publish(_build(w, fleet, "1.0.0", ["dev-2"]))
    for p in (w.repo_dir / "targets" / "classifier").glob("*.chunks*"):
        p.unlink()  # (the origin "lost" it)
    before = trusted(w)
    copied: list[str] = []
    real = _bundle_mod._copy_member

    def spy(tar: Any, member: Any, *a: Any, **kw: Any) -> Any:
        copied.append(member.name)
        return real(tar, member, *a, **kw)

    monkeypatch.setattr(_bundle_mod, "_copy_member", spy)
    with pytest.raises(NotARecipientError):
        w.update()
    assert trusted(w) == before
    assert _bundle_gets(w, "1.0.0") <= 1
    assert copied == []  # refused at the manifest: no member read


def test_origin_altering_a_ciphertext_member_is_no_rejection(world: World) -> None:
    """Whole-bundle path: the origin flips a byte of an encrypted member; the member's
    ciphertext sha256 fails while streaming, but the bundle's TUF hash is checked first:
    TargetHashError, nothing remembered, and the restored bundle installs."""
    from modelward.simulator._attacks import RepoAttacker
    from modelward.updater.errors import TargetHashError

    w = world
    fleet = _fleet(w)
    r = w.repo.publish(_build(w, fleet, "1.0.0", ["dev-1"]))
    drop_index(w.repo, w.repo_dir, r.target_path)
    served = next((w.repo_dir / "targets" / "classifier").glob("*.classifier-1.0.0.tar"))
    att = RepoAttacker(w.repo_dir)
    raw = bytearray(served.read_bytes())
    raw[len(raw) // 2] ^= 1
    att.serve(served, bytes(raw))
    with pytest.raises(TargetHashError):
        w.update()
    assert _rejections(w) == []
    att.restore()
    w.update()
    assert w.active_version() == "1.0.0"


# -- (3) revoked, replaced and non-recipient devices -----------------------------------

def test_revoked_device_with_its_old_key_opens_nothing_new(world: World) -> None:
    """dev-1 (real TPM) installs 1.0.0 for [dev-1, dev-2] and keeps the content key its
    TPM unwrapped. Revoked (1.1.0 for [dev-2]): refused before any chunk, trusted state
    unchanged; its old key opens no chunk of 1.1.0 copied off the origin; claiming
    dev-2's id opens nothing either. Its hints, journal and staging hold no plaintext."""
    w = world
    fleet = _fleet(w)
    b1 = _build(w, fleet, "1.0.0", ["dev-1", "dev-2"])
    w.repo.publish(b1)
    w.update()
    assert w.active_version() == "1.0.0"
    needle = plain_pattern()
    for d in ("chunks", "staging"):
        assert not holds(w.state / d, needle), d
    assert not holds(w.repo_dir, needle)
    old = _real_unlock(w, b1)
    b2 = _build(w, fleet, "1.1.0", ["dev-2"], changed_rows=16)
    w.repo.publish(b2)
    before = trusted(w)
    with pytest.raises(NotARecipientError):
        w.update()
    assert trusted(w) == before and w.active_version() == "1.0.0"
    served = next((w.repo_dir / "targets" / "classifier").glob("*.classifier-1.1.0.tar"))
    with pytest.raises(DecryptionError):
        open_bundle(served, old)
    store = w.store()
    try:
        with pytest.raises(EncryptionRefusedError):
            Unlocker("dev-2", store.tpm.shared_x).unlock(parse_manifest(members(served)[0][1],
                                                                        "b"))
    finally:
        store.tpm.close()


def test_a_replaced_device_s_old_tpm_opens_releases_after_the_replacement(
        world: World) -> None:
    """dev-1 (this real TPM) is stolen; the operator enrolls its replacement as dev-1
    (``fleet add-device`` writes the new devices/dev-1.decrypt.pub) and keeps building
    for the same ids. The content key is kept (the ids did not change), so the stolen
    TPM, having unwrapped it from 1.0.0, decrypts 1.1.0 straight off the origin."""
    w = world
    fleet = _fleet(w)
    b1 = _build(w, fleet, "1.0.0", ["dev-1", "dev-2"])
    w.repo.publish(b1)
    stolen_key = _real_unlock(w, b1)  # (the thief's TPM, any time later)
    enroll_soft(fleet, "dev-1")  # the replacement device, enrolled under the same id
    b2 = _build(w, fleet, "1.1.0", ["dev-1", "dev-2"], changed_rows=16)
    w.repo.publish(b2)
    with pytest.raises(EncryptionRefusedError):  # (its agent refuses: not its wrap)
        w.update()
    served = next((w.repo_dir / "targets" / "classifier").glob("*.classifier-1.1.0.tar"))
    try:
        got = open_bundle(served, stolen_key)["model.onnx"]
    except DecryptionError:
        return
    opened = got == (w.builds / "big-1.1.0.onnx").read_bytes()
    assert not opened, ("the old dev-1 TPM decrypts 1.1.0, built after dev-1 was "
                        f"re-enrolled with a new key: content key {stolen_key.key_id} "
                        "was kept")


# -- (4) a thief of the targets key ---------------------------------------------------

def _off_curve(doc: dict[str, Any]) -> None:
    rec = doc["encryption"]["recipients"][0]
    epk = bytearray(base64.b64decode(rec["epk"]))
    epk[-1] ^= 1  # (y changed: not on P-256)
    rec["epk"] = base64.b64encode(bytes(epk)).decode()


def _zero_point(doc: dict[str, Any]) -> None:
    doc["encryption"]["recipients"][0]["epk"] = base64.b64encode(b"\4" + b"\0" * 64).decode()


@pytest.mark.parametrize("index", [True, False], ids=["delta", "whole"])
@pytest.mark.parametrize("mutate", [_off_curve, _zero_point], ids=["off-curve", "zero"])
def test_an_ephemeral_key_off_the_curve_is_the_release_s_fault(
        world: World, mutate: Callable[[dict[str, Any]], None], index: bool) -> None:
    """A signed manifest whose wrapped key for dev-1 has an ephemeral point not on
    P-256. The TPM refuses the ECDH (TPM_RC_ECC_POINT): the device must refuse the
    release as its own fault (typed, remembered), not report its TPM as failing and
    download the release again at every poll."""
    w = world
    fleet = _fleet(w)
    b = _build(w, fleet, "1.0.0", ["dev-1"])
    data = edit(b, manifest=mutate)
    sign_raw(w.repo_dir, w.keys, PASSPHRASE, data, "1.0.0", index=index)
    before = trusted(w)
    errors = []
    for _ in range(2):
        try:
            w.update()
        except Exception as e:  # noqa: BLE001 - recorded
            errors.append(e)
    assert trusted(w) == before
    first = errors[0] if errors else None
    gets = _bundle_gets(w, "1.0.0")
    assert isinstance(first, EncryptionRefusedError | BundleFormatError) and \
        len(errors) == 1 and gets <= 1, (
            f"2 polls: {[type(e).__name__ for e in errors]} ({first}); whole-bundle "
            f"downloads: {gets}; remembered: {_rejections(w)}")


def test_a_signed_table_over_32_mib_is_refused_once_not_at_every_poll(world: World) -> None:
    """The table member is 32 MiB + 10 bytes of valid JSON (padding): decrypt_incoming
    refuses it as a StagingError (local disk) after the whole download, which is not
    remembered, so every poll downloads the bundle again."""
    from modelward.updater.bundle._encryption import MAX_TABLE_BYTES

    w = world
    fleet = _fleet(w)
    b = _build(w, fleet, "1.0.0", ["dev-1"])
    raw = json.dumps(table_doc(b)).encode()
    padded = raw[:-1] + b" " * (MAX_TABLE_BYTES + 10 - len(raw)) + b"}"
    data = edit(b, files={"encryption.json": padded})
    sign_raw(w.repo_dir, w.keys, PASSPHRASE, data, "1.0.0")
    before = trusted(w)
    errors = []
    for _ in range(2):
        try:
            w.update()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")
    assert trusted(w) == before
    assert _bundle_gets(w, "1.0.0") == 1 and _rejections(w), (
        f"{_bundle_gets(w, '1.0.0')} whole downloads of a 32 MiB+ bundle in 2 polls; "
        f"errors {errors}; remembered {_rejections(w)}")


def _header(f: Callable[[dict[str, Any]], None]) -> Callable[[Path], bytes]:
    return lambda b: edit(b, manifest=f)


def _table(f: Callable[[dict[str, Any]], bytes]) -> Callable[[Path], bytes]:
    return lambda b: edit(b, files={"encryption.json": f(table_doc(b))})


def _iv_flip(doc: dict[str, Any]) -> bytes:
    ent = entries_of(doc, "model.onnx")
    n, iv = ent[-1]
    return with_entries(doc, "model.onnx", [*ent[:-1], (n, bytes(16))])


def _zero_chunk(doc: dict[str, Any]) -> bytes:
    return with_entries(doc, "model.onnx", [(0, bytes(16)), *entries_of(doc, "model.onnx")])


def _merged(doc: dict[str, Any]) -> bytes:
    ent = entries_of(doc, "model.onnx")
    return with_entries(doc, "model.onnx", [(ent[0][0] + ent[1][0], ent[0][1]), *ent[2:]])


def _sig_encrypted(doc: dict[str, Any]) -> None:
    doc["model_signature"] = "vectors.npz"  # (a provenance file that is encrypted)


def _dup_path(doc: dict[str, Any]) -> None:
    doc["encryption"]["files"].append(doc["encryption"]["files"][0])


def _not_in_manifest(doc: dict[str, Any]) -> None:
    doc["encryption"]["files"].append({"path": "ghost.bin", "sha256": "0" * 64})


def _many_recipients(doc: dict[str, Any]) -> None:
    rec = doc["encryption"]["recipients"][0]
    doc["encryption"]["recipients"] = [dict(rec, id=f"x{i}") for i in range(2047)] + [rec]


def _other_model_wrap(w: World, fleet: Path) -> Callable[[Path], bytes]:
    other = content_key(fleet, "detector", ["dev-1"])

    def f(doc: dict[str, Any]) -> None:
        doc["encryption"]["recipients"] = [other.recipients[0].to_json()]
    return _header(f)


THIEF: dict[str, tuple[Any, bool, type[Exception] | None]] = {
    # case: (mutation, sign the index too, expected error or None: installs)
    "table iv changed": (_table(_iv_flip), True, EncryptionRefusedError),
    "table iv changed (whole)": (_table(_iv_flip), False, EncryptionRefusedError),
    "table chunk of length 0": (_table(_zero_chunk), False, BundleFormatError),
    "table cut unlike the index": (_table(_merged), True, EncryptionRefusedError),
    "model signature is an encrypted file": (_header(_sig_encrypted), False,
                                             BundleFormatError),
    "encrypted path twice": (_header(_dup_path), False, BundleFormatError),
    "encrypted file not in manifest": (_header(_not_in_manifest), False, BundleFormatError),
    "2048 recipients, dev-1 last": (_header(_many_recipients), True, None),
    "wrap of another model's key": (None, True, EncryptionRefusedError),
}


@pytest.mark.parametrize("case", sorted(THIEF))
def test_a_thief_s_signed_bundle_is_refused_typed_with_state_unchanged(
        world: World, case: str) -> None:
    w = world
    fleet = _fleet(w)
    b = _build(w, fleet, "1.0.0", ["dev-1"])
    mutate, index, want = THIEF[case]
    if mutate is None:
        mutate = _other_model_wrap(w, fleet)
    data = mutate(b)
    with pytest.MonkeyPatch.context() as mp:
        if case == "table cut unlike the index":
            # (the index cut where the real table cuts; the signed table says otherwise)
            import modelward.publisher._chunking as ch

            real = ch.parse_table  # type: ignore[attr-defined]
            orig = next(d for i, d in members(b) if i.name == "encryption.json")
            mp.setattr(ch, "parse_table", lambda _d, *a, **k: real(orig, *a, **k))
        sign_raw(w.repo_dir, w.keys, PASSPHRASE, data, "1.0.0", index=index)
    before = trusted(w)
    if want is None:
        w.update()
        assert w.active_version() == "1.0.0"
        return
    with pytest.raises(want):
        w.update()
    assert trusted(w) == before
    assert not holds(w.state / "slots", plain_pattern())
    assert not (w.state / "staging").exists() or not list((w.state / "staging").iterdir())


def test_a_delta_from_held_plaintext_chunks_stages_only_ciphertext(world: World) -> None:
    """The re-encryption path: 1.1.0 (same key, 16 rows changed) is assembled mostly
    from chunks of the active slot's *plaintext*, re-encrypted by ``_Files.seal``. Just
    before decryption, no staged file holds a piece of the model; afterwards the slot
    is the plaintext, and the hint written for the next delta holds no plaintext."""
    w = world
    fleet = _fleet(w)
    w.repo.publish(_build(w, fleet, "1.0.0", ["dev-1"]))
    w.update()
    w.repo.publish(_build(w, fleet, "1.1.0", ["dev-1"], changed_rows=16))
    needle = plain_pattern()
    seen: list[list[str]] = []
    with pytest.MonkeyPatch.context() as mp:
        _before_decrypt(mp, lambda inc: seen.append(holds(w.state / "staging", needle)))
        w.update()
    assert w.active_version() == "1.1.0"
    assert seen == [[]]
    assert (w.state / "current" / "model.onnx").read_bytes() == (
        w.builds / "big-1.1.0.onnx").read_bytes()
    assert not holds(w.state / "chunks", needle)
    assert not holds(w.repo_dir, needle)
