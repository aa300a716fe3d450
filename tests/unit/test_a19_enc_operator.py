"""Attacks on the operator's half of encrypted bundles (issue 19) by a careless operator
(attacker 5) and by revoked devices (attacker 3), through the real key store
(``publisher._encrypt``), ``build_bundle`` and the ``modelward bundle build`` CLI, with
software recipient keys (the real-TPM versions: test_a19_enc_device.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.publisher._encrypt import content_key, decrypt_key_path, recipients_of
from modelward.trust.errors import OperatorInputError
from modelward.updater.bundle._bundle import parse_manifest
from modelward.updater.bundle._encryption import DecryptionError, unwrap
from modelward.updater.errors import BundleFormatError
from modelward.updater.install._decrypt import Unlocker
from tests._a19_enc import (
    build_enc,
    enroll_soft,
    members,
    open_bundle,
    software_shared_x,
)
from tests.integration._i16_delta import big_model


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelward", *argv], capture_output=True,
                          text=True, timeout=300, check=False)


def _key_file(fleet: Path, model: str = "classifier") -> Path:
    return fleet / "content-keys" / f"{model}.json"


def test_a_decryption_key_left_without_its_enrollment_is_no_recipient(tmp_path: Path) -> None:
    """A device taken out of the fleet by removing its identity key by hand (there is no
    remove-device): the decryption key it left behind makes it no recipient (found by
    attack: --encrypt-for read only devices/<id>.decrypt.pub)."""
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1", "dev-2")
    (fleet / "devices" / "dev-2.pem").unlink()
    assert decrypt_key_path(fleet, "dev-2").exists()
    with pytest.raises(OperatorInputError, match="dev-2: the device is not enrolled"):
        content_key(fleet, "classifier", ["dev-1", "dev-2"])
    assert not _key_file(fleet).exists()
    assert content_key(fleet, "classifier", ["dev-1"]).recipients


def test_wrong_fleet_dir_or_unknown_device_writes_nothing(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1")
    wrong = tmp_path / "other"
    wrong.mkdir()
    with pytest.raises(OperatorInputError, match="does not exist"):
        content_key(wrong, "classifier", ["dev-1"])
    assert not (wrong / "content-keys").exists()
    with pytest.raises(OperatorInputError, match="dev-9"):
        content_key(fleet, "classifier", ["dev-1", "dev-9"])
    assert not _key_file(fleet).exists()
    (fleet / "devices" / "dev-2.pem").write_bytes(b"(identity)")
    (fleet / "devices" / "dev-3.pem").write_bytes(b"(identity)")
    decrypt_key_path(fleet, "dev-2").write_bytes(b"-----BEGIN PUBLIC KEY-----\ngarbage\n")
    with pytest.raises(OperatorInputError, match="not a PEM public key"):
        content_key(fleet, "classifier", ["dev-1", "dev-2"])
    assert not _key_file(fleet).exists()
    # a P-384 key (another curve) is refused, not wrapped
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    decrypt_key_path(fleet, "dev-3").write_bytes(ec.generate_private_key(ec.SECP384R1())
                                                 .public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(OperatorInputError, match="P-256"):
        content_key(fleet, "classifier", ["dev-1", "dev-3"])


def test_recipient_order_and_duplicates_on_the_cli_keep_the_key(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1", "dev-2")
    a = content_key(fleet, "classifier", recipients_of("dev-2, dev-1,dev-1"))
    b = content_key(fleet, "classifier", recipients_of("dev-1,dev-2"))
    assert a.rotated and not b.rotated and a.key.key_id == b.key.key_id
    assert [r.id for r in b.recipients] == ["dev-1", "dev-2"]


def test_duplicate_recipients_through_the_api_build_a_bundle_no_device_accepts(
        tmp_path: Path) -> None:
    """``content_key`` sorts but does not de-duplicate (only the CLI's ``recipients_of``
    does): a build through the library with a repeated device id writes a manifest that
    names the recipient twice, which every device refuses as a malformed bundle (and
    remembers as rejected). It should be refused at build time (or de-duplicated)."""
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1")
    try:
        enc = content_key(fleet, "classifier", ["dev-1", "dev-1"])
    except OperatorInputError:
        return  # (refused up front: fine)
    ids = [r.id for r in enc.recipients]
    out = build_enc(big_model(tmp_path / "m.onnx"), tmp_path / "b.tar", enc)
    try:
        parse_manifest(members(out)[0][1], "b")
    except BundleFormatError as e:
        pytest.fail(f"content_key(['dev-1', 'dev-1']) wrapped for {ids}; the bundle built "
                    f"from it is refused by every device: {e}")


def test_a_content_key_file_with_a_loose_mode_is_refused(tmp_path: Path) -> None:
    """The content key is a raw secret (base64 in JSON, no passphrase). Every other
    secret file of the project is refused when group or others may read it
    (``trust._secret_file.loose_mode``: TPM auth file, MQTT password, TLS key). A key
    file left 0644 (restored from a backup, copied with `cp`) is used silently."""
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1")
    content_key(fleet, "classifier", ["dev-1"])
    path = _key_file(fleet)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(OperatorInputError, match="600"):
        content_key(fleet, "classifier", ["dev-1"])


def test_a_content_key_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """A key file swapped for a symlink (to another model's or another fleet's key) is
    read through the link: its key then encrypts this model."""
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1")
    a = content_key(fleet, "detector", ["dev-1"])
    _key_file(fleet).symlink_to(_key_file(fleet, "detector"))
    try:
        b = content_key(fleet, "classifier", ["dev-1"])
    except OperatorInputError:
        return
    assert b.key.key_id != a.key.key_id, (
        "classifier's key file is a symlink to detector's: classifier is encrypted with "
        "detector's content key")


def test_a_content_key_file_of_another_model_is_refused(tmp_path: Path) -> None:
    """The key file records its model, but the loader never compares it: a file copied
    from another model (``cp content-keys/a.json content-keys/b.json``) is used, so two
    models share one content key (a recipient of one, unwrapping it once, opens the
    other's releases too once their recipient lists diverge later... or do not)."""
    fleet = tmp_path / "fleet"
    enroll_soft(fleet, "dev-1")
    a = content_key(fleet, "detector", ["dev-1"])
    _key_file(fleet).write_bytes(_key_file(fleet, "detector").read_bytes())
    os.chmod(_key_file(fleet), 0o600)
    try:
        b = content_key(fleet, "classifier", ["dev-1"])
    except OperatorInputError:
        return
    assert b.key.key_id != a.key.key_id, "classifier reuses detector's content key "\
        "(the key file's model field is not checked)"


def test_a_model_name_with_a_path_writes_no_key_outside_the_fleet_dir(
        tmp_path: Path) -> None:
    """``bundle build --name ../../x --encrypt-for ...`` is refused (not a model name),
    but only by ``build_bundle``, after ``content_key`` wrote the new secret key to
    FLEET/content-keys/../../x.json (FLEET/../x.json): outside the fleet directory, and
    left there."""
    fleet = tmp_path / "ops" / "fleet"
    enroll_soft(fleet, "dev-1")
    model = big_model(tmp_path / "m.onnx")
    r = _cli("bundle", "build", str(model), "--name", "../../leaked", "--version",
             "1.0.0", "--encrypt-for", "dev-1", "--fleet-dir", str(fleet), "-o",
             str(tmp_path / "b.tar"))
    assert r.returncode != 0
    found = [p for p in tmp_path.rglob("leaked.json")]
    assert not found, (
        f"refused ({r.stderr.strip().splitlines()[-1]!r}), yet the content key was "
        f"written to {found[0]} (key {json.loads(found[0].read_bytes())['key_id']})")


def test_revoked_device_cannot_open_the_next_release_nor_later_ones(tmp_path: Path) -> None:
    """[dev-1, dev-2] -> [dev-1] (dev-2 revoked) -> [dev-1] again (key kept): what dev-2
    unwrapped from the first release opens neither later one; dev-1 opens all."""
    fleet = tmp_path / "fleet"
    keys = enroll_soft(fleet, "dev-1", "dev-2")
    model = big_model(tmp_path / "m.onnx")
    e1 = content_key(fleet, "classifier", ["dev-1", "dev-2"])
    b1 = build_enc(model, tmp_path / "1.tar", e1, "1.0.0")
    old = unwrap(e1.recipients[1], e1.key.key_id, "classifier",
                 software_shared_x(keys["dev-2"]))
    e2 = content_key(fleet, "classifier", ["dev-1"])
    b2 = build_enc(model, tmp_path / "2.tar", e2, "1.0.1")
    e3 = content_key(fleet, "classifier", ["dev-1"])
    b3 = build_enc(model, tmp_path / "3.tar", e3, "1.0.2")
    assert e2.rotated and not e3.rotated
    assert open_bundle(b1, old)["model.onnx"] == model.read_bytes()
    for b in (b2, b3):
        with pytest.raises(DecryptionError):
            open_bundle(b, old)
        m = parse_manifest(members(b)[0][1], "b")
        assert Unlocker("dev-1", software_shared_x(keys["dev-1"])).unlock(m) is not None


def test_a_device_re_enrolled_under_its_id_gets_a_new_content_key(tmp_path: Path) -> None:
    """A device stolen (or sold, or RMA'd) is replaced, and the replacement enrolled
    under the same id: ``fleet add-device`` overwrites devices/<id>.decrypt.pub. The
    recipients' *ids* did not change, so the content key is kept, and the old TPM (in
    the thief's hands), which unwrapped it from any earlier release, opens every new
    release copied off the origin. The key must change when a recipient's key does."""
    fleet = tmp_path / "fleet"
    keys = enroll_soft(fleet, "dev-1", "dev-2")
    model = big_model(tmp_path / "m.onnx")
    e1 = content_key(fleet, "classifier", ["dev-1", "dev-2"])
    build_enc(model, tmp_path / "1.tar", e1, "1.0.0")
    stolen = unwrap(e1.recipients[1], e1.key.key_id, "classifier",
                    software_shared_x(keys["dev-2"]))
    enroll_soft(fleet, "dev-2")  # the replacement, enrolled as dev-2
    e2 = content_key(fleet, "classifier", ["dev-1", "dev-2"])
    b2 = build_enc(big_model(tmp_path / "m2.onnx", changed_rows=8), tmp_path / "2.tar", e2,
                   "1.1.0")
    try:
        got = open_bundle(b2, stolen)["model.onnx"]
    except DecryptionError:
        return
    opened = got == (tmp_path / "m2.onnx").read_bytes()
    assert not opened, (
        f"content key kept ({e2.key.key_id}, rotated={e2.rotated}) after dev-2's "
        "decryption key changed: the old dev-2 decrypts release 1.1.0")
