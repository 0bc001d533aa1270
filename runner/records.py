"""Records: JSON objects as typed dataclasses, whose type hints are their schema.

A result file is read into a `Record`: its named keys become fields (a nested record's, a record of
its own), every other key is kept in `extra`, and the keys keep the order they were read in, so
`from_json(d).to_json() == d`. A record made here writes its keys in a fixed order instead.

The same type hints check a JSON value before it is read (`problem`): a value that breaks them is
named by its path and what was found ("metrics.accuracy: expected a number, found a JSON string").
The hints a check understands:

- `str`, `int`, `bool`, `float` (a JSON number, whole or not, never true or false) and `Any`;
- `X | None` (null allowed), `list[X]`, `dict` (any object), `dict[str, X]` (every value an X);
- a Record subclass or a TypedDict: an object whose listed keys are checked when present, and must
  be present where the record has no default (`Required[...]` in a TypedDict of `total=False`);
- `Annotated[X, rule, ...]`: X, then each rule, a function of the value that says what is wrong
  with it (a list of the wrong length) or None.

No torch, no numpy: the driver, `collect` and `report` read results with it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Annotated, Any, ClassVar, Self, get_args, get_origin, get_type_hints


def bookkeeping(**kwargs):
    """A record's field that is not a JSON key (the file a result was read from, say)."""
    return field(**kwargs, metadata={"json": False}, repr=False, compare=False)


def json_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("json", True)]


def _default(f):
    return f.default_factory() if callable(f.default_factory) else f.default


@dataclass
class Record:
    """A JSON object as a dataclass: its named keys as fields (NESTED ones as records of their
    own), every other key in `extra`, and the keys' order as read."""

    extra: dict[str, Any] = bookkeeping(default_factory=dict)
    key_order: tuple[str, ...] | None = bookkeeping(default=None)  # None: not read from JSON

    NESTED: ClassVar[dict[str, type[Record]]] = {}
    ALWAYS: ClassVar[tuple[str, ...]] = ()  # the keys a record made here writes even when default

    @classmethod
    def from_json(cls, data: dict) -> Self:
        named = {f.name for f in json_fields(cls)}
        values = {
            key: cls.NESTED[key].from_json(value)
            if key in cls.NESTED and value is not None
            else value
            for key, value in data.items()
            if key in named
        }
        extra = {key: value for key, value in data.items() if key not in named}
        return cls(**values, extra=extra, key_order=tuple(data))

    def keys(self) -> list[str]:
        """The JSON's keys: as read, then the fields set since (or, made here, ALWAYS and the fields
        that hold more than their default), then extra keys added since."""
        keys = list(self.ALWAYS if self.key_order is None else self.key_order)
        keys += [
            f.name
            for f in json_fields(self)
            if f.name not in keys and getattr(self, f.name) != _default(f)
        ]
        return keys + [key for key in self.extra if key not in keys]

    def json_value(self, key: str) -> Any:
        """The JSON value of one of the record's keys."""
        value = self.extra[key] if key in self.extra else getattr(self, key)
        return value.to_json() if isinstance(value, Record) else value

    def to_json(self) -> dict:
        return {key: self.json_value(key) for key in self.keys()}

    @classmethod
    def schema(cls) -> Fields:
        """The keys a JSON object of this record may hold, each with its type hint."""
        if cls not in _SCHEMAS:
            hints = get_type_hints(cls, include_extras=True)
            listed = json_fields(cls)
            _SCHEMAS[cls] = Fields(
                {f.name: hints[f.name] for f in listed},
                tuple(
                    f.name for f in listed if f.default is MISSING and f.default_factory is MISSING
                ),
            )
        return _SCHEMAS[cls]

    @classmethod
    def invariant(cls, data: dict, where: str) -> str | None:
        """What the type hints cannot say of a JSON object of this record (lists that must be as
        long as each other), as a message naming where; None when it holds. Checked after the
        hints."""
        return None


_SCHEMAS: dict[type, Fields] = {}


@dataclass(frozen=True)
class Fields:
    """The schema of a JSON object: each key's type hint, and the keys it must have."""

    hints: dict[str, Any]
    required: tuple[str, ...] = ()

    def with_hints(self, more: dict[str, Any]) -> Fields:
        return Fields({**self.hints, **more}, self.required)


