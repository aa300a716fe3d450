"""``fleet exporter``: the fleet summary (:mod:`modelward.publisher._fleet_summary`) as
Prometheus metrics, refreshed every few seconds, served on the one address given by
prometheus_client's handler in a server that bounds idle and slow clients
(:mod:`modelward.publisher._metrics_http`).

Device-supplied label values (model, version, channel, failure reason: a verified report
says what its device chooses) are bounded before they become labels: each is cut to
:data:`MAX_LABEL_CHARS` characters, and each metric keeps at most :data:`MAX_LABEL_VALUES`
distinct values (the ones with the most devices), the rest summed under ``other``. So a
fleet of devices that each claim their own channel adds at most that many series, and
prometheus_client escapes what is kept (quotes, backslashes, newlines).

Metrics (gauges: a summary is a snapshot of the fleet, not a count since start):

* ``modelward_fleet_devices``, ``modelward_fleet_believed_devices``;
* ``modelward_fleet_state_devices{state}``, ``..._model_devices{model}``,
  ``..._version_devices{model,version}``, ``..._channel_devices{channel}``;
* ``modelward_fleet_rollout_{eligible,installed,failed}_devices{model,version,channel}``,
  ``modelward_fleet_rollout_ratio`` (its percent / 100), ``modelward_fleet_rollout_halted``;
* ``modelward_fleet_fallback_ratio``, ``..._fell_back_devices``, ``..._fallback_ever_devices``;
* ``modelward_fleet_failure_reason_devices{reason}``, ``..._failure_reason_attempts{reason}``;
* ``modelward_fleet_{verification,boot_check}_duration_{p50,p95}_seconds`` (nearest rank
  over one sample per device; no series without samples) and ``..._duration_samples``;
* ``modelward_fleet_refresh_success`` (1: the last refresh reached the broker) and
  ``modelward_fleet_last_refresh_timestamp_seconds`` (of the figures served).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelward.trust.errors import ModelwardError, OperatorInputError

logger = logging.getLogger("modelward.fleet-exporter")

MAX_LABEL_CHARS = 64
MAX_LABEL_VALUES = 50
OTHER = "other"
_DURATIONS = {"verify_s": "verification", "boot_check_s": "boot_check"}


def _cut(v: object) -> str:
    return str(v)[:MAX_LABEL_CHARS]


def bounded(counts: dict[tuple[str, ...], float], limit: int = MAX_LABEL_VALUES
            ) -> dict[tuple[str, ...], float]:
    """``counts`` with every label value cut, at most ``limit`` keys: those with the
    largest counts (ties by name), the rest summed under a key of ``other`` (pure)."""
    merged: dict[tuple[str, ...], float] = {}
    for key, n in counts.items():
        k2 = tuple(_cut(k) for k in key)
        merged[k2] = merged.get(k2, 0) + n
    if len(merged) <= limit:
        return dict(merged)
    order = sorted(merged, key=lambda k: (-merged[k], k))
    out: dict[tuple[str, ...], float] = {k: merged[k] for k in order[:limit - 1]}
    width = len(order[0])
    rest = (OTHER,) * width
    out[rest] = out.get(rest, 0) + sum(merged[k] for k in order[limit - 1:])
    return out


def _family(name: str, help_: str, labels: tuple[str, ...],
            values: dict[tuple[str, ...], float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_, labels=list(labels))
    for key, v in sorted(bounded(values).items()):
        g.add_metric(list(key), v)
    return g


def summary_metrics(summary: dict[str, Any], ok: bool, at: float) -> Iterator[Metric]:
    """The metric families of one summary (:func:`~._fleet_summary.summarize`)."""
    p = "modelward_fleet_"
    yield GaugeMetricFamily(p + "devices", "Devices: enrolled, or reporting.",
                            value=summary.get("devices", 0))
    yield GaugeMetricFamily(p + "believed_devices", "Devices whose report is believed.",
                            value=summary.get("believed", 0))
    yield _family(p + "state_devices", "Devices per state.", ("state",),
                  {(s,): n for s, n in summary.get("states", {}).items()})
    yield _family(p + "model_devices", "Believed devices per active model.", ("model",),
                  {(m,): n for m, n in summary.get("models", {}).items()})
    yield _family(p + "version_devices", "Believed devices per active model and version.",
                  ("model", "version"),
                  {(v["model"], v["version"]): v["devices"]
                   for v in summary.get("versions", [])})
    yield _family(p + "channel_devices", "Believed devices per channel.", ("channel",),
                  {(c,): n for c, n in summary.get("channels", {}).items()})
    rl = ("model", "version", "channel")
    rollouts = summary.get("rollouts", [])
    for what, help_ in (("eligible", "Devices inside the release's rollout share."),
                        ("installed", "Devices running the release."),
                        ("failed", "Eligible devices failing without the release.")):
        yield _family(f"{p}rollout_{what}_devices", help_, rl,
                      {(r["model"], r["version"], r["channel"]): r[what] for r in rollouts})
    # A share or a flag is no count: never summed under "other" nor over label values that
    # cutting made equal; the series kept are those the eligible count keeps.
    kept = set(bounded({(r["model"], r["version"], r["channel"]): r["eligible"]
                        for r in rollouts})) - {(OTHER,) * 3}
    for name, help_, value in (
            ("rollout_ratio", "The release's rollout share (0 to 1).",
             lambda r: r["percent"] / 100),
            ("rollout_halted", "1: the operator halted the release.",
             lambda r: float(r["halted"]))):
        g = GaugeMetricFamily(p + name, help_, labels=list(rl))
        per: dict[tuple[str, ...], float] = {}
        for r in rollouts:
            series = tuple(_cut(r[k]) for k in rl)
            if series in kept:
                per[series] = max(per.get(series, 0.0), value(r))
        for series, v in sorted(per.items()):
            g.add_metric(list(series), v)
        yield g
    fb = summary.get("fallback", {})
    yield GaugeMetricFamily(p + "fallback_ratio",
                            "Believed devices running their previous model after a fallback, "
                            "over believed devices.", value=fb.get("rate", 0.0))
    yield GaugeMetricFamily(p + "fell_back_devices", "Believed devices in state fell back.",
                            value=fb.get("fell_back", 0))
    yield GaugeMetricFamily(p + "fallback_ever_devices",
                            "Believed devices that ever fell back.", value=fb.get("ever", 0))
    reasons = summary.get("failure_reasons", {})
    yield _family(p + "failure_reason_devices", "Believed devices counting the failure.",
                  ("reason",), {(k,): v["devices"] for k, v in reasons.items()})
    yield _family(p + "failure_reason_attempts", "Failed attempts the believed devices count.",
                  ("reason",), {(k,): v["attempts"] for k, v in reasons.items()})
    for key, name in _DURATIONS.items():
        d = summary.get("durations", {}).get(key, {})
        for k in ("p50", "p95"):  # (gauges: a "quantile" label is a summary's, with a _sum)
            g = GaugeMetricFamily(f"{p}{name}_duration_{k}_seconds",
                                  f"{k} of the {name.replace('_', '-')} time over the fleet, "
                                  "nearest rank (one sample per believed device).")
            if d.get(k) is not None:
                g.add_metric([], d[k])
            yield g
        yield GaugeMetricFamily(f"{p}{name}_duration_samples",
                                "Believed devices reporting the duration.",
                                value=d.get("samples", 0))
    yield GaugeMetricFamily(p + "refresh_success", "1: the last refresh reached the broker.",
                            value=1.0 if ok else 0.0)
    yield GaugeMetricFamily(p + "last_refresh_timestamp_seconds",
                            "Unix time of the figures served.", value=at)


class FleetCollector(Collector):
    """Serves the last summary; :meth:`refresh` computes a new one."""

    def __init__(self, compute: Callable[[], dict[str, Any]],
                 clock: Callable[[], float] = time.time) -> None:
        self._compute = compute
        self._clock = clock
        self._lock = threading.Lock()
        self._state: tuple[dict[str, Any], bool, float] = ({}, False, 0.0)

    def refresh(self) -> bool:
        """Compute the summary; on an error (the broker unreachable, the repository not
        verifying, the fleet directory unreadable) keep the last figures, served with
        refresh_success 0."""
        try:
            summary = self._compute()
        except (ModelwardError, OSError) as e:  # (OSError: the fleet directory, say)
            logger.warning("fleet summary not refreshed: %s", e)
            with self._lock:
                self._state = (self._state[0], False, self._state[2])
            return False
        with self._lock:
            self._state = (summary, True, self._clock())
        return True

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            summary, ok, at = self._state
        yield from summary_metrics(summary, ok, at)


def serve(compute: Callable[[], dict[str, Any]], host: str, port: int, interval: float,
          stop: threading.Event) -> None:
    """Refresh every ``interval`` s and serve on ``host:port`` until ``stop`` is set.

    Raises:
        OperatorInputError: the address cannot be bound (before the broker is asked).
    """
    from modelward.publisher import _metrics_http

    collector = FleetCollector(compute)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, thread = _metrics_http.start(host, port, registry)
    except OSError as e:
        raise OperatorInputError(f"--listen {host}:{port}: {e.strerror or e}",
                                 hint="an address of this machine and a free port") from e
    try:
        collector.refresh()  # (until it is done a scrape has refresh_success 0)
        while not stop.wait(interval):
            collector.refresh()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
