"""Which tensors of an ONNX model (``ModelProto``, protobuf wire format) keep their data
outside the model's bytes ("external data", ``TensorProto.data_location = EXTERNAL``).

``onnxruntime.InferenceSession(bytes)`` reads such data from a path relative to the
process's working directory, not the slot: bytes nobody verified. ``agent.app`` refuses
such a model (:class:`ExternalDataError`) so that an application serves only bytes it
verified. This reads only the wire format (no ``onnx`` package on a device): each message
is scanned once, nested messages only where the schema puts tensors, graphs, nodes or
attributes, to a bounded depth; anything it cannot parse is refused
(:class:`ModelFormatError`).
"""

from __future__ import annotations

#: Where, per message type, the fields holding messages that can hold a tensor are
#: (onnx.proto3 numbers): field number -> the nested message's type.
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
}
_TENSOR_NAME, _EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1

#: Nesting deeper than this (graphs in attributes in graphs ...) is refused.
MAX_DEPTH = 64


class ModelFormatError(ValueError):
    """The model's bytes are not an ONNX protobuf this can read (so none is trusted)."""


class ExternalDataError(ValueError):
    """The model keeps tensors outside its bytes (``locations``: the files it names)."""

    def __init__(self, message: str, locations: list[str]) -> None:
        super().__init__(message)
        self.locations = locations


def _varint(data: memoryview, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ModelFormatError(f"a truncated or overlong varint at byte {i}")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(data: memoryview, start: int, end: int
            ) -> list[tuple[int, int, int, int]]:
    """``(field number, wire type, value or offset, length)`` of each field in
    ``data[start:end]`` (a varint's value with length -1; a length-delimited field's
    offset and length)."""
    out: list[tuple[int, int, int, int]] = []
    i = start
    while i < end:
        key, i = _varint(data, i, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(data, i, end)
            out.append((number, 0, v, -1))
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(data, i, end)
            if n > end - i:
                raise ModelFormatError(f"field {number} at byte {i} runs past its message")
            out.append((number, 2, i, n))
            i += n
        else:
            raise ModelFormatError(f"wire type {wire} (field {number}) at byte {i}")
        if i > end:
            raise ModelFormatError(f"field {number} runs past its message at byte {end}")
    return out


def external_data_locations(model: bytes) -> list[str]:
    """The ``location`` of every tensor of ``model`` whose data is external ("?" for one
    that names none); empty when all of the model's data is in its bytes.

    Raises:
        ModelFormatError: ``model`` is no protobuf message (or nests deeper than
            :data:`MAX_DEPTH`).
    """
    data = memoryview(model)
    found: list[str] = []
    stack = [("model", 0, len(data), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ModelFormatError(f"messages nested deeper than {MAX_DEPTH}")
        fields = _fields(data, start, end)
        if kind == "tensor":
            external = any(f[0] == _EXTERNAL_DATA and f[1] == 2 for f in fields) or any(
                f[0] == _DATA_LOCATION and f[1] == 0 and f[2] == _EXTERNAL for f in fields)
            if external:
                found.append(_location(data, fields) or "?")
            continue
        nested = _SCHEMA[kind]
        for number, wire, off, n in fields:
            if wire == 2 and number in nested:
                stack.append((nested[number], off, off + n, depth + 1))
    return found


def _location(data: memoryview, tensor: list[tuple[int, int, int, int]]) -> str | None:
    for number, wire, off, n in tensor:
        if number != _EXTERNAL_DATA or wire != 2:
            continue
        entry = {k: bytes(data[o:o + m]) for k, w, o, m in _fields(data, off, off + n)
                 if w == 2}
        if entry.get(1) == b"location":
            return entry.get(2, b"").decode("utf-8", "replace")
    return None
