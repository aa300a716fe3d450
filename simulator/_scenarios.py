"""Attack and fault scenarios against a running simulated fleet, and the report table."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelward.simulator._attacks import RepoAttacker, pax_headers
from modelward.simulator._catalogue import ATTACK_NAMES, FAULT_NAMES
from modelward.simulator._fleet import MODEL, Device, Fleet, wait_for
from modelward.simulator.errors import ServiceError
from modelward.trust._bounded import loads_bounded, read_json_file

TRANSPORT_ERRORS = frozenset({"DownloadFailedError", "TransportError"})


@dataclass(frozen=True)
class Scenario:
    """One attack or fault.

    Attributes:
        name: what ``sim attack``/``sim fault`` call it.
        kind: ``attack`` or ``fault`` (faults are cleared and recovery is awaited).
        expected: what a person should expect, in words.
        errors: error types an affected device may report.
        apply: does it; returns the release devices must keep (attacks) or reach once the
            fault clears (faults).
        clear: undoes it (restarts a service, restores the origin, or withdraws a bad
            release and publishes a good one: then it returns that release).
        affects: which devices it is aimed at (the rest must carry on normally).
        boot: the scenario is seen at boot (devices are rebooted: boot-check), not at update.
        outcome: what an aimed device must do: ``refuse`` (report one of ``errors`` and
            keep its model), ``ignore`` (make an attempt, report no error, keep its model),
            ``install`` (install the release ``apply`` returned, reporting none of
            the errors, or one of ``errors`` when ``observe`` labels it), ``keep`` (no
            update is involved: keep its model, and ``observe`` labels what the operator's
            side saw, one of ``errors``) or, with ``boot``, come up on a verified model.
        observe: what to record as a device's "error" instead of its ``status.json``
            (a label the scenario computed: a boot-check exit code, a flag in
            ``fleet status``, the outcome of a TPM command).
        says: what the observed column says an aimed device did (default from
            ``outcome``).
    """

    name: str
    kind: str
    expected: str
    errors: frozenset[str]
    apply: Callable[[Fleet], str]
    clear: Callable[[Fleet], str | None] = lambda f: None
    affects: Callable[[Device], bool] = lambda d: True
    boot: bool = False
    outcome: str = "refuse"
    observe: Callable[[Fleet, Device], str | None] | None = None
    says: str = ""


@dataclass
class DeviceOutcome:
    """What one device did."""

    id: str
    transport: str
    before: str | None
    during: str | None
    error: str | None
    after: str | None = None
    consistent: bool = True


@dataclass
class ScenarioResult:
    """The outcome over the fleet, one row of the report."""

    scenario: Scenario
    devices: list[DeviceOutcome]
    target: str
    seconds_to_recover: float | None = None
    aimed_ids: set[str] = field(default_factory=set)
    goal: str | None = None

    def _as_expected(self, o: DeviceOutcome) -> bool:
        sc = self.scenario
        if sc.boot:
            return o.error in sc.errors and o.during is not None
        if sc.outcome == "install":
            return o.during == self.goal and (o.error in sc.errors or (
                o.error is None and not sc.errors))
        if sc.outcome == "ignore":
            return o.error is None and o.during == o.before
        return o.error in sc.errors and o.during == o.before  # refuse, keep

    @property
    def affected(self) -> list[DeviceOutcome]:
        """Aimed devices that did what the scenario expects (refused with an expected
        error and kept their model; at boot: came up on a verified one; ...)."""
        return [o for o in self.devices if o.id in self.aimed_ids and self._as_expected(o)]

    @property
    def unexpected(self) -> list[DeviceOutcome]:
        """Aimed devices that did not."""
        return [o for o in self.devices if o.id in self.aimed_ids
                and not self._as_expected(o)]

    @property
    def aimed(self) -> int:
        return len(self.aimed_ids)

    @property
    def lost(self) -> int:
        return sum(1 for o in self.devices if not o.consistent)

    @property
    def ok(self) -> bool:
        aimed_ok = len(self.affected) == self.aimed
        recovered = self.seconds_to_recover is not None
        return aimed_ok and recovered and self.lost == 0

    def observed(self) -> str:
        sc = self.scenario
        errors = sorted({o.error for o in self.affected if o.error})
        kept = sum(1 for o in self.devices if o.during == o.before)
        n = f"{len(self.affected)}/{self.aimed}"
        label = f" ({', '.join(errors)})" if errors else ""
        if sc.boot and sc.observe is None:
            text = f"{n} fell back to their previous model at boot"
        elif sc.says:
            text = f"{n} {sc.says}{label}"
        elif sc.boot:
            text = f"{n} came up on a verified model{label}"
        elif sc.outcome == "install":
            text = f"{n} installed {self.goal}{label}"
        elif sc.outcome == "ignore":
            text = f"{n} ignored it (no error); {kept}/{len(self.devices)} kept their model"
        else:
            text = f"{n} refused ({', '.join(errors) or '-'})"
            others = [o for o in self.devices if o.id not in self.aimed_ids]
            if others:
                moved = sum(1 for o in others if o.during != o.before)
                text += f" and kept their model; {moved}/{len(others)} others updated"
            else:
                text += f"; {kept}/{len(self.devices)} kept their model"
        if self.unexpected:  # shown, never hidden
            text += "; NOT AS EXPECTED: " + ", ".join(
                f"{o.id} on {o.during} ({o.error or 'no error'})" for o in self.unexpected)
        return text

    def recovered(self) -> str:
        n = sum(1 for o in self.devices if o.after == self.target)
        when = f" in {self.seconds_to_recover:.0f} s" if self.seconds_to_recover else ""
        return f"{n}/{len(self.devices)} on {self.target}{when}"


def _snapshot(fleet: Fleet) -> dict[str, tuple[int, str | None]]:
    return {d.id: (d.attempts(), d.active()) for d in fleet.devices}


def _consistent(d: Device) -> bool:
    """``current`` holds what the device's trust record calls active, and its journal is
    settled (no step left half-done). The record's MAC is the device's own business at
    boot; this is the outside view."""
    from modelward.trust._fingerprint import directory_entries, slot_fingerprint

    try:
        rec = read_json_file(d.state / "trust" / "record.json", 1 << 16)["record"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    active = rec.get("active")
    if active is None:
        return False
    current = d.state / "current"
    return (slot_fingerprint(directory_entries(current.resolve())) == active["fingerprint"]
            and _settled(d))


def run(fleet: Fleet, sc: Scenario, *, timeout: float = 150.0,
        say: Callable[[str], None] = lambda s: None) -> ScenarioResult:
    """Apply ``sc`` to the running fleet, observe, clear, await recovery."""
    base = _snapshot(fleet)
    say(f"{sc.kind} {sc.name}: {sc.expected}")
    target = sc.apply(fleet)
    aimed = [d for d in fleet.devices if sc.affects(d)]
    others = [d for d in fleet.devices if not sc.affects(d)]

    goal = target

    def reacted(d: Device) -> bool:
        if sc.boot or sc.outcome == "keep":  # (apply did all there is to wait for)
            return True
        if sc.outcome == "install":
            return d.active() == goal and _settled(d)
        tried = d.attempts() > base[d.id][0]
        if sc.outcome == "ignore":
            return tried
        return tried and (d.last_error() in sc.errors or d.active() != base[d.id][1])

    wait_for(lambda: all(reacted(d) for d in aimed)
             and all(d.active() == target for d in others), timeout)
    outcomes = [DeviceOutcome(d.id, d.transport, base[d.id][1], d.active(),
                              sc.observe(fleet, d) if sc.observe else d.last_error())
                for d in fleet.devices]
    say("  observed: " + ", ".join(f"{o.id}={o.during}/{o.error}" for o in outcomes))
    started = time.monotonic()
    target = sc.clear(fleet) or target
    done = wait_for(lambda: all(d.active() == target and d.last_error() is None
                                and _settled(d) for d in fleet.devices), timeout)
    result = ScenarioResult(sc, outcomes, target,
                            time.monotonic() - started if done else None,
                            aimed_ids={d.id for d in aimed}, goal=goal)
    for o, d in zip(outcomes, fleet.devices, strict=True):
        o.after = d.active()
        o.consistent = _consistent(d)
    say(f"  {'ok' if result.ok else 'UNEXPECTED'}: {result.observed()}; "
        f"recovered {result.recovered()}")
    return result


def _settled(d: Device) -> bool:
    try:
        return read_json_file(d.state / "journal.json", 1 << 16).get("step") in (
            "active", "idle", "failed")
    except (OSError, ValueError, AttributeError):
        return False


# --- the scenarios ------------------------------------------------------------------------


def _newest(fleet: Fleet) -> str:
    return fleet.published[-1]


def _fingerprint(bundle: Path) -> str:
    from modelward.trust._fingerprint import slot_fingerprint
    from modelward.updater.bundle._bundle import extract_bundle

    with open(bundle, "rb") as f:
        return slot_fingerprint(extract_bundle(f, None, str(bundle))[1])


def _scenarios() -> dict[str, Scenario]:
    out: dict[str, Scenario] = {}

    def attack(name: str, expected: str, errors: set[str],
               prepare: Callable[[Fleet, RepoAttacker], str | None],
               withdraw: bool = False) -> None:
        """An origin attack. ``prepare`` returns the release it signed with the operator's
        own keys, if any; clearing withdraws that release and publishes a good one,
        otherwise it puts the operator's files back on the origin."""
        state: dict[str, Any] = {}

        def do(fleet: Fleet) -> str:
            last_good = _newest(fleet)
            a = fleet.attacker()
            state.update(a=a, bad=prepare(fleet, a))
            fleet.announce()
            return last_good

        def undo(fleet: Fleet) -> str | None:
            if withdraw:
                fleet.repository().withdraw("classifier", state["bad"])
                return fleet.publish()
            state["a"].restore()
            fleet.announce()
            return _newest(fleet)

        out[name] = Scenario(name, "attack", expected, frozenset(errors), do, undo)

    def tampered(fleet: Fleet, a: RepoAttacker) -> None:
        version = fleet.publish(announce=False)  # the operator's good release...
        a.replace_target("classifier", version,  # ...and other bytes in its place
                         fleet.build(f"{version}-x", seed=666).read_bytes())

    attack("tampered-bundle", "bundle swapped on the origin: refused by its signed hash",
           {"TargetHashError"}, tampered)

    def forged(fleet: Fleet, a: RepoAttacker) -> None:
        own = a.own_key()
        a.forge_release(fleet.build("666.0.0", seed=666),
                        {"targets": own, "snapshot": own, "timestamp": own})

    attack("forged-metadata", "release signed by the attacker's own keys: refused",
           {"MetadataError"}, forged)

    def rollback(fleet: Fleet, a: RepoAttacker) -> None:
        history = sorted((fleet.dir / "history").glob("timestamp-*.json"),
                         key=lambda p: int(p.stem.split("-")[1]))
        a.serve(fleet.repo / "metadata" / "timestamp.json", history[0].read_bytes())

    attack("rollback-metadata", "older signed timestamp replayed: refused",
           {"MetadataError"}, rollback)

    def endless(fleet: Fleet, a: RepoAttacker) -> None:
        a.inflate("timestamp.json", 64 << 20)

    attack("endless-metadata", "64 MiB timestamp.json: cut off at TUF's 16 KiB bound",
           set(TRANSPORT_ERRORS), endless)

    def mix(fleet: Fleet, a: RepoAttacker) -> None:
        _, older = a.current_names()
        fleet.publish(announce=False)
        a.mix_and_match(older)

    attack("mix-and-match", "older signed targets served under the new version: refused",
           {"MetadataError"}, mix)

    def traversal(fleet: Fleet, a: RepoAttacker) -> str:
        version = fleet.next_version()
        good = fleet.build(version, seed=5)
        buf = io.BytesIO()
        with tarfile.open(good) as src, tarfile.open(fileobj=buf, mode="w") as dst:
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m))
            evil = tarfile.TarInfo("../../escape")
            evil.size = 4
            dst.addfile(evil, io.BytesIO(b"evil"))
        a.sign_raw(buf.getvalue(), "classifier", version, _fingerprint(good))
        return version

    attack("bad-bundle", "operator-signed bundle with a ../ member: refused in staging, "
           "then withdrawn", {"BundleFormatError"}, traversal, withdraw=True)

    def vectors(fleet: Fleet, a: RepoAttacker) -> str:
        version = fleet.next_version()
        bad = fleet.build(version, seed=5, vectors_from=6)
        a.sign_raw(bad.read_bytes(), "classifier", version, _fingerprint(bad))
        return version

    attack("failing-vectors", "operator-signed model failing its test vectors: never "
           "activated, then withdrawn", {"HealthCheckError"}, vectors, withdraw=True)

    def tamper_apply(fleet: Fleet) -> str:
        for d in fleet.devices:
            fleet.stop_agent(d)
        for d in fleet.devices:
            model = d.state / "current" / "model.onnx"
            data = bytearray(model.read_bytes())
            data[len(data) // 2] ^= 0xFF
            model.write_bytes(bytes(data))
            subprocess.run([sys.executable, "-I", "-m", "modelward", "agent", "boot-check",
                            "--config", str(d.conf)], capture_output=True, check=False,
                           timeout=120)
        return _newest(fleet)

    def tamper_clear(fleet: Fleet) -> None:
        for d in fleet.devices:
            fleet.start_agent(d)
        time.sleep(2)
        fleet.announce()

    out["tamper-model"] = Scenario(
        "tamper-model", "attack", "a byte of each active model flipped, then a reboot: "
        "boot-check falls back to the previous model; the daemon reinstalls",
        frozenset({"ActiveModelAltered"}), tamper_apply, tamper_clear, boot=True)

    def fault(name: str, expected: str, errors: set[str], stop: Callable[[Fleet], None],
              start: Callable[[Fleet], None], affects: Callable[[Device], bool]) -> None:
        def do(fleet: Fleet) -> str:
            stop(fleet)
            return fleet.publish()

        out[name] = Scenario(name, "fault", expected, frozenset(errors), do, start, affects)

    fault("origin-down", "nginx stopped: HTTPS devices keep their model and retry",
          set(TRANSPORT_ERRORS), Fleet.stop_origin, Fleet.start_origin,
          lambda d: d.transport == "https")
    fault("broker-down", "mosquitto stopped: MQTT devices keep their model and retry",
          set(TRANSPORT_ERRORS), Fleet.stop_broker, Fleet.start_broker,
          lambda d: d.transport == "mqtt")
    fault("bridge-down", "serve-mqtt stopped: MQTT devices keep their model and retry",
          set(TRANSPORT_ERRORS), Fleet.stop_bridge, Fleet.start_bridge,
          lambda d: d.transport == "mqtt")

    def tpm_stop(fleet: Fleet) -> None:
        for d in fleet.devices:
            fleet.stop_tpm(d)

    def tpm_start(fleet: Fleet) -> None:
        for d in fleet.devices:
            fleet.start_tpm(d)

    fault("tpm-down", "every swtpm stopped: devices keep their model, nothing commits",
          {"TpmUnavailableError"}, tpm_stop, tpm_start, lambda d: True)
    _i13_scenarios(out)
    _i18_scenarios(out)
    return out


# --- issue 13: one scenario per attack family that applies to a running fleet ----------

TEAM = "detector"


def _stop_agents(fleet: Fleet) -> None:
    for d in fleet.devices:
        fleet.stop_agent(d)


def _start_agents(fleet: Fleet) -> None:
    for d in fleet.devices:
        fleet.start_agent(d)
    time.sleep(2)


def _boot_check(d: Device) -> int:
    return subprocess.run([sys.executable, "-I", "-m", "modelward", "agent", "boot-check",
                           "--config", str(d.conf)], capture_output=True, check=False,
                          timeout=120).returncode


def _labels(state: dict[str, str | None]) -> Callable[[Fleet, Device], str | None]:
    return lambda fleet, d: state.get(d.id)


def _i13_scenarios(out: dict[str, Scenario]) -> None:  # noqa: PLR0915 - a catalogue
    # 1. one delegated team key ships another model ----------------------------------
    team: dict[str, Any] = {}

    def team_apply(fleet: Fleet) -> str:
        from modelward.simulator._teams import team_sign

        last_good = _newest(fleet)
        repo = fleet.repository()
        targets, _, _ = repo.current()
        if not (targets.delegations and targets.delegations.roles
                and TEAM in targets.delegations.roles):
            repo.delegate(TEAM, [f"{TEAM}/*"])
        high = f"{fleet.next_major + 100}.0.0"  # above anything the operator signed
        bundle = fleet.build(high, seed=667)
        team["paths"] = [  # fields naming classifier under the team's own namespace ...
            team_sign(repo, TEAM, bundle, path=f"{TEAM}/classifier-{high}.tar"),
            # ... and a classifier-path release the team was never delegated
            team_sign(repo, TEAM, bundle),
        ]
        fleet.announce()
        return last_good

    def team_clear(fleet: Fleet) -> None:  # the team's role re-signed without them
        repo = fleet.repository()
        md = repo._role_md(TEAM)  # noqa: SLF001 - tester tooling, as modelward.simulator._teams
        for path in team.get("paths", []):
            md.signed.targets.pop(path, None)
        md.signed.version += 1
        repo._write_delegated(md, TEAM, repo.keys / f"delegated-{TEAM}.pem")  # noqa: SLF001
        targets, _, _ = repo.current()
        repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
        fleet.announce()

    out["team-other-model"] = Scenario(
        "team-other-model", "attack", f"team key delegated {TEAM}/* signs a {TEAM}/ target "
        "naming classifier, and a classifier/ target, both of a higher version: no device "
        "installs either", frozenset(), team_apply, team_clear, outcome="ignore")

    # 2. the disk: a planted partial stage -------------------------------------------
    planted: dict[str, str | None] = {}

    def plant_apply(fleet: Fleet) -> str:
        version = fleet.next_version()
        bundle = fleet.build(version, seed=fleet.next_major * 7)
        evil = fleet.build(f"{version}-evil", seed=668)
        _stop_agents(fleet)  # no poll between the publish and the plant
        fleet.repository().publish(bundle)
        served = next((fleet.repo / "targets" / "classifier").glob(f"*.classifier-{version}.tar"))
        signed, sha = served.read_bytes(), served.name.split(".", 1)[0]
        with tarfile.open(evil) as t:
            evil_files = {m.name: t.extractfile(m).read()  # type: ignore[union-attr]
                          for m in t.getmembers() if m.isfile()}
        with tarfile.open(fileobj=io.BytesIO(signed)) as t:
            index = "".join(json.dumps({"path": m.name, "offset": m.offset_data, "size": 0})
                            + "\n" for m in t.getmembers())
        planted["evil"] = evil_files["model.onnx"].hex()
        for d in fleet.devices:  # index of empty members, the public bytes, own model
            staging = d.state / "staging"
            incoming = staging / "incoming"
            incoming.mkdir(parents=True, exist_ok=True)
            (staging / f"{sha}.part").write_bytes(signed)
            (staging / f"{sha}.index").write_text(index)
            for name, data in evil_files.items():
                (incoming / name).parent.mkdir(parents=True, exist_ok=True)
                (incoming / name).write_bytes(data)
        _start_agents(fleet)
        fleet.published.append(version)
        fleet.save()
        fleet.announce()
        return version

    def plant_observe(fleet: Fleet, d: Device) -> str | None:
        try:
            model = (d.state / "current" / "model.onnx").read_bytes().hex()
        except OSError:
            return d.last_error()
        return "PLANTED MODEL ACTIVE" if model == planted.get("evil") else d.last_error()

    out["planted-stage"] = Scenario(
        "planted-stage", "attack", "a partial stage planted on each disk (empty-member "
        "index, the public bundle as .part, the attacker's model in staging/incoming): "
        "the update completes with the signed bytes", frozenset(), plant_apply,
        outcome="install", observe=plant_observe,
        says="installed the signed release, not the planted files")

    # 3. the disk: `current` repointed outside the slots, then a reboot -----------------
    repointed: dict[str, str | None] = {}

    def repoint_apply(fleet: Fleet) -> str:
        _stop_agents(fleet)
        for d in fleet.devices:
            outside = d.dir / "outside"
            shutil.rmtree(outside, ignore_errors=True)
            outside.mkdir()
            copy = outside / "b"
            shutil.copytree(d.state / "current", copy)  # the slot's files ...
            model = copy / "model.onnx"  # ... with another model
            model.write_bytes(_model_bytes(fleet.build("0.0.0-evil", seed=669)))
            cur = d.state / "current"
            tmp = d.state / "current.attacker"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(copy)
            os.replace(tmp, cur)
            rc = _boot_check(d)
            link = os.readlink(cur) if cur.is_symlink() else None
            repointed[d.id] = (f"boot-check exit {rc}, current -> {link}"
                               if link in ("slots/a", "slots/b")
                               else f"NOT RESTORED: exit {rc}, current -> {link}")
        return _newest(fleet)

    out["current-outside"] = Scenario(
        "current-outside", "attack", "`current` repointed to a copy outside the slots "
        "(another model), then a reboot: boot-check restores the link to the signed slot",
        frozenset({"boot-check exit 0, current -> slots/a",
                   "boot-check exit 0, current -> slots/b"}),
        repoint_apply, lambda f: _restart_and_announce(f), boot=True,
        observe=_labels(repointed),
        says="had `current` restored at boot")

    # 4. the disk: a symlinked staging directory ---------------------------------------
    def symlink_apply(fleet: Fleet) -> str:
        last_good = _newest(fleet)
        _stop_agents(fleet)
        for d in fleet.devices:
            bait = d.dir / "bait"
            bait.mkdir(exist_ok=True)
            (bait / "precious").write_text("not the agent's\n")
            staging = d.state / "staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.symlink_to(bait)
        _start_agents(fleet)
        fleet.publish(announce=True)
        return last_good

    def symlink_observe(fleet: Fleet, d: Device) -> str | None:
        if not (d.dir / "bait" / "precious").exists():
            return "OUTSIDE FILE DELETED"
        return d.last_error()

    def symlink_clear(fleet: Fleet) -> str:  # then the release refused meanwhile installs
        for d in fleet.devices:
            staging = d.state / "staging"
            if staging.is_symlink():
                staging.unlink()
            staging.mkdir(mode=0o700, exist_ok=True)
        fleet.announce()
        return _newest(fleet)

    out["symlinked-staging"] = Scenario(
        "symlinked-staging", "attack", "`staging` replaced by a symlink to a directory "
        "outside the state: refused naming the path, nothing outside touched",
        frozenset({"StateDirError"}), symlink_apply, symlink_clear, observe=symlink_observe)

    # 5. the origin: a bundle of the signed length made of pax headers -----------------
    pax: dict[str, Any] = {}

    def pax_apply(fleet: Fleet) -> str:
        last_good = _newest(fleet)
        a = fleet.attacker()
        version = fleet.publish(announce=False)
        served = next((fleet.repo / "targets" / "classifier").glob(f"*.classifier-{version}.tar"))
        a.replace_target("classifier", version, pax_headers(served.stat().st_size))
        pax["a"] = a
        fleet.announce()
        return last_good

    def pax_clear(fleet: Fleet) -> str:
        pax["a"].restore()
        fleet.announce()
        return _newest(fleet)

    out["pax-bundle"] = Scenario(
        "pax-bundle", "attack", "the origin serves a bundle of the signed length made only "
        "of pax headers: refused, bounded before its hash is checked",
        frozenset({"TargetHashError", "BundleFormatError"}), pax_apply, pax_clear)

    # 6. the broker/bridge credential: junk flood on MQTT response topics -------------
    def flood_apply(fleet: Fleet) -> str:
        import threading

        from modelward.updater.transport._mqtt import publish_properties
        from modelward.updater.transport._mqttconn import MqttConnection

        version = fleet.publish(announce=False)
        stop = threading.Event()

        def flood() -> None:
            conn = MqttConnection(fleet.mqtt("modelward-bridge"), f"flood-{os.getpid()}", [])
            big, small = os.urandom(4 << 20), os.urandom(1 << 20)
            try:
                for i in range(60):
                    if stop.is_set():
                        break
                    for d in fleet.devices:
                        if d.transport != "mqtt":
                            continue
                        p = publish_properties()
                        p.CorrelationData = os.urandom(16)
                        conn.publish(f"modelward/sim/devices/{d.id}/repo/resp",
                                     big if i % 2 == 0 else small, p, wait=True)
            finally:
                conn.close()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        time.sleep(0.5)
        fleet.announce()
        wait_for(lambda: all(d.active() == version for d in fleet.devices), 60)
        stop.set()
        t.join(60)
        return version

    out["mqtt-junk-flood"] = Scenario(
        "mqtt-junk-flood", "attack", "4 MiB and 1 MiB junk messages flood the MQTT devices' "
        "response topics during an update: dropped, the signed release installs",
        frozenset(), flood_apply, affects=lambda d: d.transport == "mqtt", outcome="install")

    # 7. one device's credentials: a replayed old status report -----------------------
    replay: dict[str, str | None] = {}

    def replay_apply(fleet: Fleet) -> str:
        from modelward.agent._commands import enroll, signed_report
        from modelward.agent._config import load_config
        from modelward.publisher._fleet import add_device
        from modelward.updater.transport._mqttconn import device_connection

        registry = fleet.dir / "registry"
        for d in fleet.devices:
            if not (registry / "devices" / f"{d.id}.pem").exists():
                add_device(registry, *enroll(load_config(d.conf)))
        old = {d.id: signed_report(load_config(d.conf), "active") for d in fleet.devices}
        version = fleet.publish()
        wait_for(lambda: all(d.active() == version for d in fleet.devices), 60)
        time.sleep(2)  # the daemons' reports after the update
        _fleet_status(fleet, registry)  # the newest seq seen
        for d in fleet.devices:  # the attacker holds the password, not the TPM key
            # as the device's listener (the identity that writes its status; this takes
            # the daemon's session's place until its listener reconnects)
            conn = device_connection(fleet.mqtt(d.id), "listen", [])
            try:
                conn.publish(f"modelward/sim/devices/{d.id}/status", old[d.id], retain=True,
                             wait=True)
            finally:
                conn.close()
        rows = _fleet_status(fleet, registry)
        for d in fleet.devices:
            row = rows.get(d.id) or {}
            replay[d.id] = f"fleet status {row.get('status')}"
        return version

    def replay_clear(fleet: Fleet) -> str:  # the daemons' next reports replace them
        return fleet.publish()

    out["replayed-status"] = Scenario(
        "replayed-status", "attack", "an older, validly signed status report re-published "
        "retained with each device's own credentials: `fleet status` shows REPLAYED",
        frozenset({"fleet status REPLAYED"}), replay_apply, replay_clear, outcome="install",
        observe=_labels(replay),
        says="flagged, then installed the next release")

    # 8. the disk: the whole state dir put back from an older copy -----------------------
    rolled: dict[str, str | None] = {}

    def rollback_apply(fleet: Fleet) -> str:
        _stop_agents(fleet)
        for d in fleet.devices:
            old = d.dir / "state-old"
            shutil.rmtree(old, ignore_errors=True)
            shutil.copytree(d.state, old, symlinks=True)
        _start_agents(fleet)
        version = fleet.publish()
        wait_for(lambda: all(d.active() == version and _settled(d)
                             for d in fleet.devices), 60)
        _stop_agents(fleet)
        for d in fleet.devices:
            shutil.rmtree(d.state)
            (d.dir / "state-old").rename(d.state)
            rolled[d.id] = f"boot-check exit {_boot_check(d)}"
        return version

    out["state-rollback"] = Scenario(
        "state-rollback", "attack", "the whole state dir put back from an older consistent "
        "copy, then a reboot: boot-check exits 3; the daemon heals to the newest release "
        "with no operator step", frozenset({"boot-check exit 3"}), rollback_apply,
        lambda f: _restart_and_announce(f), boot=True, observe=_labels(rolled),
        says="refused the old state at boot, inference not started")

    # 9. a second local TPM client --------------------------------------------------------
    tpm: dict[str, str | None] = {}

    def tpm_apply(fleet: Fleet) -> str:
        from modelward.trust._tpm import ANCHOR_INDEX, COUNTER_INDEX

        for d in fleet.devices:
            work = d.dir / "tpm-attacker"
            work.mkdir(exist_ok=True)
            (work / "evil").write_bytes(b"\x66" * 32)
            env = dict(os.environ, TPM2TOOLS_TCTI=f"swtpm:host=127.0.0.1,port={d.tpm_port}")
            moved = []
            for argv in (("tpm2_nvincrement", "-C", "o", f"{COUNTER_INDEX:#x}"),
                         ("tpm2_nvincrement", f"{COUNTER_INDEX:#x}"),
                         ("tpm2_nvwrite", "-C", "o", "-i", "evil", f"{ANCHOR_INDEX:#x}"),
                         ("tpm2_nvwrite", "-i", "evil", f"{ANCHOR_INDEX:#x}")):
                r = subprocess.run(list(argv), capture_output=True, cwd=work, env=env,
                                   timeout=60, check=False)
                if r.returncode == 0:
                    moved.append(argv[0])
            tpm[d.id] = ("TPM commands refused" if not moved
                         else "TPM MOVED by " + "+".join(moved))
        return fleet.publish()

    out["tpm-second-client"] = Scenario(
        "tpm-second-client", "attack", "a second process on each swtpm tries "
        "tpm2_nvincrement on the counter and tpm2_nvwrite on the root anchor: refused; "
        "the next release installs", frozenset({"TPM commands refused"}), tpm_apply,
        outcome="install", observe=_labels(tpm),
        says="kept counter and anchor, then installed the next release")

    # 10. a signed model allocating far beyond max_memory -------------------------------
    hog: dict[str, Any] = {}

    def hog_apply(fleet: Fleet) -> str:
        last_good = _newest(fleet)
        version = fleet.next_version()
        bundle = _hog_bundle(fleet, version)
        fleet.attacker().sign_raw(bundle.read_bytes(), "classifier", version,
                                  _fingerprint(bundle))
        hog["version"] = version
        fleet.announce()
        return last_good

    def hog_observe(fleet: Fleet, d: Device) -> str | None:
        if "retried" not in hog:  # announce twice more: a remembered rejection holds
            hog["errors"] = {x.id: x.last_error() for x in fleet.devices}
            before = {x.id: _health_rejections(x) for x in fleet.devices}
            for _ in range(2):
                fleet.announce()
                time.sleep(4)
            hog["retried"] = {x.id: _health_rejections(x) - before[x.id]
                              for x in fleet.devices}
        err = hog["errors"][d.id]
        n = hog["retried"][d.id]
        return err if n == 0 else f"{err}, RETRIED {n}x"

    def hog_clear(fleet: Fleet) -> str:
        fleet.repository().withdraw("classifier", hog["version"])
        return fleet.publish()

    out["memory-hog"] = Scenario(
        "memory-hog", "attack", "operator-signed model allocating 3 GiB (ConstantOfShape): "
        "its health check fails under max_memory, the release is remembered and not "
        "retried on 2 more announcements, then withdrawn", frozenset({"HealthCheckError"}),
        hog_apply, hog_clear, observe=hog_observe)

    # 11. the inference app's busy_file is a FIFO -----------------------------------------
    busy: dict[str, Path] = {}

    def busy_apply(fleet: Fleet) -> str:
        _stop_agents(fleet)
        for d in fleet.devices:
            fifo = d.dir / "app-busy"
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo)
            text = d.conf.read_text()
            busy[d.id] = d.conf.with_suffix(".toml.orig")
            busy[d.id].write_text(text)
            d.conf.write_text(text + f'\n[idle]\nbusy_file = "{fifo}"\npoll = 0.1\n')
        _start_agents(fleet)
        return fleet.publish()

    def busy_observe(fleet: Fleet, d: Device) -> str | None:
        log = (d.dir / "agent.log").read_text(errors="replace")
        return "busy_file ignored" if "ignoring busy_file" in log else d.last_error()

    def busy_clear(fleet: Fleet) -> None:
        _stop_agents(fleet)
        for d in fleet.devices:
            busy[d.id].replace(d.conf)
            (d.dir / "app-busy").unlink(missing_ok=True)
        _restart_and_announce(fleet)

    out["busy-fifo"] = Scenario(
        "busy-fifo", "attack", "the inference app's busy_file replaced by a FIFO: the idle "
        "gate neither hangs nor blocks; the release installs",
        frozenset({"busy_file ignored"}), busy_apply, busy_clear, outcome="install",
        observe=busy_observe,
        says="installed the release past the FIFO")


