"""``fleet status --summary``: the fleet in figures (issue 17), computed from the judged rows
of :mod:`modelward.publisher._fleet` and, with ``--repo``, the releases the repository
signs.

Every device has one row, so it has one share of every figure and can lie only about
itself: counts are of devices, never sums of what a device says (a device that reports
2^53 fallbacks is one device that fell back); the figures a device's numbers enter
(durations) are one sample per device, already finite and bounded by the schema
(:mod:`modelward.publisher._report_schema`), and percentiles are nearest-rank over those
samples, so one device moves a p95 by at most one rank and never to NaN or infinity.

What is counted:

* ``states``: every row (enrolled or not), by :func:`~modelward.publisher._fleet.device_state`.
* ``models``, ``versions``, ``channels``: the *believed* rows: verified and with no flag
  but ``STALE`` (a stale report is the device's last signed word; a replayed, future or
  other-fleet one is not believed at all). Keyed by the active model's name and version
  (``-`` when none) and the channel the device says it follows (``-`` for a device that
  does not say: an older agent). ``channel_versions``: the same rows per channel, model
  and version (what runs on each channel).
* ``rollouts``: per release the repository signs (the newest of each model and channel,
  not withdrawn): ``eligible`` = believed devices on that model and channel whose rollout
  position (:func:`modelward.updater.rollout.rollout_bucket`, from the enrolled id, so a
  device cannot move it) is below the release's percent; ``installed`` = eligible devices
  whose active model is that release; ``failed`` = eligible devices that do not run it and
  whose state is ``failed`` or whose report lists that release as ``rejected`` (a device
  that refused it reports ``ok`` on its old model at its next attempt: the refusal stays
  until it expires or the release changes); ``outside`` = believed devices that run it but are not
  eligible (another channel, above the percent): shown apart, so a device outside the
  rollout moves none of its figures.
* ``fallback``: ``rate`` = believed devices in state ``fell back`` / believed devices
  (the share of the fleet running its previous model after a boot-check fallback now;
  None, ``n/a``, when no report is believed: no figure from no report);
  ``ever`` = believed devices whose ``fallbacks`` counter is above 0.
* ``failure_reasons`` (:func:`failure_reasons`): per error type, the believed devices
  that count it (``devices``) and the sum of their counts, each device's capped at
  :data:`MAX_ATTEMPTS_PER_DEVICE` (``attempts``: one device moves it by at most that);
  the :data:`MAX_SHOWN_REASONS` reasons with the most devices (at a tie, the one with
  more weight first: a device naming k reasons adds 1/k to each, so all of one device's
  names weigh one device; then by name),
  and ``other``: the devices (each once) that count any of the rest, or ``other`` itself.
* ``durations``: p50 and p95 (nearest rank) and the number of samples of ``verify_s``
  and ``boot_check_s`` over the believed devices that report one (``-0.0`` is 0.0).
* ``histograms``: per duration, ``le`` (the fixed upper bounds
  :data:`~modelward.trust._report_fields.DURATION_BUCKETS`, seconds) and ``counts``: the
  same samples per bucket, not cumulative, the last one above the highest bound.
* ``silent``: the devices in state ``STALE`` or ``MISSING`` (``device``, ``state``, ``at``:
  the signing time of a stale report, "" without), sorted by id, at most
  :data:`MAX_SILENT_LISTED`; ``silent_total`` counts them all.

Names a device supplies print escaped, quoted and ASCII only (:func:`_q`): a look-alike
channel, model or version prints with ``\\u`` escapes, never as a second ``"stable"``.

With a repository, its releases are read from the trusted root already in the key
directory, and nothing is written there (:func:`repository_releases`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelward.publisher._fleet import FAILED, FELL_BACK, MISSING, STALE, STATES, DeviceRow
from modelward.trust._display import escape_ascii
from modelward.trust._report import MAX_SEQ
from modelward.trust._report_fields import DURATION_BUCKETS, DURATIONS, MAX_REASONS, OTHER_REASON
from modelward.updater.rollout import rollout_bucket

MAX_SHOWN_REASONS = 32
#: the most failed attempts of one reason (or of ``other``) one device adds to a figure:
#: a device's count is its own claim, so a device that counts more counts this many
MAX_ATTEMPTS_PER_DEVICE = 100
_ONE_DEVICE = math.lcm(*range(1, MAX_REASONS + 1))  # a device's weight, split into k
NONE = "-"
MAX_SILENT_LISTED = 500  # devices named in ``silent`` (the count is of all)


@dataclass(frozen=True)
class RolloutRelease:
    """A release the repository signs, as the fleet view needs it.

    Attributes:
        name, version, channel: from its signed ``modelward`` fields.
        percent: its rollout share, 0 to 100.
        halted: the operator halted it.
    """

    name: str
    version: str
    channel: str
    percent: float
    halted: bool = False


def believed(row: DeviceRow) -> bool:
    """Whether the row's report is believed as what the device last said (module doc)."""
    return row.verified and set(row.flags) <= {STALE}


