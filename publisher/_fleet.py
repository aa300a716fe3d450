"""The operator's fleet registry (enrolled identity keys) and the fleet status view.

``fleet status`` believes a signed report only as the device's *current* state when it is
fresh: signed for this fleet, with a sequence number above the newest one seen from that
device (persisted in ``fleet_dir/seen/<id>.json``), and signed less than three poll
intervals ago. Otherwise the row is flagged ``REPLAYED``, ``STALE``, ``FUTURE`` or
``OTHER_FLEET``; an enrolled device without a report is ``MISSING``. A replay of a report
the operator never saw (sent and overwritten between two runs) is newer than anything it
knows, so only its age can give it away (``STALE``).

Each row has one fleet **state** (:func:`device_state`, issue 17), from its flags and
then from the verified report: ``REJECTED``, ``MISSING``, ``STALE`` (and the other
freshness flags) as above; otherwise ``updating`` (the report's journal step is one of an
install in progress), ``fell back`` (its last error is a boot-check's fallback to the
previous model, not yet cleared by a successful attempt), ``failed`` (its last error is
any other: the last attempt failed after the last success, which clears it; or the report's
``rejected`` list names a release of its active model newer than the one it runs: it
refused the upgrade it is offered, and its next attempt, which skips that release, clears
the error but not the refusal) or ``ok``.

Device data is hostile even when it is signed (issue 14 finding 6): a report is cut at
:data:`~modelward.trust._report.MAX_REPORT_BYTES` as it arrives, parsed only with a size and depth
bound, verified, then schema-checked (:func:`modelward.publisher._report_schema.check_report`); a
report that fails any step is one ``REJECTED`` row with a short escaped reason, never a
failed command. Every device-supplied string is escaped (:func:`publisher._display.escape`)
in the table, and the ``--json`` form (:func:`rows_json`) is strict JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelward.publisher._broker_config import STATUS_BATCH, check_id
from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.publisher.errors import OperatorInputError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import loads_bounded
from modelward.trust._display import display_width, escape, escape_id, pad
from modelward.trust._report import (
    MAX_REPORT_BYTES,
    MAX_SEQ,
    ReportSignatureError,
    report_digest,
    verify_report,
)
from modelward.trust._report_fields import FALLBACK_ERROR
from modelward.updater.errors import TransportError
from modelward.updater.install._journal import RESTING
from modelward.updater.install._journal import STEPS as JOURNAL_STEPS
from modelward.updater.transport._mqtt import MqttConfig, MqttConnection
from modelward.updater.transport._mqttconn import guarded


def add_device(fleet_dir: Path, device_id: str, public_pem: bytes, source: str = "") -> Path:
    """Record a device's enrolled TPM identity key (``fleet_dir/devices/<id>.pem``);
    ``source`` names where the key came from, in errors (``--key FILE``).

    Raises:
        OperatorInputError: bad id, or not a P-256 public key.
    """
    check_id("device id", device_id)
    where = f" ({source})" if source else ""
    try:
        key = serialization.load_pem_public_key(public_pem)
    except ValueError as e:
        raise OperatorInputError(f"the key for {device_id}{where} is not a PEM public key",
                                 hint="give the PEM that `agent enroll` printed") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise OperatorInputError(f"the key for {device_id}{where} is not an ECC P-256 key",
                                 hint="give the PEM that `agent enroll` printed")
    path = fleet_dir / "devices" / f"{device_id}.pem"
    write_atomic(path, public_pem)
    return path


STALE_POLLS = 3  # a report older than this many poll intervals is STALE
MAX_CLOCK_SKEW = 300.0  # s a report may be dated ahead of the operator's clock
DEFAULT_POLL_INTERVAL = 3600.0  # s, the agent's default, for reports that carry none
_SEEN_MAX_BYTES = 4096

OK = "ok"
REJECTED = "REJECTED"
MISSING = "MISSING"
OTHER_FLEET = "OTHER_FLEET"
REPLAYED = "REPLAYED"
FUTURE = "FUTURE"
STALE = "STALE"
UPDATING = "updating"
FELL_BACK = "fell back"
FAILED = "failed"
#: the fleet states, in the order ``--summary`` lists them
STATES = (OK, UPDATING, FELL_BACK, FAILED, STALE, MISSING, REJECTED, REPLAYED, FUTURE,
          OTHER_FLEET)
#: journal steps of an install in progress (the resting ones are idle, active, failed)
IN_PROGRESS = frozenset(JOURNAL_STEPS) - frozenset(RESTING)


@dataclass(frozen=True)
class Seen:
    """The newest report the operator has seen from one device (persisted per device).

    Attributes:
        seq: its sequence number.
        digest: :func:`modelward.trust._report.report_digest` of it.
    """

    seq: int
    digest: str


@dataclass(frozen=True)
class Judgement:
    """How fresh a verified report is.

    Attributes:
        flags: empty when the report is current; else some of OTHER_FLEET, REPLAYED,
            FUTURE, STALE, MISSING, in that order.
        detail: why, for people.
        seen: the newest report seen once this one is taken into account.
    """

    flags: tuple[str, ...]
    detail: str
    seen: Seen | None


def _seq_of(report: dict[str, Any]) -> int | None:
    seq = report.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ:
        return seq
    return None


def _time_of(report: dict[str, Any]) -> float | None:
    at = report.get("at")
    if not isinstance(at, str) or len(at) > 64:
        return None
    try:
        t = datetime.fromisoformat(at)
    except ValueError:
        return None
    return t.timestamp() if t.tzinfo is not None else None


def _poll_of(report: dict[str, Any], default: float) -> float:
    p = report.get("poll_interval")
    if isinstance(p, int | float) and not isinstance(p, bool) and 0 < p < 10**9:
        return float(p)
    return default


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def judge_report(report: dict[str, Any] | None, digest: str, *, seen: Seen | None,
                 now: float, fleet: str,
                 default_poll: float = DEFAULT_POLL_INTERVAL) -> Judgement:
    """Decide whether a device's verified report is its current state (pure).

    Args:
        report: the verified report, or None when the device's topic holds none (never
            sent, or cleared by an empty retained message).
        digest: ``report_digest(report)`` ("" when there is none).
        seen: the newest report seen before from this device, if any.
        now: the operator's clock, seconds since the epoch.
        fleet: the fleet whose topics the report came from.
        default_poll: the poll interval of a report that carries none.

    Returns:
        The flags; ``seen`` moves forward only for an in-fleet report, not dated in the
        future, with a higher sequence number.
    """
    if report is None:
        detail = "no status report"
        if seen is not None:
            detail += f" (seq {seen.seq} was seen before: cleared or lost)"
        return Judgement((MISSING,), detail, seen)
    flags: list[str] = []
    details: list[str] = []
    if report.get("fleet") != fleet:
        flags.append(OTHER_FLEET)
        details.append(f"signed for fleet {str(report.get('fleet'))[:40]!r}, not {fleet!r}")
    seq = _seq_of(report)
    if seq is None:
        flags.append(REPLAYED)
        details.append("no sequence number: cannot be told from a replay")
    elif seen is not None and seq < seen.seq:
        flags.append(REPLAYED)
        details.append(f"seq {seq} is older than seq {seen.seq} seen before")
    elif seen is not None and seq == seen.seq and digest != seen.digest:
        flags.append(REPLAYED)
        details.append(f"seq {seq} was seen before on another report")
    at = _time_of(report)
    poll = _poll_of(report, default_poll)
    if at is None:
        flags.append(STALE)
        details.append("no valid signing time")
    elif at > now + MAX_CLOCK_SKEW:
        flags.append(FUTURE)
        details.append(f"dated {_age(at - now)} ahead of this clock")
    elif now - at > STALE_POLLS * poll:
        flags.append(STALE)
        details.append(f"{_age(now - at)} old, poll interval {_age(poll)}")
    newer = (seq is not None and OTHER_FLEET not in flags and FUTURE not in flags
             and (seen is None or seq > seen.seq))
    return Judgement(tuple(flags), "; ".join(details),
                     Seen(seq, digest) if newer and seq is not None else seen)


@dataclass(frozen=True)
class DeviceRow:
    """One line of ``fleet status``.

    Attributes:
        device_id: the device (enrolled, or named by the topic).
        verified: the report's signature verified with the device's enrolled key and its
            content passed the schema check.
        problem: why it is not ``ok`` ("" when it is); escaped, at most ~200 characters.
        report: the verified, schema-checked report ({} when there is none).
        flags: REJECTED, MISSING, OTHER_FLEET, REPLAYED, FUTURE, STALE; empty when ok.
    """

    device_id: str
    verified: bool
    problem: str
    report: dict[str, Any]
    flags: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        """The first flag, or ``ok``."""
        return self.flags[0] if self.flags else OK

    @property
    def state(self) -> str:
        """The fleet state (:func:`device_state`)."""
        return device_state(self.flags, self.report if self.verified else {})


def device_state(flags: tuple[str, ...], report: dict[str, Any]) -> str:
    """One of :data:`STATES` for a row's flags and its verified, schema-checked report
    (pure; module docstring). A report that is not current (any flag) says nothing about
    the device now, so the first flag is its state."""
    if flags:
        return flags[0]
    if report.get("state") in IN_PROGRESS:
        return UPDATING
    err = report.get("last_error")
    if isinstance(err, dict):
        return FELL_BACK if err.get("type") == FALLBACK_ERROR else FAILED
    return FAILED if refuses_upgrade(report) else OK


def refuses_upgrade(report: dict[str, Any]) -> bool:
    """Whether the schema-checked ``report``'s ``rejected`` list names a release of the
    model it runs (or follows, with none active) newer than the active one (pure). A
    version that is not semver says nothing; the list is bounded by the schema."""
    from modelward.updater.bundle._semver import SemVer

    active = report.get("active")
    model = active["name"] if isinstance(active, dict) else report.get("model")
    try:
        running = SemVer.parse(active["version"]) if isinstance(active, dict) else None
    except ValueError:
        return False
    for r in report.get("rejected") or ():
        if r.get("model") != model:
            continue
        try:
            v = SemVer.parse(r.get("version", ""))
        except ValueError:
            continue
        if running is None or running < v:
            return True
    return False


def _seen_path(fleet_dir: Path, device: str) -> Path:
    return fleet_dir / "seen" / f"{device}.json"


def read_seen(fleet_dir: Path, device: str) -> Seen | None:
    """The newest report seen from ``device``, from the operator's fleet state.

    Raises:
        OperatorInputError: the file exists but is not one this tool wrote.
    """
    path = _seen_path(fleet_dir, device)
    try:
        with path.open("rb") as f:
            data = f.read(_SEEN_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OperatorInputError(f"cannot read fleet state {path}: {e}") from e
    try:
        doc = loads_bounded(data, max_bytes=_SEEN_MAX_BYTES, max_depth=1, what=str(path))
        seq, digest = doc["seq"], doc["digest"]
        if (len(data) > _SEEN_MAX_BYTES or not isinstance(seq, int) or isinstance(seq, bool)
                or not isinstance(digest, str)):
            raise ValueError("fields")
    except (ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(
            f"fleet state {path} is damaged ({e}); delete it to trust the next report "
            f"of {device} as its newest") from e
    return Seen(seq, digest)


def write_seen(fleet_dir: Path, device: str, seen: Seen) -> None:
    """Persist the newest report seen from ``device`` (atomically)."""
    write_atomic(_seen_path(fleet_dir, device),
                 json.dumps({"seq": seen.seq, "digest": seen.digest}).encode())


def enrolled_devices(fleet_dir: Path) -> list[str]:
    """The ids of every enrolled device (``fleet_dir/devices/<id>.pem``)."""
    d = fleet_dir / "devices"
    return sorted(p.name[:-len(".pem")] for p in d.glob("*.pem")) if d.is_dir() else []


def collect_reports(cfg: MqttConfig, devices: list[str], wait: float = 2.0,
                    batch: int = STATUS_BATCH) -> dict[str, bytes]:
    """The retained status payloads of ``devices``, by device id.

    The broker holds few messages for one client (``max_queued_messages``, 24: see
    :data:`~modelward.publisher._broker_config.MAX_QUEUED_MESSAGES`), so the statuses are
    not asked for with one wildcard (every device's report at once), but by topic, at most
    ``batch`` at a time: one SUBSCRIBE of a batch's topics and at once an UNSUBSCRIBE of
    them. mosquitto handles a client's packets in order: it sends the SUBACK and then that
    batch's retained reports (at most ``batch`` of 64 KiB, all in flight at once: within
    the receive maximum and ``max_inflight_bytes``, none queued), then the UNSUBACK, which
    marks the batch's end; only then is the next batch asked for. So the broker never
    holds more than one batch for this client, whatever the fleet's size.

    Only ``devices`` are asked for (the enrolled ones: ``fleet status`` can verify no
    other's report). A device the broker knows but the fleet registry does not is not
    listed: ``fleet add-device`` it, or compare the registry with ``broker-config``'s
    device list.

    Raises:
        TransportError: the broker is unreachable, refuses the operator, refuses a
            subscription, or does not end a batch within ``max(wait, connect_timeout)``.
    """
    prefix = cfg.topic("devices/")
    got: dict[str, bytes] = {}
    lock = threading.Lock()
    asked: dict[int, tuple[threading.Event, list[str]]] = {}  # packet id -> done, refusals

    def on_message(msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(prefix) and msg.topic.endswith("/status"):
            with lock:
                # cut as it arrives: verify_report refuses what is over the bound
                got[msg.topic[len(prefix):-len("/status")]] = bytes(
                    msg.payload[:MAX_REPORT_BYTES + 1])

    topics = [cfg.topic(f"devices/{check_id('device id', d)}/status") for d in devices]
    if not topics:
        return {}
    conn = MqttConnection(cfg, f"{cfg.client_name}-status-{time.monotonic_ns() % 10**6}",
                          [], on_message)
    c = conn.client
    own_suback: Any = c.on_subscribe  # (MqttConnection's, guarded)

    def on_subscribe(client: Any, u: Any, mid: int, rcs: list[Any], p: Any) -> None:
        with lock:
            waiter = asked.get(mid)
            if waiter is not None:
                waiter[1].extend(str(r) for r in rcs[:8] if r.is_failure)
                return
        if own_suback is not None:
            own_suback(client, u, mid, rcs, p)

    def on_unsubscribe(_c: Any, _u: Any, mid: int, _rcs: Any, _p: Any) -> None:
        with lock:
            waiter = asked.pop(mid, None)
        if waiter is not None:
            waiter[0].set()

    c.on_subscribe = guarded(on_subscribe)
    c.on_unsubscribe = guarded(on_unsubscribe)
    timeout = max(wait, cfg.connect_timeout)
    try:
        for i in range(0, len(topics), batch):
            part = topics[i:i + batch]
            done, refused = threading.Event(), list[str]()
            with lock:  # (the SUBACK and UNSUBACK may come before the ids are noted)
                rc, sub_mid = c.subscribe([(t, 1) for t in part])
                rc2, unsub_mid = c.unsubscribe(part)
                if rc or rc2 or sub_mid is None or unsub_mid is None:
                    raise TransportError(f"cannot ask broker {cfg.host}:{cfg.port} for "
                                         f"status reports: {mqtt.error_string(rc or rc2)}")
                asked[sub_mid] = (threading.Event(), refused)
                asked[unsub_mid] = (done, refused)
            if not done.wait(timeout):
                raise TransportError(f"broker {cfg.host}:{cfg.port} did not answer for the "
                                     f"status reports of {part[0][len(prefix):-7]!r} and "
                                     f"{len(part) - 1} more within {timeout:g} s")
            with lock:
                asked.pop(sub_mid, None)
            if refused:
                raise TransportError(f"broker {cfg.host}:{cfg.port} refused the operator's "
                                     f"subscription to {part[0]}: {refused[0]}",
                                     hint="check the broker ACL for modelward-operator")
    finally:
        conn.close()
    with lock:
        return dict(got)


def judge_fleet(payloads: dict[str, bytes], fleet_dir: Path, fleet: str, now: float,
                default_poll: float = DEFAULT_POLL_INTERVAL) -> list[DeviceRow]:
    """One row per enrolled device and per other device that sent something.

    Verifies each payload with the device's enrolled key, judges its freshness against
    the newest report seen before (``fleet_dir/seen/<id>.json``), and moves that forward.
    An empty payload (a cleared retained message) counts as no report.

    Raises:
        OperatorInputError: no registry at ``fleet_dir``, or its fleet state is damaged.
    """
    if not fleet_dir.is_dir():
        raise OperatorInputError(f"no fleet registry at {fleet_dir}",
                                 hint="enrol devices there with `fleet add-device`")
    enrolled = set(enrolled_devices(fleet_dir))
    with _seen_lock(fleet_dir):
        return [_judge_device(device, payloads.get(device, b""), device in enrolled,
                              fleet_dir, fleet, now, default_poll)
                for device in sorted(enrolled | {d for d, p in payloads.items() if p})]


@contextmanager
def _seen_lock(fleet_dir: Path) -> Iterator[None]:
    """Two ``fleet status`` runs at once must not move a device's newest seq back."""
    d = fleet_dir / "seen"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise OperatorInputError(f"cannot lock fleet state in {d}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _judge_device(device: str, payload: bytes, enrolled: bool, fleet_dir: Path, fleet: str,
                  now: float, default_poll: float) -> DeviceRow:
    pem = (fleet_dir / "devices" / f"{device}.pem").read_bytes() if enrolled else None
    if not payload:
        j = judge_report(None, "", seen=read_seen(fleet_dir, device), now=now, fleet=fleet,
                         default_poll=default_poll)
        return DeviceRow(device, False, j.detail, {}, j.flags)
    try:
        report = verify_report(payload, pem, device)
    except ReportSignatureError as e:
        return DeviceRow(device, False, escape(e), {}, (REJECTED,))
    try:
        check_report(report)
    except ReportSchemaError as e:  # validly signed, but not what a device writes
        return DeviceRow(device, False, escape(f"signed, but {e}"), {}, (REJECTED,))
    seen = read_seen(fleet_dir, device)
    j = judge_report(report, report_digest(report), seen=seen, now=now, fleet=fleet,
                     default_poll=default_poll)
    if j.seen is not None and j.seen != seen:
        write_seen(fleet_dir, device, j.seen)
        from modelward.publisher._audit import keep_report

        keep_report(fleet_dir, device, payload)  # (its audit head, for `fleet audit`)
    return DeviceRow(device, True, j.detail, report, j.flags)


def collect_status(cfg: MqttConfig, fleet_dir: Path, wait: float = 2.0,
                   clock: Callable[[], float] = time.time,
                   default_poll: float = DEFAULT_POLL_INTERVAL) -> list[DeviceRow]:
    """Read the retained status reports of the fleet, verify and judge each one.

    Reports that fail verification are returned flagged, never trusted; every enrolled
    device gets a row, ``MISSING`` when it has no report.

    Raises:
        OperatorInputError: no registry at ``fleet_dir``, or its fleet state is damaged.
        TransportError: as :func:`collect_reports`.
    """
    if not fleet_dir.is_dir():  # (before the broker is asked: judge_fleet says so too)
        raise OperatorInputError(f"no fleet registry at {fleet_dir}",
                                 hint="enrol devices there with `fleet add-device`")
    return judge_fleet(collect_reports(cfg, enrolled_devices(fleet_dir), wait), fleet_dir,
                       cfg.fleet, clock(), default_poll)


_SPACES = re.compile(" {2,}")


def _cell(text: str) -> str:
    """A cell never holds the column separator (two spaces): in a run of spaces all but
    the first are escaped, so a device's ``x  ok  ok`` cannot read as more cells."""
    return _SPACES.sub(lambda m: " " + "\\x20" * (len(m.group()) - 1), text)


def format_table(rows: list[DeviceRow]) -> str:
    """A plain table for people; every device-supplied string is escaped and cut, device
    ids to the enrolled-id alphabet (:func:`~modelward.trust._display.escape_id`), no cell holds two
    spaces in a row (the column separator), and the columns line up by display width."""

    def model(m: Any) -> str:
        return f"{escape(m['name'], 64)} {escape(m['version'], 64)}" \
            if isinstance(m, dict) else "-"

    head = ("DEVICE", "STATE", "SIGNATURE", "REPORT", "ACTIVE", "PREVIOUS", "CHANNEL", "STEP",
            "LAST ERROR", "AT", "SEQ")
    lines = [head]
    for r in rows:
        rep = r.report if r.verified else {}
        err = rep.get("last_error") or {}
        if r.verified:
            signature = "ok"
        elif REJECTED in r.flags:
            signature = f"REJECTED: {escape(r.problem)}"
        else:
            signature = "-"
        freshness = OK if not r.flags else ",".join(r.flags)
        if r.flags and REJECTED not in r.flags:
            freshness += f": {escape(r.problem)}"
        lines.append((
            escape_id(r.device_id),
            r.state,
            signature,
            freshness,
            model(rep.get("active")),
            model(rep.get("previous")),
            escape(rep.get("channel", "-"), 64),
            escape(rep.get("state", "-"), 64),
            escape(err.get("type", "-"), 64),
            escape(rep.get("at", "-"), 64),
            escape(rep.get("seq", "-"), 64),
        ))
    # padded by terminal columns, not characters: a fullwidth name (two columns each) or
    # kept combining marks (none) must not move the rest of a row out of its columns
    cells = [[_cell(c) for c in row] for row in lines]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(pad(c, w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def row_json(r: DeviceRow) -> dict[str, Any]:
    """One row of ``fleet status --json``."""
    return {"device": r.device_id, "state": r.state, "status": r.status,
            "flags": list(r.flags),
            "verified": r.verified, "problem": r.problem, "report": r.report}


def rows_json(rows: list[DeviceRow]) -> str:
    """``fleet status --json``: strict JSON (no NaN or Infinity, no lone surrogate, ASCII
    only).

    The schema check leaves only finite numbers; a row that still would not encode
    strictly is shown ``REJECTED`` in its place rather than failing the command.
    """
    out: list[str] = []
    for r in rows:
        try:
            doc = row_json(r)
            # I-JSON (RFC 7493): every string UTF-8 text; a lone surrogate (which the
            # schema refuses in a report, but a topic's id or a future field could carry)
            # would be written "\\ud800", and strict readers refuse the whole output
            json.dumps(doc, allow_nan=False, ensure_ascii=False).encode("utf-8")
            out.append(json.dumps(doc, allow_nan=False))
        except (ValueError, TypeError, RecursionError) as e:  # UnicodeError: ValueError
            bad = DeviceRow(escape(r.device_id, None), False,
                            escape(f"not encodable as JSON: {e}"), {}, (REJECTED,))
            out.append(json.dumps(row_json(bad), allow_nan=False))
    return "[" + ", ".join(out) + "]"
