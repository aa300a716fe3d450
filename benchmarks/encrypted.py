"""Encrypted bundles (issue 19): what ``--encrypt-for`` costs the operator and the device.

    .venv/bin/python benchmarks/encrypted.py [--mib 256] [--rounds 3] [--touch-mib 1024]
        [--only build,install,delta]

For a realistic ONNX model of ``--mib`` MiB (``benchmarks/delta.py``'s MLP: 1024x1024
float32 MatMul weights and biases, loaded and run in onnxruntime before use) and its
fine-tune (delta.py's (a): the last 10 % of the layers new), every case a whole process
(what the user waits for), interleaved in random order over ``--rounds`` rounds after
touching ``--touch-mib`` of memory, medians with min-max:

- ``build``, the operator: ``modelward bundle build`` of the plain bundle against the
  same build with ``--encrypt-for`` (a device enrolled by credential activation, as
  ``tests/integration/test_i19_encrypted.py`` does: ``simulator._fleet.enroll_device``),
  wall time, CPU and peak RSS (GNU ``time``: a child forked from this large process
  would report this process's peak as its own). Reference: the two passes over the model
  the scheme needs, ``openssl enc -aes-256-ctr`` and ``openssl dgst -sha256 -hmac``, as
  whole processes; the figure is (encrypted - plain) / openssl, per round.
- ``install``, the device: ``modelward agent update --once`` of the plain release and of
  the encrypted one on a fresh device (swtpm, the nginx HTTPS origin; delta.py's
  :class:`Device`, restored from a snapshot before each run), against ``curl -o`` of the
  same bundles from the same nginx; the agent process's own peak RSS (VmHWM, sampled:
  delta.py's :class:`TreeSampler`). The download phase ("downloading" -> "staged" in the
  agent's step marks) holds the decryption.
- ``delta``, the device: the v1 -> v2 fine-tune update, plain against encrypted (same
  content key: same recipients), bytes nginx sent (``$bytes_sent``, every request:
  delta.py's :class:`Wire`) and wall time.

The plain and the encrypted releases are two models of the repository (``mlp`` and
``mlp-enc``), so that a fresh device installs either; the device's config names the one
it runs for. Issue 19 sets no number: the goals in the table are this benchmark's bars,
each a ratio to a reference measured in the same run (or issue #7's 100 MiB for the
agent's RSS). Nothing here asserts a time: ``tests/integration/test_benchmarks.py`` runs
it with a 2 MiB model and one round and checks that the table judges every goal.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from delta import (  # (benchmarks/delta.py: sets up the import path and TSS2_LOG)
    MIB,
    ROOT,
    Device,
    Run,
    Wire,
    build_models,
    fmt_s,
    med,
    mib,
    phases_text,
    print_table,
    verdict,
)
from delta import _touch as touch
from run import in_env, interleaved  # (benchmarks/run.py)

PLAIN, ENC = "mlp", "mlp-enc"  # the two models of the repository
DEVICE_ID = "bench-dev"  # delta.py's device
SECTIONS = ("build", "install", "delta")

# This benchmark's bars (issue 19 sets none).
BUILD_EXTRA_X_OPENSSL = 2.0  # the build's extra time, against openssl's two passes
RSS_X_PLAIN = 1.1  # peak RSS, encrypted against plain (build and agent)
INSTALL_X_PLAIN = 1.2  # the device's full install, encrypted against plain
DELTA_WIRE_X_PLAIN = 1.05  # encryption is length-preserving and cut where the plaintext is
DELTA_TIME_X_PLAIN = 1.25  # the delta re-encrypts the held chunks to recognise them
AGENT_MIB = 100  # issue #7: peak RSS of the agent process


@dataclass(frozen=True)
class Proc:
    """One whole process: wall time, CPU (user + sys) and peak RSS, GNU ``time``'s."""

    wall: float
    cpu: float
    rss_kib: int