def _entry(raw: bytes) -> Any:
    """An audit entry the scenario reads back from a device's disk."""
    return loads_bounded(raw, max_bytes=4096, what="an audit entry")


def _restart_and_announce(fleet: Fleet) -> None:
    _start_agents(fleet)
    fleet.announce()


def _model_bytes(bundle: Path) -> bytes:
    with tarfile.open(bundle) as t:
        f = t.extractfile("model.onnx")
        assert f is not None
        return f.read()


def _health_rejections(d: Device) -> int:
    """Bundles the device rejected (hash, format, fingerprint, health check)."""
    c = d.status().get("counters") or {}
    return int(c.get("verification_failures", 0))


def _fleet_status(fleet: Fleet, registry: Path) -> dict[str, dict[str, Any]]:
    r = subprocess.run(
        [sys.executable, "-I", "-m", "modelward", "fleet", "status", "--fleet-dir", str(registry),
         "--json", "--wait", "1", "--broker", f"mqtts://127.0.0.1:{fleet.broker_port}",
         "--fleet", "sim", "--tls-ca", str(fleet.ca()), "--username", "modelward-operator",
         "--password-file", str(fleet.creds / "modelward-operator")],
        capture_output=True, text=True, check=False, timeout=120)
    try:
        rows = loads_bounded(r.stdout, max_bytes=16 << 20, what="fleet status --json")
        return {row["device"]: row for row in rows}
    except (ValueError, KeyError, TypeError):
        return {}


