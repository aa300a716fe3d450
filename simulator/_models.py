"""Small real ONNX models, built with the ``onnx`` package, for the demo and the tests."""

from __future__ import annotations

from pathlib import Path


def make_linear_model(path: Path, seed: int, in_dim: int = 8, out_dim: int = 4,
                      names: tuple[str, str] = ("x", "y")) -> Path:
    """Write ``y = relu(x @ W + b)`` with weights from ``seed``; x is float32 [N, in_dim].

    ``names`` are the graph's input and output names.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((in_dim, out_dim)).astype(np.float32)
    b = rng.standard_normal(out_dim).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [names[0], "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], [names[1]]),
        ],
        f"linear_{seed}",
        [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, ["N", in_dim])],
        [helper.make_tensor_value_info(names[1], TensorProto.FLOAT, ["N", out_dim])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path
