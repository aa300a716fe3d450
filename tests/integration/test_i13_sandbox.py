"""Issue 13 must-show 11: the health check's child runs a signed but malicious model in a
sandbox (updater/install/_sandbox.py).

Real swtpm, nginx origin and onnxruntime. (a) A signed model whose graph allocates 3 GiB
fails its health check under ``[health] max_memory``; trusted state does not move and the
agent installs the next good release. (b) A probe program run through the very launcher and
policy the health check uses cannot open a TCP socket (a loopback listener, the swtpm port),
a TPM device node, the trust record, the slots, ``current`` or the config, and sees no
secret in its environment; the same probe without the sandbox can (the test can fail).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.simulator._models import make_linear_model
from modelward.updater._config import HealthConfig
from modelward.updater.errors import HealthCheckError
from modelward.updater.install._health import health_policy, memory_limit
from modelward.updater.install._sandbox import run
from tests.conftest import World

# peak RSS of the health check child: one worker, alone (scripts/test)
pytestmark = pytest.mark.xdist_group("machine")

LIMIT = 512 << 20


def _hog_model(path: Path, seed: int, gib: int) -> Path:
    """``make_linear_model(seed)`` plus a ConstantOfShape of ``gib`` GiB whose sum, times
    zero, is added to the output: with the memory, it reproduces the linear model's vectors."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("ConstantOfShape", ["shape"], ["big"],
                             value=numpy_helper.from_array(np.array([1.0], np.float32))),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["s0"]),
            helper.make_node("Add", ["z", "s0"], ["z2"]),
            helper.make_node("Relu", ["z2"], ["y"]),
        ],
        f"hog_{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"),
                     numpy_helper.from_array(np.array([(gib << 30) // 4], np.int64), "shape"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _hog_bundle(w: World, version: str, seed: int) -> Path:
    donor_model = make_linear_model(w.builds / f"donor-{seed}.onnx", seed)
    donor = w.builds / f"donor-{seed}.tar"
    build_bundle(donor_model, "donor", "0.0.1", donor)
    subprocess.run(["tar", "-xf", str(donor), "-C", str(w.builds), "vectors.npz"], check=True)
    vectors = w.builds / f"hog-vectors-{seed}.npz"
    (w.builds / "vectors.npz").rename(vectors)
    out = w.builds / f"classifier-{version}.tar"
    build_bundle(_hog_model(w.builds / f"hog-{version}.onnx", seed, 3), "classifier", version,
                 out, vectors=vectors, options=BuildOptions())
    return out


def _set_health(w: World, text: str) -> None:
    w.conf_path.write_text(w.conf_path.read_text() + f"\n[health]\n{text}\n")


def test_signed_model_allocating_3gib_fails_health_check_under_max_memory(
        world: World) -> None:
    _set_health(world, f"max_memory = {LIMIT}")
    assert world.cfg.updater.health.max_memory == LIMIT
    world.publish("1.0.0", seed=1)
    world.update()  # a normal model fits in the limit
    assert world.active_version() == "1.0.0"
    before = world.snapshot()
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    world.repo.publish(_hog_bundle(world, "2.0.0", seed=2))

    with pytest.raises(HealthCheckError) as e:
        world.update()
    assert (e.value.model, e.value.version) == ("classifier", "2.0.0")
    assert f"{LIMIT} bytes of memory" in str(e.value)
    assert re.search(r"alloc|memory|killed", e.value.detail, re.I), e.value.detail
    # the TUF metadata that verified (v2 is signed) is kept, as the spec says; nothing else
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
    # the child never got near 3 GiB; this process (the agent) is alive and still installs
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 <= max(
        children_peak, LIMIT)
    world.publish("3.0.0", seed=3)
    world.update()
    assert world.active_version() == "3.0.0"


_PROBE = r"""
import json, os, socket, sys
targets = json.loads(sys.argv[1])
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = type(e).__name__

attempt("tcp_listener", lambda: socket.create_connection(("127.0.0.1", targets["listener"]), 2))
attempt("tcp_swtpm", lambda: socket.create_connection(("127.0.0.1", targets["swtpm"]), 2))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
for dev in targets["devices"]:
    attempt("dev:" + dev, lambda: os.close(os.open(dev, os.O_RDWR)))
attempt("record_read", lambda: open(targets["record"], "rb").close())
attempt("state_list", lambda: os.listdir(targets["state"]))
attempt("config_read", lambda: open(targets["config"], "rb").close())
attempt("mqtt_password_read", lambda: open(targets["password"], "rb").close())
attempt("staged_read", lambda: open(targets["staged"], "rb").read())
if targets["writes"]:  # only inside the sandbox: these would harm the device
    attempt("record_write", lambda: open(targets["record"], "r+b").close())
    attempt("record_replace", lambda: os.replace(targets["staged"], targets["record"]))
    attempt("current_repoint", lambda: os.symlink("/tmp", targets["state"] + "/current.new"))
    attempt("slots_write", lambda: open(targets["state"] + "/slots/evil", "wb").close())
    attempt("staged_write", lambda: open(targets["staged"], "ab").close())

    def fork():
        if os.fork() == 0:
            os._exit(0)
    attempt("fork", fork)
attempt("kill_agent", lambda: os.kill(os.getppid(), 0))
out["env"] = sorted(k for k in os.environ if "TCTI" in k or "PASS" in k or "KEY" in k)
print(json.dumps(out))
"""


def test_probe_in_health_sandbox_cannot_reach_network_tpm_or_trust_record(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    state = world.state.resolve()
    incoming = state / "staging" / "incoming"
    incoming.mkdir(parents=True)
    (incoming / "model.onnx").write_bytes(b"staged bytes")
    monkeypatch.setenv("TPM2TOOLS_TCTI", world.tpm.tcti)
    monkeypatch.setenv("TSS2_TCTI", world.tpm.tcti)
    port = int(re.search(r"port=(\d+)", world.tpm.tcti).group(1))  # type: ignore[union-attr]
    listener = socket.create_server(("127.0.0.1", 0))
    password = world.conf_path.parent / "mqtt-password"  # where [mqtt] password_file lives
    password.write_text("device secret\n")
    devices = [p for p in ("/dev/tpm0", "/dev/tpmrm0", "/dev/kvm", "/dev/console", "/dev/zero")
               if Path(p).exists()]
    targets = {"listener": listener.getsockname()[1], "swtpm": port, "devices": devices,
               "record": str(state / "trust" / "record.json"), "state": str(state),
               "config": str(world.conf_path), "staged": str(incoming / "model.onnx"),
               "password": str(password)}
    cfg = HealthConfig()
    policy = health_policy(incoming, cfg, os.environ, memory_limit(cfg))
    try:
        # the same probe without isolation reaches all of it: the test can fail
        bare_policy = dataclasses.replace(policy, isolate=False, env=dict(os.environ))
        bare = run([sys.executable, "-c", _PROBE, json.dumps({**targets, "writes": False})],
                   bare_policy, timeout=60)
        free = json.loads(bare.stdout)
        assert free["tcp_listener"] == free["tcp_swtpm"] == free["record_read"] == "ok", free
        assert free["mqtt_password_read"] == free["config_read"] == "ok", free
        assert free["env"], free
        done = run([sys.executable, "-c", _PROBE, json.dumps({**targets, "writes": True})],
                   policy, timeout=60)
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr.decode()
    got = json.loads(done.stdout)
    denied = {k: v for k, v in got.items() if k not in ("env", "staged_read")}
    assert all(v in ("PermissionError", "FileNotFoundError") for v in denied.values()), got
    assert got["tcp_listener"] == got["tcp_swtpm"] == got["udp"] == "PermissionError", got
    assert got["record_write"] == got["record_read"] == "PermissionError", got
    assert got["mqtt_password_read"] == got["config_read"] == "PermissionError", got
    assert all(got[f"dev:{d}"] == "PermissionError" for d in devices), got
    assert got["staged_read"] == "ok", got  # the read-only view of the staged files
    assert got["env"] == [], got
    assert world.snapshot() == before
    assert not (state / "current.new").exists() and not (state / "slots" / "evil").exists()


def test_tpm2_tools_exec_from_the_health_sandbox_cannot_reach_the_tpm(world: World) -> None:
    """A model that gets code execution may ``execve`` tpm2-tools (exec is allowed, the
    sandbox is inherited): it cannot reach the swtpm; without the sandbox it can."""
    before = world.snapshot()
    incoming = world.state.resolve() / "staging" / "incoming"
    incoming.mkdir(parents=True)
    cfg = HealthConfig()
    policy = health_policy(incoming, cfg, os.environ, memory_limit(cfg))
    argv = ["/usr/bin/tpm2_getrandom", "-T", world.tpm.tcti, "--hex", "8"]
    bare = run(argv, dataclasses.replace(policy, isolate=False), timeout=60)
    assert bare.returncode == 0 and len(bare.stdout) == 16, bare
    boxed = run(argv, policy, timeout=60)
    assert boxed.returncode != 0 and boxed.stdout == b"", boxed
    assert world.snapshot() == before