def _active(report: dict[str, Any]) -> tuple[str, str]:
    a = report.get("active")
    return (a["name"], a["version"]) if isinstance(a, dict) else (NONE, NONE)


def _model(report: dict[str, Any]) -> str:
    m = report.get("model")
    return m if isinstance(m, str) else _active(report)[0]


def percentile(samples: list[float], p: float) -> float | None:
    """Nearest-rank percentile (pure); None without samples."""
    if not samples:
        return None
    s = sorted(samples)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def failure_reasons(good: list[DeviceRow]) -> dict[str, dict[str, int]]:
    """``failure_reasons`` of the summary over the believed rows (pure; module doc).

    Each device is one share: it adds 1 to the ``devices`` of each reason it names and at
    most :data:`MAX_ATTEMPTS_PER_DEVICE` to its ``attempts``; the shown reasons are ranked
    by devices, then by weight (a device naming k reasons adds 1/k to each, so all of one
    device's names together weigh one device and lose a tie to a reason a device reports
    alone), then by name; ``other`` counts each device once, however many of the rest
    (or a reason the device itself reported as ``other``) it names.
    """
    named: list[dict[str, int]] = [r.report.get("failure_reasons") or {} for r in good]
    devices: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    weight: Counter[str] = Counter()  # in 1/_ONE_DEVICE of a device: exact integers
    for reasons in named:
        for reason, n in reasons.items():
            devices[reason] += 1
            attempts[reason] += min(n, MAX_ATTEMPTS_PER_DEVICE)
            weight[reason] += _ONE_DEVICE // len(reasons)
    ranked = sorted((k for k in devices if k != OTHER_REASON),
                    key=lambda k: (-devices[k], -weight[k], k))
    shown = ranked[:MAX_SHOWN_REASONS]
    out = {k: {"devices": devices[k], "attempts": min(attempts[k], MAX_SEQ)} for k in shown}
    rest = set(ranked[MAX_SHOWN_REASONS:]) | {OTHER_REASON}
    other = [min(sum(n for k, n in reasons.items() if k in rest), MAX_ATTEMPTS_PER_DEVICE)
             for reasons in named if rest & reasons.keys()]
    if other:
        out[OTHER_REASON] = {"devices": len(other), "attempts": min(sum(other), MAX_SEQ)}
    return out


def histogram(samples: list[float]) -> list[int]:
    """Counts of ``samples`` per bucket of :data:`DURATION_BUCKETS` (``<= le``), then one
    above the highest bound (pure)."""
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    for v in samples:
        counts[next((i for i, le in enumerate(DURATION_BUCKETS) if v <= le),
                    len(DURATION_BUCKETS))] += 1
    return counts


def _rejects(report: dict[str, Any], rel: RolloutRelease) -> bool:
    return any(r.get("model") == rel.name and r.get("version") == rel.version
               for r in report.get("rejected") or ())


