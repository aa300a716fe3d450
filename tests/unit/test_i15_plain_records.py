"""Issue 15, boot without ``dataclasses``: the boot path's records (trust/_plain.py)
behave as the ``@dataclass`` classes they replace did.

Each class is compared with a reference ``@dataclass`` of the same name and fields, built
here: equality, hash, repr, ``replace``/``asdict``/``astuple``, frozen-ness and copy.
(That boot-check imports no ``dataclasses`` at all is tests/integration/test_i15_boot_imports.py.)
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import pytest

from modelward.agent._config_rules import BootConfig
from modelward.agent._config_schema import Key
from modelward.agent._lock import Holder
from modelward.agent._observe import COUNTERS, Metrics
from modelward.agent._owner import DirOwner
from modelward.trust._fingerprint import FileEntry
from modelward.trust._plain import Frozen, FrozenFieldError, Plain
from modelward.trust._record import Heal, ModelRef, TrustRecord, UseRecord
from modelward.updater.install._boot import BootResult
from modelward.updater.install._journal import JournalEntry

FROZEN: tuple[type[Frozen], ...] = (Holder, ModelRef, TrustRecord, UseRecord, Heal, DirOwner,
                                    FileEntry, JournalEntry, BootResult, Key, BootConfig)

#: The defaults the @dataclass versions had (a field missing here had none).
DEFAULTS: dict[type[Plain], dict[str, Any]] = {
    JournalEntry: dict.fromkeys(("model", "version", "fingerprint", "target", "detail", "at"),
                                ""),
    Key: {"default": None, "required": False, "lo": None, "hi": None, "lo_open": False,
          "choices": (), "secret": False, "note": ""},
}


def reference(cls: type[Plain]) -> type[Any]:
    """The @dataclass ``cls`` was: same name, fields in order, frozen or not."""
    return dataclasses.make_dataclass(cls.__name__, [(k, Any) for k in cls.__slots__],
                                      frozen=issubclass(cls, Frozen))


def sample(cls: type[Plain], tag: str = "") -> tuple[Any, ...]:
    return tuple(f"{k}{tag}" for k in cls.__slots__)


@pytest.mark.parametrize("cls", FROZEN, ids=lambda c: c.__name__)
def test_a_frozen_record_is_its_dataclass(cls: type[Frozen]) -> None:
    ref = reference(cls)
    values = sample(cls)
    a, b, other = cls(*values), cls(*values), cls(*sample(cls, "'"))
    ra = ref(*values)

    # __init__: the fields in order, by position or by name, with the same defaults
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params] == list(cls.__slots__)
    assert {p.name: p.default for p in params if p.default is not p.empty} == \
        DEFAULTS.get(cls, {})
    assert cls(**dict(zip(cls.__slots__, values, strict=True))) == a

    # equality and hash as @dataclass(frozen=True): by the fields' tuple, same class only
    assert a == b and a != other and hash(a) == hash(b) == hash(ra)
    assert a != ra and ra != a and a != values
    assert a.__eq__(ra) is NotImplemented
    sub = type("Sub", (cls,), {})  # (the very same class only, not a subclass)
    ref_sub = type("Sub", (ref,), {})
    assert (sub(*values) == a) is (ref_sub(*values) == ra) is False
    assert {a: 1}[b] == 1
    assert repr(a) == repr(ra)
    assert a.astuple() == dataclasses.astuple(ra) == values
    assert a.asdict() == dataclasses.asdict(ra)

    # replace: a new record through __init__, the old one unchanged
    first = cls.__slots__[0]
    new = a.replace(**{first: "x"})
    assert new == cls(*dataclasses.astuple(dataclasses.replace(ra, **{first: "x"})))
    assert a.astuple() == values
    with pytest.raises(TypeError, match="no field 'bogus'"):
        a.replace(bogus=1)
    assert a.astuple() == values

    # frozen: no field set, deleted or added after __init__ (AttributeError, as
    # dataclasses.FrozenInstanceError is), nothing changed
    for name in (*cls.__slots__, "added"):
        with pytest.raises(FrozenFieldError, match=f"field {name!r} of {cls.__name__}"):
            setattr(a, name, "changed")
        with pytest.raises(AttributeError):
            delattr(a, name)
    with pytest.raises(AttributeError):
        object.__setattr__(a, "added", 1)  # (no __dict__: __slots__)
    assert issubclass(FrozenFieldError, AttributeError)
    assert a.astuple() == values and a == b

    # copy gives an equal record (not through setattr, which refuses)
    for c in (copy.copy(a), copy.deepcopy(a)):
        assert c == a and type(c) is cls


def test_metrics_is_its_mutable_dataclass() -> None:
    ref = reference(Metrics)
    m, n = Metrics(), Metrics()
    assert m == n and m.counters == dict.fromkeys(COUNTERS, 0)
    assert m.counters is not n.counters  # (a default factory, not one shared dict)
    m.counters["attempts"] += 1
    m.last_success = 5.0
    assert m != n and n.counters["attempts"] == 0
    hist = {"boot_check_duration_seconds": {"counts": [1] + [0] * 12, "sum": 0.01}}
    values = ({"attempts": 1}, 5.0, 2.5, 1.5, {"TargetHashError": 2}, hist, 7)
    assert Metrics(*values) == Metrics(counters={"attempts": 1}, last_success=5.0,
                                       verification_seconds=2.5, verify_s=1.5,
                                       failure_reasons={"TargetHashError": 2},
                                       histograms=hist, boot_check_mark=7)
    assert Metrics().verify_s is None and Metrics().failure_reasons == {}
    assert Metrics().failure_reasons is not Metrics().failure_reasons
    assert Metrics().histograms is not Metrics().histograms
    assert repr(Metrics(*values)) == repr(ref(*values))
    assert Metrics(*values).asdict() == dataclasses.asdict(ref(*values))
    with pytest.raises(TypeError, match="unhashable"):
        hash(m)  # mutable: unhashable, as a @dataclass with eq and not frozen


def test_trust_record_json_and_digest_unchanged() -> None:
    """The record's canonical form (what the TPM MACs) is what asdict() gave."""
    act, prev = ModelRef("m", "2.0.0", "f2" * 32, "b"), ModelRef("m", "1.0.0", "f1" * 32, "a")
    rec = TrustRecord(7, 2, 9, act, prev)
    assert rec.to_json() == {"counter": 7, "root_version": 2, "targets_version": 9,
                             "active": {"name": "m", "version": "2.0.0",
                                        "fingerprint": "f2" * 32, "slot": "b"},
                             "previous": {"name": "m", "version": "1.0.0",
                                          "fingerprint": "f1" * 32, "slot": "a"}}
    # the digest of this record as the @dataclass version computed it (sha256 of the
    # domain-separated canonical JSON), written down once
    assert rec.digest().hex() == DIGEST
    nxt = rec.successor(previous=None)
    assert nxt == TrustRecord(8, 2, 9, act, None) and rec.previous is prev


DIGEST = "f2f76da5073150b9cf06d358f8efc77d46bd1f9734caafa9b2c1d20e97ce0b87"
