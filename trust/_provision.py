"""What provisioning the TPM reports (its own module: ``agent boot-check`` never builds one,
so the class is not made on the boot path, issue 15)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProvisionReport:
    """What provisioning created (True) or found in place (False)."""

    srk_created: bool
    identity_created: bool
    anchor_defined: bool
    counter_defined: bool
    identity_public_pem: bytes
    mac_key_created: bool = False
    migrated: bool = False  # the open objects of an older provisioning were found
    identity_replaced: bool = False  # migration made a new identity key: re-enrol it
    record_heals: bool = False  # migration found no believable record: the next update heals
    ak_created: bool = False  # the attestation key 0x81000104 (issue 18)
    register_defined: bool = False  # the measurement register 0x01000131 (issue 18)
    owner_auth_set: bool | None = None  # the TPM owner hierarchy has a password
    decrypt_created: bool = False  # the decryption key 0x81000105 (issue 19)
