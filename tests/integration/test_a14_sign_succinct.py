"""Attack (a14-operator) through the real CLI and a real device (swtpm, nginx): someone who
can write ``KEYS/pending`` and the served directory adds a succinct hash-bin delegation
(TAP 15) to a parked targets change, with the attacker's key, and drops the bins' files
into ``metadata/``. The summary does not show succinct delegations; the operator's own
snapshot then lists the planted bin files (it lists every ``N.ROLE.json`` on disk), and
the device installs the attacker's model from a bin.
"""

from __future__ import annotations

from pathlib import Path

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Delegations, Metadata, SuccinctRoles, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from modelward.trust._fingerprint import slot_fingerprint
from modelward.updater.bundle._bundle import extract_bundle
from tests.conftest import World
from tests.integration.test_a14_sign_hidden_pin import _rk, _sign, _two_signers


def test_a14_succinct_bins_in_pending_targets_ship_the_attackers_model(
        world: World, tmp_path: Path) -> None:
    w = world
    env = _two_signers(w, tmp_path)
    r = w.cli("publish", *_rk(w), "--sign-with", "encfile:targets.pem", "--sign-with",
              "envvar:CI_KEY", str(w.bundle("1.0.0", seed=1)), env=env)
    assert r.returncode == 0, r.stderr
    w.update()
    assert w.active_version() == "1.0.0"
    r = w.cli("publish", *_rk(w), str(w.bundle("2.0.0", seed=2)), env=env)
    assert r.returncode == 1 and "1 of the 2 signatures" in r.stderr, r.stderr
    (pending,) = (w.keys / "pending").glob("*.targets.json")

    # The attacker: bins for every path, signed by their key, in the parked change ...
    atk = CryptoSigner.generate_ed25519()
    md = Metadata[Targets].from_bytes(pending.read_bytes())
    bins = SuccinctRoles([atk.public_key.keyid], 1, 1, "bin")
    md.signed.delegations = Delegations(keys={atk.public_key.keyid: atk.public_key},
                                        succinct_roles=bins)
    md.signatures.clear()
    pending.write_bytes(md.to_bytes(JSONSerializer(compact=False)))
    # ... and the bins' metadata, with classifier 6.6.6, in the served directory.
    bundle = w.bundle("6.6.6", seed=66)
    with open(bundle, "rb") as f:
        _, entries = extract_bundle(f, None, str(bundle))
    path = "classifier/classifier-6.6.6.tar"
    tf = TargetFile.from_file(path, str(bundle), ["sha256"])
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": "classifier", "version": "6.6.6", "fingerprint": slot_fingerprint(entries),
        "channel": "stable", "rollout": {"basis_points": 10000, "halted": False},
        "pinned": False}}
    (w.repo_dir / "targets" / "classifier" /
     f"{tf.hashes['sha256']}.classifier-6.6.6.tar").write_bytes(bundle.read_bytes())
    for name in bins.get_roles():
        team = Metadata(Targets(version=1, expires=md.signed.expires,
                                targets={path: tf} if bins.get_role_for_target(path) == name
                                else {}))
        team.sign(atk)
        (w.repo_dir / "metadata" / f"1.{name}.json").write_bytes(team.to_bytes())

    summaries = []
    for key in ("envvar:CI_KEY", "encfile:targets.pem"):
        r = _sign(w, key, env)
        summaries.append(r.stdout)
        assert "Traceback" not in r.stderr, r.stderr
    w.update()
    # What SHOULD happen: the signers are shown the new delegation (its key), or the
    # device never installs a model the operator did not sign.
    shown = all(atk.public_key.keyid[:16] in s for s in summaries)
    assert shown or w.active_version() != "6.6.6", (summaries, w.active_version())
