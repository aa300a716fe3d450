"""Review r11 of issue 15 (boot4, a07360c): the boot path's records on ``modelward.trust._plain``
attacked as a careless code change.

Held (passing): the record digest the TPM MACs and the record file are byte-identical to
what the ``@dataclass`` code made, for every shape (active/previous present or None,
non-ASCII and escaped strings), and a record file written by the old code decodes to the
same digest and re-encodes to the same bytes; NaN fields compare and hash as a
``@dataclass``'s did; copy/deepcopy/pickle of the frozen records round-trip.

Broke, fixed since: a frozen record could still be changed in place through its own
``_set``; a subclass that names its own ``__slots__`` dropped its parent's fields from
equality, hash, ``asdict`` and so from the TPM-MACed digest, silently.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import pickle
from typing import Any

import pytest

from modelward.agent._config_schema import Key
from modelward.trust import _record
from modelward.trust._record import ModelRef, TrustRecord, decode_record, encode_record


@dataclasses.dataclass(frozen=True)
class OldRef:
    """ModelRef as it was before a07360c."""

    name: str
    version: str
    fingerprint: str
    slot: str


def _old_json(counter: int, root: int, targets: int, act: OldRef | None,
              prev: OldRef | None) -> dict[str, Any]:
    # TrustRecord.to_json before a07360c (dataclasses.asdict, deep)
    return {"counter": counter, "root_version": root, "targets_version": targets,
            "active": dataclasses.asdict(act) if act else None,
            "previous": dataclasses.asdict(prev) if prev else None}


def _old_digest(doc: dict[str, Any]) -> bytes:
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(_record._MAC_DOMAIN + canonical.encode()).digest()


def _old_file(doc: dict[str, Any], mac: bytes) -> bytes:
    return json.dumps({"record": doc, "mac": mac.hex()}, sort_keys=True, indent=1).encode() \
        + b"\n"


REFS = [("m", "2.0.0", "f2" * 32, "b"), ("m", "1.0.0", "f1" * 32, "a"),
        ("mod\u00e8le \u2028\"\\", "1.0.0+b\u00e9ta", "00" * 32, "a")]
SHAPES = [(None, None), (0, None), (0, 1), (None, 1), (2, 1), (1, 2)]


@pytest.mark.parametrize(("act", "prev"), SHAPES)
def test_digest_and_file_are_the_dataclass_ones(act: int | None, prev: int | None) -> None:
    new_a = ModelRef(*REFS[act]) if act is not None else None
    new_p = ModelRef(*REFS[prev]) if prev is not None else None
    old_a = OldRef(*REFS[act]) if act is not None else None
    old_p = OldRef(*REFS[prev]) if prev is not None else None
    rec = TrustRecord(2**40, 3, 17, new_a, new_p)
    old = _old_json(2**40, 3, 17, old_a, old_p)
    mac = bytes(range(32))
    assert rec.to_json() == old
    assert rec.digest() == _old_digest(old)
    assert encode_record(rec, mac) == _old_file(old, mac)
    # a record file on disk from before the change: same record, same digest, same bytes
    back, got_mac = decode_record(_old_file(old, mac), "record.json")
    assert back == rec and got_mac == mac and back.digest() == _old_digest(old)
    assert encode_record(back, got_mac) == _old_file(old, mac)
    assert rec.successor().digest() == _old_digest({**old, "counter": 2**40 + 1})


def test_nan_fields_compare_and_hash_as_a_dataclass() -> None:
    ref = dataclasses.make_dataclass("Key", [(k, Any) for k in Key.__slots__], frozen=True)
    nan = float("nan")
    for same in (True, False):
        other = nan if same else float("nan")
        a, b = Key("f", lo=nan), Key("f", lo=other)
        ra, rb = ref("f", None, False, nan, None, False, (), False, ""), \
            ref("f", None, False, other, None, False, (), False, "")
        assert (a == b) is (ra == rb) is same
        assert (hash(a) == hash(b)) is (hash(ra) == hash(rb))


def test_frozen_records_round_trip_copy_and_pickle() -> None:
    rec = TrustRecord(5, 1, 2, ModelRef(*REFS[0]), None)
    for c in (copy.copy(rec), copy.deepcopy(rec),
              *(pickle.loads(pickle.dumps(rec, protocol=p))  # noqa: S301 - (our own bytes)
                for p in range(6))):
        assert c == rec and c.digest() == rec.digest() and hash(c) == hash(rec)


def test_a_frozen_record_cannot_be_changed_through_set() -> None:
    """Tried: a careless change calls ``ref._set(...)`` on a record that is in use (the
    name reads as a setter; nothing stops it after ``__init__``). Happened: the frozen
    ModelRef changed in place: its hash moved (a dict or set holding it lost it) and the
    TrustRecord holding it now digests as another model. Cause: ``Frozen._set`` is the
    only guard-free path and is callable after ``__init__``; ``@dataclass(frozen=True)``
    had no such method (its ``__init__`` can be called again as here, and so can this
    one's: that part is as before)."""
    ref = ModelRef(*REFS[0])
    rec = TrustRecord(1, 1, 1, ref, None)
    digest, seen = rec.digest(), {ref}
    with contextlib.suppress(AttributeError):  # (refusing would be right)
        ref._set(*REFS[2])
    assert ref.astuple() == REFS[0] and rec.digest() == digest and ref in seen


def test_a_subclass_naming_its_own_slots_is_refused() -> None:
    """Tried: a careless change subclasses ModelRef to carry one more field, the way a
    ``@dataclass`` subclass does (it inherits its parent's fields). Happened (before the
    fix): ``asdict``, ``astuple``, ``==``, ``hash`` and ``repr`` saw only the new field, so
    ``TrustRecord.to_json`` and the digest the TPM MACs no longer contained the model's
    name, version, fingerprint or slot: two records for different models MACed the same.
    Fixed: such a class is refused when it is defined (the fields of a record are declared
    in one class); a subclass without ``__slots__`` of its own keeps the parent's fields."""
    with pytest.raises(TypeError, match="Tagged names __slots__ of its own below ModelRef"):
        class Tagged(ModelRef):
            __slots__ = ("tag",)

    class Same(ModelRef):
        pass

    assert Same(*REFS[0]).asdict() == ModelRef(*REFS[0]).asdict()
    good = TrustRecord(1, 1, 1, Same(*REFS[0]), None)
    evil = TrustRecord(1, 1, 1, Same(*REFS[2]), None)
    assert good.digest() != evil.digest()