def summarize(rows: Iterable[DeviceRow], releases: Iterable[RolloutRelease] = ()
              ) -> dict[str, Any]:
    """The figures of ``--summary`` (pure; module doc); JSON-ready, every number finite."""
    rows = list(rows)
    good = [r for r in rows if believed(r)]
    states = Counter(r.state for r in rows)
    versions = Counter(_active(r.report) for r in good)
    models = Counter(_active(r.report)[0] for r in good)
    channels = Counter(str(r.report.get("channel", NONE)) for r in good)
    per_channel = Counter((str(r.report.get("channel", NONE)), *_active(r.report)) for r in good)
    fell = sum(1 for r in good if r.state == FELL_BACK)
    ever = sum(1 for r in good if (r.report.get("counters") or {}).get("fallbacks", 0) > 0)

    reasons = failure_reasons(good)
    silent = sorted((r for r in rows if r.state in (STALE, MISSING)), key=lambda r: r.device_id)

    durations: dict[str, dict[str, Any]] = {}
    histograms: dict[str, dict[str, Any]] = {}
    for name in DURATIONS:
        samples = [float(v) + 0.0 for r in good  # (+ 0.0: -0.0 is 0.0)
                   if isinstance(v := (r.report.get("durations") or {}).get(name), int | float)
                   and math.isfinite(v)]
        durations[name] = {"p50": percentile(samples, 50), "p95": percentile(samples, 95),
                           "samples": len(samples)}
        histograms[name] = {"le": list(DURATION_BUCKETS), "counts": histogram(samples)}

    rollouts = []
    for rel in releases:
        on = [r for r in good if _model(r.report) == rel.name
              and r.report.get("channel") == rel.channel]
        eligible = [r for r in on
                    if rollout_bucket(r.device_id, rel.name, rel.version) < rel.percent]
        # installed and failed are of the eligible devices only: a device outside the
        # rollout (another channel, above the percent) moves no figure of it but its own
        # count of running it anyway
        runs = {r.device_id for r in good if _active(r.report) == (rel.name, rel.version)}
        installed = [r for r in eligible if r.device_id in runs]
        failed = [r for r in eligible if r.device_id not in runs
                  and (r.state == FAILED or _rejects(r.report, rel))]
        rollouts.append({"model": rel.name, "version": rel.version, "channel": rel.channel,
                         "percent": rel.percent, "halted": rel.halted,
                         "devices": len(on), "eligible": len(eligible),
                         "installed": len(installed), "failed": len(failed),
                         "outside": len(runs) - len(installed)})

    return {
        "devices": len(rows),
        "believed": len(good),
        "states": {s: states.get(s, 0) for s in STATES},
        "models": dict(sorted(models.items())),
        "versions": [{"model": m, "version": v, "devices": n}
                     for (m, v), n in sorted(versions.items())],
        "channels": dict(sorted(channels.items())),
        "channel_versions": [{"channel": c, "model": m, "version": v, "devices": n}
                             for (c, m, v), n in sorted(per_channel.items())],
        "rollouts": rollouts,
        "fallback": {"fell_back": fell, "ever": ever, "of": len(good),
                     "rate": fell / len(good) if good else None},  # (no report: n/a)
        "failure_reasons": reasons,
        "durations": durations,
        "histograms": histograms,
        "silent": [{"device": r.device_id, "state": r.state,
                    "at": str(r.report.get("at", "")) if r.verified else ""}
                   for r in silent[:MAX_SILENT_LISTED]],
        "silent_total": len(silent),
    }


def summary_json(summary: dict[str, Any]) -> str:
    """``--summary --json``: strict JSON (no NaN or Infinity; ASCII)."""
    return json.dumps(summary, allow_nan=False, sort_keys=False)


def _s(v: object) -> str:
    """A seconds figure for people."""
    return NONE if v is None else f"{v:.3f}s"


def _q(text: object) -> str:
    """A device-supplied name for the terminal: escaped, cut and in double quotes (a quote
    in it is ``\\"``; :func:`escape_ascii` doubles backslashes), so no name can read as
    more entries or counts (``stable 100, beta``) or start a line, and ASCII only (a
    look-alike letter prints as its ``\\u`` escape: no second ``"stable"``)."""
    return '"' + escape_ascii(text, 64).replace('"', '\\"') + '"'


