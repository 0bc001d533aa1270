"""The precisions: a registry of names, each run by one family, a folder of this package.

A family is one way of quantizing, in the manner of torchao: a config type per precision plus the
worker that loads and quantizes with it. Each family folder (casts, torch_ao, torchao, calibrated,
bitsandbytes) holds:

- `__init__.py`, its declaration, torch-free: its precisions (`Precision(name, family, devices,
  how, config)`, each config a frozen dataclass whose fields are the keys of the job's flat
  `settings:` it reads), `read_settings(reader)`, and `FAMILY`, the `Family` registered below;
- `worker.py`: its `FamilyWorker` (runner/precisions/worker.py: the protocol, with a plain FP32
  model's defaults), which imports torch, transformers and the family's library at its top.

This module imports neither: the driver, `quantbench validate`, `collect` and `report` read the
registry without torch, and a fork server on a GPU node never imports bitsandbytes before it forks.
A family's worker is resolved by name (`worker_of`) in the variant's own process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from runner.precisions import bitsandbytes, calibrated, casts, torch_ao, torchao
from runner.precisions.declaration import Family, Precision
from runner.references import resolve

__all__ = [
    "DEVICES",
    "FAMILIES",
    "PRECISIONS",
    "Family",
    "Precision",
    "config_for",
    "default_settings",
    "family_of",
    "precision_of",
    "read_settings",
    "register",
    "worker_of",
]

DEVICES = ("cpu", "cuda")

# The families in the order of their settings in a job's errors and a result's record.
FAMILIES: dict[str, Family] = {}
# Every precision by name, in the table's column order.
PRECISIONS: dict[str, Precision] = {}


def register(family: Family, *, columns_before: str | None = None) -> Family:
    """Adds the family: last in FAMILIES, and its precisions last in PRECISIONS or, given
    columns_before (a registered family's name), just before that family's precisions."""
    if family.name in FAMILIES:
        raise ValueError(f"precision family {family.name!r} is registered already")
    clash = sorted(p.name for p in family.precisions if p.name in PRECISIONS)
    if clash:
        raise ValueError(f"{family.name}: precisions {clash} are registered already")
    keys, registered = family.defaults(), default_settings()
    taken = sorted((set(keys) - set(family.shares)) & set(registered))
    if taken:
        raise ValueError(f"{family.name}: settings {taken} are another family's already")
    for key in family.shares:
        if key not in registered or registered[key] != keys.get(key):
            raise ValueError(
                f"{family.name}: shares setting {key!r}, which no registered family declares with "
                f"the default {keys.get(key)!r}"
            )
    entries = list(PRECISIONS.values())
    at = len(entries)
    if columns_before is not None:
        at = next((i for i, p in enumerate(entries) if p.family == columns_before), None)
        if at is None:
            raise ValueError(f"{family.name}: no registered family {columns_before!r} has columns")
    FAMILIES[family.name] = family
    entries[at:at] = family.precisions
    PRECISIONS.clear()
    PRECISIONS.update((p.name, p) for p in entries)
    return family


def precision_of(name: str) -> Precision:
    """The registered precision. Raises ValueError for an unknown one."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; known: {list(PRECISIONS)}")
    return PRECISIONS[name]


def family_of(precision: Precision | str) -> Family:
    """The family that declares this precision (a Precision or its name). Raises ValueError for an
    unknown one."""
    if isinstance(precision, str):
        precision = precision_of(precision)
    return FAMILIES[precision.family]


def default_settings(**values) -> dict:
    """Every family's keys of the job's flat `settings:` with their defaults, in FAMILIES order,
    the given values in place of theirs. Raises ValueError for a key no family reads."""
    found = {key: value for family in FAMILIES.values() for key, value in family.defaults().items()}
    unknown = sorted(set(values) - set(found))
    if unknown:
        raise ValueError(f"no precision family reads settings {unknown}; known: {list(found)}")
    found.update(values)
    return found


def read_settings(reader) -> dict:
    """The values of every family's settings, read and checked by its own read_settings, in
    FAMILIES order (as a result records them)."""
    values: dict = {}
    for family in FAMILIES.values():
        values.update(family.read_settings(reader))
    return {key: values[key] for key in default_settings()}


def config_for(precision: Precision, settings: Mapping):
    """The precision's config, its fields taken from the job's flat settings (every family's keys,
    as read_settings or default_settings gives them)."""
    return precision.config(**{f.name: settings[f.name] for f in fields(precision.config)})


def worker_of(precision: Precision | str):
    """The FamilyWorker of the precision's family (a Precision or its name), imported on first use:
    this is where torch and the family's library are imported. Raises ValueError for an unknown
    precision."""
    return resolve(family_of(precision).worker)


# Settings in today's order: bitsandbytes', torch.ao's, torchao's; columns: the casts, torch.ao's
# int8-dynamic and torchao's precisions side by side (the two generations), bitsandbytes.
register(bitsandbytes.FAMILY)
register(torch_ao.FAMILY, columns_before="bitsandbytes")
register(torchao.FAMILY, columns_before="bitsandbytes")
register(casts.FAMILY, columns_before="torch_ao")
# The calibrated methods after the calibration-free ones they are compared with.
register(calibrated.FAMILY, columns_before="bitsandbytes")
