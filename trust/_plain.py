"""Plain record classes for the boot path, without :mod:`dataclasses` (issue 15).

``import dataclasses`` pulls in ``inspect`` (with ``ast``, ``dis`` and ``tokenize``), and
every ``@dataclass`` compiles its generated methods with ``exec()`` when its module is
imported: about 25 ms of CPU on the boot unit's path for a dozen small classes. The classes
that ``agent boot-check`` imports derive from :class:`Plain` or :class:`Frozen` instead:
``__slots__`` names the fields in order, each class writes its ``__init__`` (full
annotations, checked by mypy), and these bases give what ``@dataclass`` (``eq=True``) gave:

- ``==`` compares the fields as a tuple, only with an instance of the very same class
  (anything else: ``NotImplemented``);
- ``repr`` is ``Name(field=value, ...)``;
- :class:`Plain` is mutable and unhashable (``__hash__ = None``), as ``@dataclass``;
- :class:`Frozen` (``frozen=True``) hashes the fields' tuple, refuses to set or delete an
  attribute after ``__init__`` (:class:`FrozenFieldError`, an ``AttributeError`` as
  ``dataclasses.FrozenInstanceError`` is), and has :meth:`Frozen.replace` and
  :meth:`Plain.asdict` for ``dataclasses.replace`` / ``asdict`` (shallow: where a record
  holds records, as ``TrustRecord`` its ``ModelRef``, its ``to_json`` nests them itself).

Not given (no caller uses them): ``__match_args__``, ordering; a subclass that names
``__slots__`` of its own below a class with fields is refused (its fields would hide the
parent's), and :meth:`Frozen._set` sets the fields once only.
``tests/unit/test_i15_plain_records.py`` holds each class against a ``@dataclass``
reference of the same fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from typing import Self


class FrozenFieldError(AttributeError):
    """An attribute of a frozen record was set or deleted (a programming error)."""


class Plain:
    """A mutable record: its fields are its ``__slots__``, in order."""

    __slots__: tuple[str, ...] = ()
    # (defining __eq__ makes Python set __hash__ = None here: unhashable, as @dataclass)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass's own __slots__ would hide its parent's fields from ==, hash, repr,
        # asdict and a record's digest (two records of different models alike): refused.
        super().__init_subclass__(**kwargs)
        inherited = [k for base in cls.__mro__[1:] for k in base.__dict__.get("__slots__", ())]
        if cls.__dict__.get("__slots__") and inherited:
            raise TypeError(f"{cls.__qualname__} names __slots__ of its own below "
                            f"{cls.__mro__[1].__qualname__}, which has fields: the fields "
                            "of a record are declared in one class")

    def astuple(self) -> tuple[Any, ...]:
        """The fields' values, in ``__slots__`` order (``dataclasses.astuple``, shallow)."""
        return tuple([getattr(self, k) for k in self.__slots__])

    def asdict(self) -> dict[str, Any]:
        """Field name -> value, in ``__slots__`` order (``dataclasses.asdict``, shallow)."""
        return {k: getattr(self, k) for k in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            assert isinstance(other, Plain)
            return self.astuple() == other.astuple()
        return NotImplemented

    def __repr__(self) -> str:
        inner = ", ".join([f"{k}={getattr(self, k)!r}" for k in self.__slots__])
        return f"{type(self).__qualname__}({inner})"


class Frozen(Plain):
    """An immutable, hashable record: ``__init__`` sets its fields with :meth:`_set`."""

    __slots__: tuple[str, ...] = ()

    def _set(self, *values: Any) -> None:
        """Set every field, in ``__slots__`` order, once (from ``__init__``): on a record
        whose fields are set it raises :class:`FrozenFieldError` and changes nothing."""
        fields = self.__slots__
        if fields and hasattr(self, fields[0]):
            raise FrozenFieldError(f"{type(self).__qualname__} is frozen: its fields are set")
        for k, v in zip(fields, values, strict=True):
            object.__setattr__(self, k, v)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (``dataclasses.replace``: through ``__init__`` again).

        Raises:
            TypeError: a name in ``changes`` is not a field.
        """
        unknown = changes.keys() - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__qualname__} has no field {sorted(unknown)[0]!r}")
        return type(self)(**{k: changes.get(k, getattr(self, k)) for k in self.__slots__})

    def __hash__(self) -> int:
        return hash(self.astuple())

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise FrozenFieldError(f"cannot assign to field {name!r} of {type(self).__qualname__}")

    def __delattr__(self, name: str) -> NoReturn:
        raise FrozenFieldError(f"cannot delete field {name!r} of {type(self).__qualname__}")

    def __reduce__(self) -> tuple[type[Self], tuple[Any, ...]]:
        # copy rebuilds through __init__ (its default for slots sets them with setattr)
        return type(self), self.astuple()
