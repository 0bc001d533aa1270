"""Reading a job's fields: the error that names the file and the field, and the reader that walks
one mapping of the YAML remembering where it is.

The ground floor of reading a job: the spec (runner/spec.py), the precision families' and the
tasks' own fields read with the same Reader and fail with the same SpecError. Plain Python.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any


class SpecError(Exception):
    """A mistake in a job file: which file, which field, what was found, what is allowed."""

    def __init__(self, file: str | Path, field: str, found: Any, allowed: str):
        self.file, self.field, self.found, self.allowed = str(file), field, found, allowed
        where = f"{self.file}: {field}" if field else self.file
        super().__init__(f"{where}: found {show(found)}; {allowed}")


def no_such(what: str) -> str:
    """'no such file', and inside a container which host folders it can see (compose.yaml says)."""
    mounts = os.environ.get("QUANTBENCH_MOUNTS")
    return (
        f"{what}; this container sees only {mounts}: put it there, or mount its folder"
        if mounts
        else what
    )


def show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list) and len(value) > 10:  # a wrong column can hold thousands of values
        return "[" + ", ".join(map(repr, value[:10])) + f", … ({len(value)} in all)]"
    text = (
        repr(value) if not isinstance(value, str) or len(value) < 200 else repr(value[:200] + "…")
    )
    return text


class Reader:
    """Walks one mapping of the YAML, remembering the dotted field path for error messages."""

    def __init__(self, file: Path, data: Any, where: str):
        self.file, self.where = file, where
        if not isinstance(data, dict):
            raise SpecError(file, where, data, "expected a mapping of fields")
        self.data = data

    def field(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, found: Any, allowed: str) -> SpecError:
        """The SpecError for a bad value of one of this mapping's fields."""
        return SpecError(self.file, self.field(key), found, allowed)

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise SpecError(
                    self.file,
                    self.field(str(key)),
                    key,
                    f"unknown field{hint}; allowed here: {', '.join(allowed)}",
                )

    def get(
        self, key: str, kinds: type | tuple[type, ...], default: Any = None, required: bool = False
    ):
        if key not in self.data or self.data[key] is None:
            if required:
                raise SpecError(self.file, self.field(key), None, "this field is required")
            return default
        value = self.data[key]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # YAML's bool is an int subclass: never accept true where a number is meant.
        if isinstance(value, bool) and bool not in kinds:
            raise SpecError(self.file, self.field(key), value, f"expected {kind_names(kinds)}")
        if float in kinds and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kinds):
            raise SpecError(self.file, self.field(key), value, f"expected {kind_names(kinds)}")
        return value

    def positive_int(self, key: str, default: int | None, minimum: int = 1) -> int | None:
        value = self.get(key, int, default)
        if value is not None and value < minimum:
            raise SpecError(self.file, self.field(key), value, f"expected an integer >= {minimum}")
        return value

    def sub(self, key: str, required: bool = False) -> Reader | None:
        value = self.get(key, dict, required=required)
        return None if value is None else Reader(self.file, value, self.field(key))


def kind_names(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


WHOLE_NUMBER = re.compile(r"([+-]?[0-9]+)\.0*")


def label_name(value: Any) -> str:
    """A dataset label as text. A whole number reads one way however it is written (2, 2.0 or
    "2.0"): a float label column, a CSV cell and a label mapping's key must name the same label."""
    if value is None:
        return ""  # a missing label reads as an empty one
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    whole = WHOLE_NUMBER.fullmatch(text)
    return str(int(whole.group(1))) if whole else text
