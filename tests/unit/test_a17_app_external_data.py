"""``modelward.agent.app`` + the example app against a local user who can write the app's
working directory. A published model larger than protobuf's 2 GiB limit must keep its
weights as ONNX external data (a second file of the slot, fingerprinted with it). The app
verifies ``model.onnx``'s bytes and hands them to ``ort.InferenceSession(bytes)``, which
resolves the external-data location relative to the process's working directory, not the
slot: the weights served are whatever file of that name the working directory holds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from modelward.agent._onnxrefs import ExternalDataError
from modelward.agent.app import load_verified
from tests.unit.test_i15_example_app import activate

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _external_slot(state: Path, name: str, version: str) -> Path:
    """A slot whose model keeps its weights (all ones) in ``weights.bin`` next to it."""
    from onnx import TensorProto, helper, numpy_helper

    d = state / "slots" / name
    d.mkdir(parents=True)
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save_model(m, str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    files = [{"path": p, "sha256": hashlib.sha256((d / p).read_bytes()).hexdigest()}
             for p in ("model.onnx", "weights.bin")]
    (d / "manifest.json").write_text(json.dumps({
        "name": "classifier", "version": version, "model": {"path": "model.onnx"},
        "files": files}))
    for p in d.iterdir():  # the modes the agent gives a slot's files
        p.chmod(0o640)
    return d


def test_a17_external_weights_come_from_the_verified_slot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    _external_slot(state, "a", "1.0.0")
    activate(state, "a")
    cwd = tmp_path / "cwd"  # the app's working directory, writable by the local user
    cwd.mkdir()
    np.full((4, 4), 7, np.float32).tofile(cwd / "weights.bin")  # planted
    monkeypatch.chdir(cwd)
    try:
        m = load_verified(str(state / "current"))
        s = ort.InferenceSession(m.data, providers=["CPUExecutionProvider"])  # as the app
        y = s.run(None, {"x": np.ones((1, 4), np.float32)})[0]
    except ExternalDataError as e:  # refusing such a model, naming the file, is the answer
        assert e.locations == ["weights.bin"] and "weights.bin" in str(e)
        return
    assert y.tolist() == [[4.0] * 4]  # the slot's weights (ones), never the planted ones


def test_a17_external_weights_are_fingerprinted_in_the_slot(tmp_path: Path) -> None:
    """A change of the slot's own weights file is seen (it is in the fingerprint)."""
    state = tmp_path / "state"
    d = _external_slot(state, "a", "1.0.0")
    activate(state, "a")
    with open(d / "weights.bin", "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(ValueError, match="fingerprint"):
        load_verified(str(state / "current"))


def test_a17_the_example_app_serves_nothing_of_an_external_data_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ModelWatcher and the example's own session factory (real onnxruntime):
    the external-data model is never opened, nothing is served, the planted weights are
    never read."""
    from modelward.agent.app import ModelWatcher

    state = tmp_path / "state"
    _external_slot(state, "a", "1.0.0")
    activate(state, "a")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    np.full((4, 4), 7, np.float32).tofile(cwd / "weights.bin")
    monkeypatch.chdir(cwd)
    opened: list[object] = []

    def session(m: object) -> object:
        opened.append(m)
        return ort.InferenceSession(m.data, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]

    w = ModelWatcher(str(state / "current"), session)
    w.poll()
    assert w.active is None and opened == []