def _hog_bundle(fleet: Fleet, version: str) -> Path:
    """A model that reproduces the linear model of seed 5's vectors only after allocating
    3 GiB (tests/integration/test_i13_sandbox.py)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from modelward.publisher._bundle_build import build_bundle

    seed = 5
    builds = fleet.dir / "builds"
    good = fleet.build(f"{version}-donor", seed=seed)
    with tarfile.open(good) as t:
        f = t.extractfile("vectors.npz")
        assert f is not None
        vectors = builds / f"hog-vectors-{version}.npz"
        vectors.write_bytes(f.read())
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("ConstantOfShape", ["shape"], ["big"],
                          value=numpy_helper.from_array(np.array([1.0], np.float32))),
         helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
         helper.make_node("Mul", ["s", "zero"], ["s0"]),
         helper.make_node("Add", ["z", "s0"], ["z2"]),
         helper.make_node("Relu", ["z2"], ["y"])],
        "hog",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
                     numpy_helper.from_array(np.array([(3 << 30) // 4], np.int64), "shape"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = builds / f"hog-{version}.onnx"
    path.write_bytes(model.SerializeToString())
    out = builds / f"classifier-{version}.tar"
    build_bundle(path, MODEL, version, out, vectors=vectors)
    return out


# --- issue 18: attestation and the audit trail, seen from the operator's side -----------


def _operator(fleet: Fleet) -> Path:
    """The operator's registry with every device enrolled by credential activation
    (:meth:`Fleet.enroll`), enrolling only the ones not enrolled yet."""
    todo = [d for d in fleet.devices
            if not (fleet.operator_dir / "devices" / f"{d.id}.ak.json").exists()]
    if todo:
        fleet.enroll(todo)
    return fleet.operator_dir


def _attest(fleet: Fleet, devices: list[Device], timeout: float = 10.0
            ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``fleet attest --device ... --json`` (the real command, over MQTT): each device's
    row, and the summary (``{"error": ...}`` when the command printed no JSON)."""
    argv = [sys.executable, "-I", "-m", "modelward", "fleet", "attest", "--json",
            "--timeout", f"{timeout:g}", "--fleet-dir", str(fleet.operator_dir),
            "--repo", str(fleet.repo), "--keys", str(fleet.keys), *fleet.operator_args()]
    for d in devices:
        argv += ["--device", d.id]
    r = subprocess.run(argv, capture_output=True, text=True, check=False,
                       timeout=timeout * len(devices) + 120)
    try:
        doc = loads_bounded(r.stdout, max_bytes=16 << 20, what="fleet attest --json")
        return {row["device"]: row for row in doc["devices"]}, doc["summary"]
    except (ValueError, KeyError, TypeError):
        return {}, {"error": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}


