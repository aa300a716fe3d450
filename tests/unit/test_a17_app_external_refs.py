"""The attacker's next tries against ``agent.app``'s refusal of external data
(``agent/_onnxrefs.py``): the external tensor where the scan might not look (a Constant
node's attribute, a subgraph of an If, a sparse initializer, a model-local function), one
that names no location, bytes that are no protobuf, a nesting bomb; and that a model with
all data inline is still served (its bytes only)."""

from __future__ import annotations

import numpy as np
import pytest

from modelward.agent._onnxrefs import (
    MAX_DEPTH,
    ExternalDataError,
    ModelFormatError,
    external_data_locations,
)

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _external(name: str, location: str | None = "w.bin") -> TensorProto:
    t = numpy_helper.from_array(np.ones((2, 2), np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    if location is not None:
        e = t.external_data.add()
        e.key, e.value = "location", location
    return t


def _io() -> tuple[list[object], list[object]]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])


def _model(graph: object, **kw: object) -> bytes:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], **kw)
    return bytes(m.SerializeToString())


def test_a17_inline_model_has_no_external_data() -> None:
    i, o = _io()
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", i, o, [w])
    assert external_data_locations(_model(g)) == []


def test_a17_external_tensor_in_a_constant_attribute() -> None:
    i, o = _io()
    node = helper.make_node("Constant", [], ["c"], value=_external("c", "/etc/shadow"))
    g = helper.make_graph([node, helper.make_node("Add", ["x", "c"], ["y"])], "g", i, o)
    assert external_data_locations(_model(g)) == ["/etc/shadow"]


def test_a17_external_tensor_in_a_subgraph_and_a_function() -> None:
    i, o = _io()
    sub = helper.make_graph([helper.make_node("Identity", ["W2"], ["z"])], "then", [],
                            [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])],
                            [_external("W2", "deep.bin")])
    cond = numpy_helper.from_array(np.array(True), "cond")
    node = helper.make_node("If", ["cond"], ["y"], then_branch=sub, else_branch=sub)
    g = helper.make_graph([node], "g", i, o, [cond])
    assert external_data_locations(_model(g)) == ["deep.bin", "deep.bin"]
    fn = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node(
        "Constant", [], ["b"], value=_external("k", "fn.bin"))], [helper.make_opsetid("", 13)])
    g2 = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", i, o)
    assert external_data_locations(_model(g2, functions=[fn])) == ["fn.bin"]


def test_a17_external_sparse_initializer_and_no_location() -> None:
    i, o = _io()
    idx = numpy_helper.from_array(np.array([0], np.int64), "idx")
    sp = helper.make_sparse_tensor(_external("sv", "sparse.bin"), idx, [2, 2])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", i, o,
                          sparse_initializer=[sp])
    assert external_data_locations(_model(g)) == ["sparse.bin"]
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", i, o,
                          [_external("W", None)])  # EXTERNAL, no location at all
    assert external_data_locations(_model(g)) == ["?"]


@pytest.mark.parametrize("data", [b"\x3a\xff\xff\xff\xff\x0f", b"\x3a\x05ab", b"\x0b",
                                  b"\x08" + b"\xff" * 11])
def test_a17_bytes_that_are_no_protobuf_are_refused(data: bytes) -> None:
    with pytest.raises(ModelFormatError):
        external_data_locations(data)


def test_a17_a_nesting_bomb_is_refused_not_recursed() -> None:
    inner = b""
    for _ in range(MAX_DEPTH + 5):  # graph -> node -> attribute(g) -> graph -> ...
        attr = b"\x32" + _len(inner) + inner  # attribute.g (6)
        node = b"\x2a" + _len(attr) + attr  # node.attribute (5)
        inner = b"\x0a" + _len(node) + node  # graph.node (1)
    with pytest.raises(ModelFormatError, match="deeper"):
        external_data_locations(b"\x3a" + _len(inner) + inner)  # model.graph (7)


def _len(b: bytes) -> bytes:
    n, out = len(b), bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_a17_the_error_names_the_files() -> None:
    e = ExternalDataError("m keeps tensors in ['w.bin']", ["w.bin"])
    assert isinstance(e, ValueError) and e.locations == ["w.bin"]
