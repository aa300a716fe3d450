"""Names of the fleet scenarios (cheap to import: the CLI parser lists them)."""

from __future__ import annotations

ATTACK_NAMES = ("tampered-bundle", "forged-metadata", "rollback-metadata", "endless-metadata",
                "mix-and-match", "bad-bundle", "failing-vectors", "tamper-model",
                # issue 13
                "team-other-model", "planted-stage", "current-outside", "symlinked-staging",
                "pax-bundle", "mqtt-junk-flood", "replayed-status", "state-rollback",
                "tpm-second-client", "memory-hog", "busy-fifo",
                # issue 18
                "swapped-model", "edited-audit-log", "replayed-attestation")
FAULT_NAMES = ("origin-down", "broker-down", "bridge-down", "tpm-down")