def fields_of(hint) -> Fields | None:
    """The schema of a Record subclass or a TypedDict; None for any other hint."""
    if isinstance(hint, Fields):
        return hint
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.schema()
    if typing.is_typeddict(hint):
        # Required and NotRequired read from the resolved hints: a module's postponed
        # annotations hide them from the TypedDict's own __required_keys__.
        hints = get_type_hints(hint, include_extras=True)
        required = [
            key
            for key, value in hints.items()
            if get_origin(value) is typing.Required
            or (hint.__total__ and get_origin(value) is not typing.NotRequired)
        ]
        return Fields({key: _unrequired(value) for key, value in hints.items()}, tuple(required))
    return None


def _unrequired(hint):
    """A TypedDict's Required[X] or NotRequired[X] as X."""
    if get_origin(hint) in (typing.Required, typing.NotRequired):
        return get_args(hint)[0]
    return hint


def json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "true or false", type(None): "null"}
    return kinds.get(type(value), "number")


SCALARS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def problem(value: Any, hint: Any, where: str = "") -> str | None:
    """What in `value` breaks `hint` ("metrics.accuracy: expected a number, found a JSON
    string"), or None."""
    if hint is Any:
        return None
    if get_origin(hint) is Annotated:
        kind, *rules = get_args(hint)
        found = problem(value, kind, where)
        for rule in rules:
            found = found or _said(rule(value), where)
        return found
    if get_origin(hint) in (types.UnionType, typing.Union):
        options = [option for option in get_args(hint) if option is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        return problem(value, options[0], where)  # X | None is the one union records use
    schema = fields_of(hint)
    if schema is not None:
        found = _object_problem(value, schema, where)
        if found is None and isinstance(hint, type) and issubclass(hint, Record):
            found = hint.invariant(value, where)
        return found
    origin = get_origin(hint) or hint
    if origin is list:
        return _list_problem(value, get_args(hint), where)
    if origin is dict:
        return _dict_problem(value, get_args(hint), where)
    return _scalar_problem(value, hint, where)


def _said(text: str | None, where: str) -> str | None:
    return None if text is None else f"{where}: {text}"


def _object_problem(value: Any, schema: Fields, where: str) -> str | None:
    if not isinstance(value, dict):
        return f"{where}: expected an object, found a JSON {json_kind(value)}"
    inside = f"{where}." if where else ""
    missing = [key for key in schema.required if key not in value]
    if missing:
        return f"{inside}{missing[0]}: missing"
    for key, item in value.items():
        if key in schema.hints:
            found = problem(item, schema.hints[key], f"{inside}{key}")
            if found:
                return found
    return None


def _list_problem(value: Any, args: tuple, where: str) -> str | None:
    if not isinstance(value, list):
        return f"{where}: expected a list, found a JSON {json_kind(value)}"
    item_hint = args[0] if args else Any
    for i, item in enumerate(value):
        found = problem(item, item_hint, f"{where}[{i}]")
        if found:
            return found
    return None


def _dict_problem(value: Any, args: tuple, where: str) -> str | None:
    if not isinstance(value, dict):
        return f"{where}: expected an object, found a JSON {json_kind(value)}"
    item_hint = args[1] if args else Any
    inside = f"{where}." if where else ""
    for key, item in value.items():
        found = problem(item, item_hint, f"{inside}{key}")
        if found:
            return found
    return None


def _scalar_problem(value: Any, hint: type, where: str) -> str | None:
    kinds = (int, float) if hint is float else (hint,)
    if isinstance(value, kinds) and not (isinstance(value, bool) and hint is not bool):
        return None
    return f"{where}: expected {SCALARS.get(hint, hint.__name__)}, found a JSON {json_kind(value)}"


def length(expected: int, what: str) -> Callable[[list], str | None]:
    """A rule: the list holds `expected` values ("an interval has 2")."""

    def rule(values: list) -> str | None:
        if len(values) == expected:
            return None
        return f"{len(values)} values where {what} has {expected}"

    return rule