def format_summary(summary: dict[str, Any]) -> str:
    """``--summary`` for people; every device-supplied name escaped, cut and quoted
    (:func:`_q`)."""
    out = [f"devices: {summary['devices']} ({summary['believed']} with a believed report)",
           "states: " + ", ".join(f"{s} {n}" for s, n in summary["states"].items() if n)]
    out.append("models: " + (", ".join(f"{_q(m)} {n}"
                                       for m, n in summary["models"].items()) or NONE))
    out.append("channels: " + (", ".join(f"{_q(c)} {n}"
                                         for c, n in summary["channels"].items()) or NONE))
    out.append("versions:")
    out += [f"  {_q(v['model'])} {_q(v['version'])}: {v['devices']}"
            for v in summary["versions"]] or ["  -"]
    out.append("rollouts (eligible / installed / failed):")
    out += [f"  {_q(r['model'])} {_q(r['version'])} on {_q(r['channel'])} at "
            f"{r['percent']:g}%"
            f"{' HALTED' if r['halted'] else ''}: {r['eligible']} / {r['installed']} / "
            f"{r['failed']} of {r['devices']} on its model and channel"
            + (f"; {r['outside']} outside the rollout run it" if r["outside"] else "")
            for r in summary["rollouts"]] or ["  - (give --repo and --keys)"]
    fb = summary["fallback"]
    rate = "n/a" if fb["rate"] is None else f"{fb['rate']:.1%}"
    out.append(f"fallback rate: {rate} ({fb['fell_back']} of {fb['of']} devices "
               f"fell back; {fb['ever']} ever did)")
    out.append("failure reasons (devices, attempts):")
    out += [f"  {_q(k)}: {v['devices']}, {v['attempts']}"
            for k, v in summary["failure_reasons"].items()] or ["  -"]
    for name, d in summary["durations"].items():
        out.append(f"{name}: p50 {_s(d['p50'])}, p95 {_s(d['p95'])} ({d['samples']} devices)")
    return "\n".join(out)


def repository_releases(repo_dir: Path, keys: Path, names: Iterable[str]
                        ) -> list[RolloutRelease]:
    """The newest release of each model in ``names`` per channel, as devices find it in
    the repository at ``repo_dir`` (verified from the root anchored in ``keys``), not
    withdrawn; the operator's own entry for a version wins over a team's. Read-only:
    ``keys`` must hold its ``trusted-root.json`` already (never the served root adopted
    on first use, which would write the anchor there and believe any root served).

    Raises:
        MissingAnchorError: ``keys`` holds no trusted root (nothing is written).
        RepositoryStateError: the repository does not verify (naming the file).
    """
    from modelward.publisher._repo import Repository
    from modelward.updater.bundle._fields import Fields, modelward_field, read_fields
    from modelward.updater.install._search import TOP

    repo = Repository(repo_dir, keys, b"unused: the fleet view reads public metadata only")
    repo.adopt_anchor = False
    targets = repo.current()[0]
    newest: dict[tuple[str, str], Fields] = {}
    for name in sorted(set(names)):
        read: list[tuple[Fields, str]] = []
        for f in repo.releases(name, targets):
            try:  # the device's own reading of the signed fields
                read.append((read_fields(modelward_field(f.target.custom) or {}), f.role))
            except (KeyError, ValueError, TypeError, AttributeError):
                continue  # (a target devices ignore)
        top = {fl.version for fl, role in read if role == TOP}
        for fl, role in read:
            if fl.withdrawn or fl.name != name or (fl.version in top and role != TOP):
                continue
            key = (name, fl.channel)
            if key not in newest or newest[key].version < fl.version:
                newest[key] = fl
    return [RolloutRelease(name, str(fl.version), channel, fl.percent, fl.halted)
            for (name, channel), fl in sorted(newest.items())]


def model_names(rows: Iterable[DeviceRow]) -> list[str]:
    """The models the believed rows follow (what ``--repo`` looks up)."""
    return sorted({_model(r.report) for r in rows if believed(r)} - {NONE})