def timed(argv: list[str], stats: Path) -> Proc:
    """``argv`` run under ``/usr/bin/time``, its stdout discarded."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", str(stats), *argv],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[:6]} failed ({r.returncode}): {r.stderr[-2000:]}")
    user, sys_, rss = stats.read_text().split()[-3:]
    return Proc(wall, float(user) + float(sys_), int(rss))


def secs(xs: list[float]) -> str:
    """Median with min-max, for figures that can be negative (differences)."""
    return f"{med(xs):+.3f} s ({min(xs):+.3f} to {max(xs):+.3f})"


def proc_text(ps: list[Proc]) -> str:
    return (f"{fmt_s([p.wall for p in ps])}, CPU {med([p.cpu for p in ps]):.2f} s, "
            f"RSS {max(p.rss_kib for p in ps) / 1024:.0f} MiB")


def versus(ratio: float, bar: float, why: str) -> str:
    """The verdict of an encrypted/plain ratio against its bar."""
    return verdict(f"<= {bar:g}x plain", ratio <= bar, ratio / bar - 1, why)


def time_row(figure: str, enc: list[Run], plain: list[Run], against: str, bar: float,
             why: str) -> tuple[str, ...]:
    """The row of a device time, encrypted against plain (medians of the whole process)."""
    ratio = med([r.wall for r in enc]) / med([r.wall for r in plain])
    return (figure, run_text(enc), f"{against}: {run_text(plain)}", f"{ratio:.2f}",
            versus(ratio, bar, f"{why}, CPU {med([r.cpu for r in enc]):.2f} s against "
                   f"{med([r.cpu for r in plain]):.2f} s"))


def phase(rs: list[Run]) -> str:
    """The median download phase ("downloading" -> "staged": the decryption included)."""
    dl = [r.download for r in rs if r.download is not None]
    return f"{med(dl):.2f} s" if dl else "(no step marks)"


def run_text(rs: list[Run]) -> str:
    return (f"{fmt_s([r.wall for r in rs])}, CPU {med([r.cpu for r in rs]):.2f} s, "
            f"agent RSS {max(r.hwm_kib for r in rs) / 1024:.1f} MiB")


@dataclass
class Bench:
    """What the sections share: the environment, the device, the fleet, the bundles."""

    env: Any
    work: Path
    dev: Device
    wire: Wire
    fleet: Path
    n: int
    touch_mib: int
    size_mib: int
    rows: list[tuple[str, ...]] = field(default_factory=list)
    full: list[Run] = field(default_factory=list)  # the encrypted full installs, if run

    def stats(self) -> Path:
        return self.work / "time.out"

    def encryption(self, model: str) -> Any:
        from modelward.publisher._encrypt import content_key

        return content_key(self.fleet, model, [DEVICE_ID])

    def build(self, model_file: Path, name: str, version: str) -> Path:
        """The bundle, built in this process (encrypted for the device for ``ENC``)."""
        from modelward.publisher._bundle_build import BuildOptions, build_bundle

        out = self.work / f"{name}-{version}.tar"
        build_bundle(model_file, name, version, out, options=BuildOptions(
            encryption=self.encryption(name) if name == ENC else None))
        return out

    def publish(self, bundle: Path, name: str) -> Path:
        """Publish ``bundle``; the file the origin serves."""
        target = self.env.repo.publish(bundle).target_path.rsplit("/", 1)[1]
        bundle.unlink()
        return next((self.env.repo_dir / "targets" / name).glob(f"*.{target}"))

    def install(self, name: str, golden: str, version: str) -> Run:
        """``agent update --once`` of model ``name`` on the device restored from ``golden``
        (synced: its slots on its disk, not in dirty pages written back under the run)."""
        self.dev.model = name
        self.dev.restore(golden)
        os.sync()
        touch(self.touch_mib)
        r = self.dev.update(self.wire)
        if r.version != version:
            raise RuntimeError(f"the device is on {name} {r.version}, not {version}")
        return r

    def curl(self, served: Path, name: str) -> Proc:
        out = self.work / "curl.out"
        touch(self.touch_mib)
        p = timed(["curl", "-sS", "--cacert", str(self.env.ca.cert), "-o", str(out),
                   f"{self.env.url}/targets/{name}/{served.name}"], self.stats())
        if out.stat().st_size != served.stat().st_size:
            raise RuntimeError(f"curl fetched {out.stat().st_size} bytes of {served}")
        out.unlink()
        return p


# --- the operator -----------------------------------------------------------------------------


def bench_build(b: Bench, model_file: Path) -> dict[str, Path]:
    """``bundle build`` plain vs ``--encrypt-for``, vs openssl's two passes; the bundles of
    the last round (v1 of both models)."""
    cli = [sys.executable, "-I", "-m", "modelward", "bundle", "build", str(model_file),
           "--version", "1.0.0"]
    out = {k: b.work / f"{k}-1.0.0.tar" for k in (PLAIN, ENC)}
    argv = {PLAIN: [*cli, "--name", PLAIN, "-o", str(out[PLAIN])],
            ENC: [*cli, "--name", ENC, "--encrypt-for", DEVICE_ID, "--fleet-dir",
                  str(b.fleet), "-o", str(out[ENC])]}
    key, iv = secrets.token_hex(32), secrets.token_hex(16)
    ct = b.work / "openssl.ct"
    ref_enc = ["openssl", "enc", "-aes-256-ctr", "-K", key, "-iv", iv, "-in",
               str(model_file), "-out", str(ct)]
    ref_mac = ["openssl", "dgst", "-sha256", "-hmac", key, str(model_file)]

    def build(name: str) -> Proc:
        out[name].unlink(missing_ok=True)
        touch(b.touch_mib)
        return timed(argv[name], b.stats())

    def reference() -> Proc:
        touch(b.touch_mib)
        e, h = timed(ref_enc, b.stats()), timed(ref_mac, b.stats())
        ct.unlink()
        parts.append((e, h))
        return Proc(e.wall + h.wall, e.cpu + h.cpu, max(e.rss_kib, h.rss_kib))

    parts: list[tuple[Proc, Proc]] = []
    got = interleaved({PLAIN: lambda: build(PLAIN), ENC: lambda: build(ENC),
                       "openssl": reference}, b.n)
    plain, enc, ssl = got[PLAIN], got[ENC], got["openssl"]
    sizes = {k: p.stat().st_size for k, p in out.items()}
    extra = [e.wall - p.wall for e, p in zip(enc, plain, strict=True)]  # (per round)
    ssl_s = med([s.wall for s in ssl])
    cpu_e, cpu_p = med([p.cpu for p in enc]), med([p.cpu for p in plain])
    print(f"\n  build: plain {proc_text(plain)} ({mib(sizes[PLAIN])}); encrypted "
          f"{proc_text(enc)} ({mib(sizes[ENC])}); openssl enc "
          f"{fmt_s([e.wall for e, _ in parts])} + dgst -hmac {fmt_s([h.wall for _, h in parts])}")
    ratio = med([p.wall for p in enc]) / med([p.wall for p in plain])
    b.rows.append((f"encrypted bundle build (operator), {b.size_mib} MiB model, whole process",
                   proc_text(enc), f"`bundle build` of the plain bundle: {proc_text(plain)}",
                   f"{ratio:.2f}", ""))
    xr = med(extra) / ssl_s
    b.rows.append((
        "encryption's extra build time (encrypted - plain, per round)", secs(extra),
        f"`openssl enc -aes-256-ctr` + `openssl dgst -sha256 -hmac` of the model: "
        f"{fmt_s([s.wall for s in ssl])} (CPU {med([s.cpu for s in ssl]):.2f} s)",
        f"{xr:.2f}",
        verdict(f"extra <= {BUILD_EXTRA_X_OPENSSL:g}x openssl", xr <= BUILD_EXTRA_X_OPENSSL,
                xr / BUILD_EXTRA_X_OPENSSL - 1,
                f"extra CPU {cpu_e - cpu_p:.2f} s against openssl's "
                f"{med([s.cpu for s in ssl]):.2f} s: the FastCDC cut of the plaintext, the "
                "ciphertext written once more and its sha256")))
    re_, rp = max(p.rss_kib for p in enc), max(p.rss_kib for p in plain)
    b.rows.append((
        "encrypted bundle build (operator): peak RSS", f"{re_ / 1024:.0f} MiB",
        f"plain build {rp / 1024:.0f} MiB; openssl {max(s.rss_kib for s in ssl) / 1024:.0f}"
        " MiB", f"{re_ / rp:.2f}",
        versus(re_ / rp, RSS_X_PLAIN, "the plaintext's file pages, mapped (mmap) while it is "
               "cut and encrypted: page cache, counted in RSS")))
    return out


# --- the device -------------------------------------------------------------------------------


def bench_install(b: Bench, served: dict[str, Path]) -> None:
    """Full install on a fresh device, plain vs encrypted, vs curl of each bundle; saves
    the device on v1 of each model (``v1-<model>``) for the delta section."""

    def install(name: str) -> Run:
        r = b.install(name, "empty", "1.0.0")
        if f"v1-{name}" not in b.dev.golden:
            b.dev.save(f"v1-{name}")
        return r

    got = interleaved({PLAIN: lambda: install(PLAIN), ENC: lambda: install(ENC),
                       f"curl {PLAIN}": lambda: b.curl(served[PLAIN], PLAIN),
                       f"curl {ENC}": lambda: b.curl(served[ENC], ENC)}, b.n)
    plain, enc = got[PLAIN], got[ENC]
    b.full = enc
    curl_p, curl_e = got[f"curl {PLAIN}"], got[f"curl {ENC}"]
    for what, rs in (("plain", plain), ("encrypted", enc)):
        print(f"  full install, {what}: {run_text(rs)}, wire {mib(med([r.wire for r in rs]))}"
              f"; phases {phases_text(rs)}")
    print(f"  curl: plain {proc_text(curl_p)}, encrypted {proc_text(curl_e)}")
    we, wp = med([r.wall for r in enc]), med([r.wall for r in plain])
    dl = {k: [r.download for r in rs if r.download is not None]
          for k, rs in ((PLAIN, plain), (ENC, enc))}
    dl_e, dl_p = (med(dl[ENC]) if dl[ENC] else we), (med(dl[PLAIN]) if dl[PLAIN] else wp)
    b.rows.append(time_row(
        f"encrypted full install (device), {b.size_mib} MiB, whole process", enc, plain,
        "the plain release", INSTALL_X_PLAIN, "download + verify + stage with the "
        f"decryption {phase(enc)} against {phase(plain)}"))
    ce, cp = med([p.wall for p in curl_e]), med([p.wall for p in curl_p])
    b.rows.append((
        "encrypted full install (device) against curl of its bundle",
        f"whole process {we:.3f} s; download + verify + stage + decrypt {fmt_s(dl[ENC] or [we])}",
        f"`curl -o` of the encrypted bundle (HTTPS, same nginx) {proc_text(curl_e)}; the "
        f"plain release: download phase {dl_p:.3f} s, curl {cp:.3f} s",
        f"{we / ce:.2f} (download phase {dl_e / ce:.2f}; plain {dl_p / cp:.2f})", ""))
    he, hp = max(r.hwm_kib for r in enc) / 1024, max(r.hwm_kib for r in plain) / 1024
    b.rows.append((
        "encrypted full install (device): peak RSS of the agent", f"{he:.1f} MiB",
        f"the plain release {hp:.1f} MiB (health child up to "
        f"{max(r.health_kib for r in enc + plain) / 1024:.0f} MiB, either)", f"{he / hp:.2f}",
        verdict(f"<= {AGENT_MIB} MiB", he <= AGENT_MIB, he / AGENT_MIB - 1,
                "the agent process's own VmHWM, sampled every 5 ms") + "; "
        + versus(he / hp, RSS_X_PLAIN, "the agent process's own VmHWM, sampled every 5 ms")))


def bench_delta(b: Bench, v2_file: Path) -> None:
    """The v1 -> v2 fine-tune update, plain vs encrypted: wire bytes and wall time."""
    for name in (PLAIN, ENC):
        if f"v1-{name}" not in b.dev.golden:  # (--only delta: the device on v1, untimed)
            b.install(name, "empty", "1.0.0")
            b.dev.save(f"v1-{name}")
        if name == ENC and b.encryption(ENC).rotated:
            raise RuntimeError("the content key changed: the delta would be a full download")
        b.publish(b.build(v2_file, name, "2.0.0"), name)
    got = interleaved({k: lambda k=k: b.install(k, f"v1-{k}", "2.0.0") for k in (PLAIN, ENC)},
                      b.n)
    plain, enc = got[PLAIN], got[ENC]
    paths = {}
    for what, rs in (("plain", plain), ("encrypted", enc)):
        paths[what] = "delta" if any(r.ranged or r.delta_logged for r in rs) else "whole bundle"
        print(f"  v1 -> v2, {what} ({paths[what]}): {run_text(rs)}, wire "
              f"{mib(med([r.wire for r in rs]))}; phases {phases_text(rs)}")
    xe, xp = med([r.wire for r in enc]), med([r.wire for r in plain])
    full = f"; encrypted full install {mib(med([r.wire for r in b.full]))}" if b.full else ""
    what = f"v1 -> v2, the last 10 % of the layers changed, {b.size_mib} MiB"
    b.rows.append((
        f"encrypted delta, bytes on the wire: {what}", f"{mib(xe)} ({paths['encrypted']})",
        f"the plain delta {mib(xp)} ({paths['plain']}){full}", f"{xe / xp:.3f}",
        versus(xe / xp, DELTA_WIRE_X_PLAIN, f"the encrypted update took the "
               f"{paths['encrypted']} path, the plain one the {paths['plain']} path")))
    b.rows.append(time_row(
        f"encrypted delta, device time: {what}", enc, plain, "the plain delta",
        DELTA_TIME_X_PLAIN, f"download + verify + stage {phase(enc)} against {phase(plain)}: "
        "the chunks the slot holds re-encrypted to be recognised, then the whole model "
        "decrypted in place"))


def bench_encrypted(env: Any, work: Path, size_mib: int, n: int, touch_mib: int,
                    only: frozenset[str]) -> list[tuple[str, ...]]:
    """The rows of the table (figure, ours, reference, ratio, goal)."""
    from modelward.simulator._fleet import enroll_device

    print(f"\nEncrypted bundles (issue 19), {size_mib} MiB model, {n} rounds, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    t = time.perf_counter()
    models = build_models(work, size_mib, keys="a")
    print(f"  models: {models.layers} dense layers of {models.d}x{models.d} float32 "
          f"({models.v1.stat().st_size / MIB:.1f} MiB), v1 and its fine-tune, built and "
          f"loaded in onnxruntime in {time.perf_counter() - t:.1f} s")
    dev = Device(env, work)
    fleet = work / "fleet"
    fleet.mkdir()
    b = Bench(env, work, dev, Wire(env), fleet, n, touch_mib, size_mib)
    try:
        dev.provision()
        if enroll_device(fleet, dev.conf, work / "challenge.json") != DEVICE_ID:
            raise RuntimeError("the device enrolled under another id")
        dev.save("empty")
        if "build" in only:
            bundles = bench_build(b, models.v1)
        else:
            bundles = {k: b.build(models.v1, k, "1.0.0") for k in (PLAIN, ENC)}
        served = {k: b.publish(p, k) for k, p in bundles.items()}
        if "install" in only:
            bench_install(b, served)
        if "delta" in only:
            bench_delta(b, models.v2["a"])
    finally:
        dev.stop()
    print(f"  load average {os.getloadavg()[0]:.1f} at the end")
    return b.rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="model size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--touch-mib", type=int, default=1024)
    ap.add_argument("--only", default="", help=f"sections, of {','.join(SECTIONS)} (all)")
    args = ap.parse_args()
    only = frozenset(x.strip() for x in args.only.split(",") if x.strip()) or frozenset(SECTIONS)
    if only - set(SECTIONS):
        raise SystemExit(f"--only: unknown section(s) {', '.join(sorted(only - set(SECTIONS)))}")
    rows = in_env(lambda env, work: bench_encrypted(env, work, args.mib, args.rounds,
                                                   args.touch_mib, only))
    print_table(rows, "issue 19: this benchmark's bars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
