"""Attack and fault scenarios against a running simulated fleet, and the report table."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator._attacks import RepoAttacker
from simulator._catalogue import ATTACK_NAMES, FAULT_NAMES
from simulator._fleet import Device, Fleet, wait_for
from simulator.errors import ServiceError
from trust._bounded import read_json_file

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
    """

    name: str
    kind: str
    expected: str
    errors: frozenset[str]
    apply: Callable[[Fleet], str]
    clear: Callable[[Fleet], str | None] = lambda f: None
    affects: Callable[[Device], bool] = lambda d: True
    boot: bool = False


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

    @property
    def affected(self) -> list[DeviceOutcome]:
        """Aimed devices that refused with an expected error and kept their model (at
        boot: fell back to their previous one)."""
        return [o for o in self.devices if o.id in self.aimed_ids
                and o.error in self.scenario.errors
                and (o.during is not None if self.scenario.boot else o.during == o.before)]

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
        errors = sorted({o.error for o in self.affected if o.error})
        kept = sum(1 for o in self.devices if o.during == o.before)
        text = f"{len(self.affected)}/{self.aimed} refused ({', '.join(errors) or '-'})"
        if self.scenario.boot:
            return f"{len(self.affected)}/{self.aimed} fell back to their previous model at boot"
        others = [o for o in self.devices if o.id not in self.aimed_ids]
        if others:
            moved = sum(1 for o in others if o.during != o.before)
            return text + f" and kept their model; {moved}/{len(others)} others updated"
        return text + f"; {kept}/{len(self.devices)} kept their model"

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
    from trust import directory_entries, slot_fingerprint

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

    def reacted(d: Device) -> bool:
        if sc.boot:
            return True
        return d.attempts() > base[d.id][0] and (
            d.last_error() in sc.errors or d.active() != base[d.id][1])

    wait_for(lambda: all(reacted(d) for d in aimed)
             and all(d.active() == target for d in others), timeout)
    outcomes = [DeviceOutcome(d.id, d.transport, base[d.id][1], d.active(), d.last_error())
                for d in fleet.devices]
    say("  observed: " + ", ".join(f"{o.id}={o.during}/{o.error}" for o in outcomes))
    started = time.monotonic()
    target = sc.clear(fleet) or target
    done = wait_for(lambda: all(d.active() == target and d.last_error() is None
                                and _settled(d) for d in fleet.devices), timeout)
    result = ScenarioResult(sc, outcomes, target,
                            time.monotonic() - started if done else None,
                            aimed_ids={d.id for d in aimed})
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
    from trust import slot_fingerprint
    from updater import extract_bundle

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
            subprocess.run([sys.executable, "-m", "modelward", "agent", "boot-check",
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
    return out


SCENARIOS = _scenarios()
assert tuple(n for n, s in SCENARIOS.items() if s.kind == "attack") == ATTACK_NAMES
assert tuple(n for n, s in SCENARIOS.items() if s.kind == "fault") == FAULT_NAMES


def wait_all_on(fleet: Fleet, version: str, timeout: float = 180.0) -> bool:
    """Wait until every device runs ``version``."""
    return wait_for(lambda: all(d.active() == version for d in fleet.devices), timeout)


def run_report(directory: Path, devices: int,
               say: Callable[[str], None] = lambda s: None) -> list[ScenarioResult]:
    """Start a fleet, give it two good releases, run every scenario, stop the fleet."""
    from simulator._fleet import fleet_down, fleet_up

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
