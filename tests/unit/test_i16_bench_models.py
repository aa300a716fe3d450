"""benchmarks/delta.py's models and its "bytes that changed" (issue 16's benchmark).

The benchmark's goals are ratios to "bytes that changed + index": these pin what that
count is for each v2, on tiny models (D = 128), so the denominator cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import delta  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> delta.Models:
    return delta.build_models(tmp_path_factory.mktemp("m"), 2)


def test_sizes_follow_the_requested_size() -> None:
    assert delta.dims_for(2) == (128, 32)
    assert delta.dims_for(256) == (1024, 64)
    d, n = delta.dims_for(2048)  # one ONNX file stays under protobuf's 2 GiB
    assert d == 1024 and n * (4 * d * d + 4 * d) < delta.PROTOBUF_LIMIT


def test_fine_tune_changes_the_last_tenth_of_the_initializers(models: delta.Models) -> None:
    d, n = models.d, models.layers
    tensors, graph = delta.changed_model_bytes(models.v1, models.v2["a"])
    k = -(-n // 10)  # the last 10 % of the layers (rounded up): their W and b
    assert tensors == k * (4 * d * d + 4 * d)
    assert graph == 0  # same graph, other numbers


def test_insertion_changes_one_tensor_and_the_graph(models: delta.Models) -> None:
    tensors, graph = delta.changed_model_bytes(models.v1, models.v2["b"])
    assert tensors == 4 * models.d * models.d
    assert 0 < graph < 64 * 1024  # the whole graph without tensor data: a few KiB
    # and every byte after the insertion moved: v2's file is v1's plus the new tensor
    assert models.v2["b"].stat().st_size > models.v1.stat().st_size + tensors


def test_retrain_changes_every_weight(models: delta.Models) -> None:
    tensors, graph = delta.changed_model_bytes(models.v1, models.v2["c"])
    assert tensors == models.layers * (4 * models.d * models.d + 4 * models.d)
    assert graph == 0


def test_a_model_that_does_not_run_is_refused(tmp_path: Path) -> None:
    """The onnxruntime check fails on a model whose output is all zero (dead weights)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((4, 4), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "z",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "zero.onnx"
    onnx.save(m, str(p))
    with pytest.raises(RuntimeError, match="not finite, or all zero"):
        delta.check_loads(p, 4)