def _attest_answered(fleet: Fleet, devices: list[Device], tries: int = 6
                     ) -> dict[str, dict[str, Any]]:
    """:func:`_attest`, asked again for the devices that did not answer: a daemon just
    started may not be subscribed yet (requests are QoS 0 and kept for nobody)."""
    rows: dict[str, dict[str, Any]] = {}
    todo = list(devices)
    for _ in range(tries):
        got, _ = _attest(fleet, todo, timeout=5.0)
        rows.update(got)
        todo = [d for d in todo if (got.get(d.id) or {}).get("reason") in ("no answer", None)]
        if not todo:
            break
    return rows


def _attested(row: dict[str, Any] | None) -> str:
    """One ``fleet attest`` row in a few words: ``VERSION (REASON)`` or the failure."""
    if not row:
        return "no row"
    if not row.get("attested"):
        return f"refused: {row.get('reason')}"
    rel = row.get("release") or {}
    return f"{rel.get('version')} ({rel.get('reason')})"


def _fleet_audit(fleet: Fleet, d: Device, timeout: float = 10.0) -> tuple[int, str]:
    """``fleet audit --device ID`` over MQTT (no ``--log``): exit code and output."""
    r = subprocess.run(
        [sys.executable, "-I", "-m", "modelward", "fleet", "audit", "--device", d.id,
         "--timeout", f"{timeout:g}", "--fleet-dir", str(fleet.operator_dir),
         *fleet.operator_args()], capture_output=True, text=True, check=False, timeout=180)
    return r.returncode, (r.stdout + r.stderr).strip()


def _audit_kinds(d: Device) -> list[str]:
    """The kinds in the device's audit log, as ``agent audit`` verifies it locally."""
    r = subprocess.run([sys.executable, "-I", "-m", "modelward", "agent", "audit", "--config",
                        str(d.conf), "--json"], capture_output=True, text=True, check=False,
                       timeout=120)
    try:
        doc = loads_bounded(r.stdout, max_bytes=16 << 20, what="agent audit --json")
        return [str(e["kind"]) for e in doc["entries"]]
    except (ValueError, KeyError, TypeError):
        return [f"agent audit exit {r.returncode}"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _reboot(fleet: Fleet, d: Device) -> int:
    """The device reboots: its daemon stops, boot-check runs, the daemon starts."""
    fleet.stop_agent(d)
    rc = _boot_check(d)
    fleet.start_agent(d)
    return rc


SWAP_OK = {0: "fallback attested and audited", 3: "nothing trusted attested and audited"}
AUDIT_OK = "fleet audit named the edited entry"
REPLAY_OK = "refused as stale nonce; the verbatim copy ignored as stale"


def _i18_scenarios(out: dict[str, Scenario]) -> None:  # noqa: PLR0915 - a catalogue
    # 1. the active model swapped on disk after boot-check, no reboot ------------------
    swapped: dict[str, str | None] = {}

    def swap_label(d: Device, verified: dict[str, Any] | None, swap: dict[str, Any] | None,
                   rc: int, booted: dict[str, Any] | None, kinds: list[str]) -> str:
        rel = (verified or {}).get("release") or {}
        if not (verified or {}).get("attested") or rel.get("reason") != "boot-check":
            return f"NOT ATTESTED AT BOOT-CHECK: {_attested(verified)}"
        if not (swap or {}).get("attested") or (swap or {}).get("release") != rel:
            return f"AFTER THE SWAP: {_attested(swap)}, boot-check verified {_attested(verified)}"
        if rc == 0:
            after = (booted or {}).get("release") or {}
            ok = ((booted or {}).get("attested") and after.get("reason") == "fallback"
                  and after.get("version") == d.active()
                  and after.get("fingerprint") != rel.get("fingerprint"))
            audited = kinds[-1:] == ["fallback"]
        elif rc == 3:
            ok = (booted or {}).get("reason") == "nothing trusted"
            audited = kinds[-1:] == ["nothing-trusted"]
        else:
            return f"boot-check exit {rc}"
        if not ok:
            return f"AFTER BOOT-CHECK EXIT {rc}: {_attested(booted)}"
        return SWAP_OK[rc] if audited else f"AUDIT ENDS {kinds[-1:]}"

    def swap_apply(fleet: Fleet) -> str:
        _operator(fleet)
        devices = fleet.devices
        for d in devices:  # a reboot: boot-check verifies the active model, measured
            _reboot(fleet, d)
        verified = _attest_answered(fleet, devices)
        for d in devices:  # the swap, while the daemon runs: no reboot
            _flip(d.state / "current" / "model.onnx")
        swap, _ = _attest(fleet, devices)
        # The next boot with the origin and bridge down: the daemon, started after
        # boot-check, cannot heal before the operator has seen what boot-check did.
        fleet.stop_origin()
        fleet.stop_bridge()
        try:
            rcs = {d.id: _reboot(fleet, d) for d in devices}
            booted = _attest_answered(fleet, devices)
        except BaseException:
            fleet.start_origin()
            fleet.start_bridge()
            raise
        for d in devices:
            swapped[d.id] = swap_label(d, verified.get(d.id), swap.get(d.id), rcs[d.id],
                                       booted.get(d.id), _audit_kinds(d))
        return _newest(fleet)

    def swap_clear(fleet: Fleet) -> None:  # online again: the daemons reinstall
        fleet.start_origin()
        fleet.start_bridge()
        fleet.announce()

    out["swapped-model"] = Scenario(
        "swapped-model", "attack", "each active model altered on disk after boot-check, no "
        "reboot: `fleet attest` still names the release boot-check verified (the TPM's "
        "register); the next boot-check (origin down: no heal yet) falls back, and `fleet "
        "attest` and the audit log then say fallback; the daemon reinstalls",
        frozenset(SWAP_OK.values()), swap_apply, swap_clear, boot=True,
        observe=_labels(swapped),
        says="attested what boot-check verified until the next boot-check showed the swap")

    # 2. an audit log entry edited on the device's disk ---------------------------------
    edits: dict[str, tuple[Path, bytes, bytes]] = {}
    edited: dict[str, str | None] = {}

    def edit_apply(fleet: Fleet) -> str:
        from modelward.trust._auditchain import canonical

        operator = _operator(fleet)
        for d in fleet.devices:
            rc, text = 1, ""
            for _ in range(4):  # (entries since the newest report: the next one signs them)
                _fleet_status(fleet, operator)  # keeps each device's newest signed report
                rc, text = _fleet_audit(fleet, d)
                if rc == 0 or "after the signed head" not in text:
                    break
                time.sleep(5.0)
            if rc != 0:
                edited[d.id] = f"NOT VERIFYING BEFORE THE EDIT: exit {rc}: {text[-160:]}"
                continue
            log = d.state / "audit" / "live.jsonl"
            lines = log.read_bytes().split(b"\n")
            # the newest entry naming a version, not the last one (what chains from it
            # shows the edit): the attacker makes the log say another version was installed
            k = max(i for i, raw in enumerate(lines[:-2])
                    if raw and "version" in _entry(raw)["fields"])
            doc = _entry(lines[k])
            doc["fields"]["version"] = "99.0.0"
            old, lines[k] = lines[k], canonical(doc)  # re-canonicalised: it still parses
            log.write_bytes(b"\n".join(lines))
            edits[d.id] = (log, old, lines[k])
            rc, text = _fleet_audit(fleet, d)
            seq = doc["seq"]
            edited[d.id] = (AUDIT_OK if rc != 0 and f"entry seq {seq} " in text
                            and "edited" in text else
                            f"FLEET AUDIT EXIT {rc} (seq {seq} edited): {text[-160:]}")
        return _newest(fleet)

    def edit_clear(fleet: Fleet) -> None:  # the entry put back as the device wrote it
        for log, old, new in edits.values():
            data = log.read_bytes()
            log.write_bytes(data.replace(new, old, 1))
        edits.clear()

    out["edited-audit-log"] = Scenario(
        "edited-audit-log", "attack", "an entry of each device's audit log edited on disk "
        "(another version, re-canonicalised so it parses): `fleet audit` over MQTT fails "
        "naming that entry (edited); the model keeps serving",
        frozenset({AUDIT_OK}), edit_apply, edit_clear, outcome="keep",
        observe=_labels(edited), says="kept their model; the edit was found")

    # 3. an earlier attestation answer replayed to a new request ------------------------
    replayed: dict[str, str | None] = {}

    def replay_one(fleet: Fleet, d: Device, prefix: str) -> str:
        import queue
        import secrets

        from modelward.updater.transport._mqttconn import (
            MqttConnection,
            device_connection,
            publish_properties,
        )
        from modelward.updater.transport._rpc import (
            Assembly,
            answer_chunks,
            parse_chunk,
            parse_request,
            req_topic,
            resp_topic,
        )

        # The attacker records a real answer off the broker: a subscriber to the response
        # topics (the operator's identity stands in for the broker's own view here).
        heard: queue.Queue[bytes] = queue.Queue()
        mine = resp_topic(prefix, d.id)
        sniff = MqttConnection(fleet.mqtt("modelward-operator"),
                               f"sniff-{secrets.token_hex(4)}", [resp_topic(prefix, "+")],
                               lambda m: heard.put(bytes(m.payload)) if m.topic == mine
                               else None)
        try:
            rows = _attest_answered(fleet, [d])
        finally:
            sniff.close()
        if not (rows.get(d.id) or {}).get("attested"):
            return f"NOT ATTESTED BEFORE: {_attested(rows.get(d.id))}"
        recorded: list[bytes] = []
        while not heard.empty():
            recorded.append(heard.get())
        body = None
        assembly = Assembly()
        for c in recorded:
            body = assembly.add(parse_chunk(c, "a recorded answer"), "a recorded answer")
        if body is None:
            return f"NOTHING RECORDED ({len(recorded)} chunks)"
        old_doc = loads_bounded(body, max_bytes=len(body), what="a recorded answer")
        # The device is offline; a client with its MQTT credentials (its listener
        # identity: reads its requests, writes its answers) answers in its place, with
        # each new request's correlation data: the recorded chunks verbatim, then the
        # recorded document framed anew under the new request's nonce.
        mode = {"reframe": False}

        def answer(m: Any) -> None:
            corr = getattr(m.properties, "CorrelationData", None)
            req = parse_request(bytes(m.payload), "a request")
            chunks = answer_chunks(req, old_doc) if mode["reframe"] else recorded
            for c in chunks:
                p = publish_properties()
                p.CorrelationData = corr
                attacker.publish(mine, c, p)

        fleet.stop_agent(d)
        attacker = device_connection(fleet.mqtt(d.id), "listen", [req_topic(prefix, d.id)],
                                     answer)
        try:
            verbatim, vsum = _attest(fleet, [d], timeout=5.0)
            mode["reframe"] = True
            reframed, _ = _attest(fleet, [d], timeout=10.0)
        finally:
            attacker.close()
            fleet.start_agent(d)
        v, r = verbatim.get(d.id) or {}, reframed.get(d.id) or {}
        if v.get("attested") or r.get("attested"):
            return f"REPLAY ATTESTED: {_attested(v)}, {_attested(r)}"
        if v.get("reason") != "no answer" or not vsum.get("stale_answers"):
            return f"VERBATIM COPY: {_attested(v)}, {vsum.get('stale_answers')} stale"
        if r.get("reason") != "stale nonce":
            return f"REFRAMED COPY: {_attested(r)}"
        back = _attest_answered(fleet, [d]).get(d.id)  # the device itself, online again
        if not (back or {}).get("attested"):
            return f"NOT ATTESTED AFTER: {_attested(back)}"
        return REPLAY_OK

    def replay_apply(fleet: Fleet) -> str:
        _operator(fleet)
        prefix = fleet.mqtt("modelward-operator").topic("").rstrip("/")
        for d in fleet.devices:
            replayed[d.id] = replay_one(fleet, d, prefix)
        return _newest(fleet)

    out["replayed-attestation"] = Scenario(
        "replayed-attestation", "attack", "a real attestation answer recorded off the broker, "
        "replayed to a new `fleet attest` request with the device's own MQTT credentials "
        "and the request's correlation data (verbatim, then framed under the new nonce): "
        "ignored as stale, then refused as stale nonce; never attested",
        frozenset({REPLAY_OK}), replay_apply, outcome="keep", observe=_labels(replayed),
        says="never attested from a replay")


SCENARIOS = _scenarios()
assert tuple(n for n, s in SCENARIOS.items() if s.kind == "attack") == ATTACK_NAMES
assert tuple(n for n, s in SCENARIOS.items() if s.kind == "fault") == FAULT_NAMES


def wait_all_on(fleet: Fleet, version: str, timeout: float = 180.0) -> bool:
    """Wait until every device runs ``version``."""
    return wait_for(lambda: all(d.active() == version for d in fleet.devices), timeout)


def run_report(directory: Path, devices: int,
               say: Callable[[str], None] = lambda s: None) -> list[ScenarioResult]:
    """Start a fleet, give it two good releases, run every scenario, stop the fleet."""
    from modelward.simulator._fleet import fleet_down, fleet_up

    fleet = fleet_up(directory, devices, say=say)
    results = []
    try:
        for _ in range(2):  # v1, then v2: every device has a previous model to fall back to
            version = fleet.publish()
            say(f"published {version}")
            if not wait_all_on(fleet, version):
                raise ServiceError(f"the fleet did not reach {version}: "
                                   + ", ".join(f"{d.id}={d.active()}/{d.last_error()}"
                                               for d in fleet.devices), service="fleet")
        for name in (*ATTACK_NAMES, *FAULT_NAMES):
            results.append(run(fleet, SCENARIOS[name], say=say))
    finally:
        fleet_down(directory)
    return results


def table(results: list[ScenarioResult]) -> str:
    """The report as a Markdown table."""
    lines = ["| scenario | kind | expected | observed | devices affected | recovered | "
             "data lost |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.scenario.name} | {r.scenario.kind} | {r.scenario.expected} | "
            f"{r.observed()} | {len(r.affected)}/{len(r.devices)} | {r.recovered()} | "
            f"{'none' if r.lost == 0 else f'{r.lost} device(s)'} |")
    return "\n".join(lines)


def result_json(r: ScenarioResult) -> dict[str, object]:
    """One result as JSON (``--json``)."""
    return {
        "scenario": r.scenario.name, "kind": r.scenario.kind, "ok": r.ok,
        "target": r.target, "affected": len(r.affected), "aimed": r.aimed,
        "data_lost": r.lost, "seconds_to_recover": r.seconds_to_recover,
        "devices": [o.__dict__ for o in r.devices],
    }
