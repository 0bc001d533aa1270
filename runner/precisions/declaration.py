"""What a precision family declares: plain records, no torch. The driver, `quantbench validate`,
`collect` and `report` read them; a family's worker (its `worker.py`) is resolved by name, on the
worker, when a variant needs it (runner.precisions.worker_of)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from runner.references import resolve


@dataclass(frozen=True)
class Precision:
    name: str
    family: str  # the name of the Family that declares it
    devices: tuple[str, ...]
    how: str
    # A frozen dataclass: its fields are the keys of the job's flat `settings:` this precision
    # reads, with their defaults; ClassVars say what it is (a cast's dtype, a bnb 4-bit quant
    # type). The family's worker dispatches on its type.
    config: type
    # True for a method that observes a calibration set before it quantizes (its family's
    # calibrate): a job with it needs a `calibration:` block.
    calibrated: bool = False

    def __post_init__(self):
        if not (is_dataclass(self.config) and self.config.__dataclass_params__.frozen):
            raise TypeError(f"{self.name}: its config {self.config!r} must be a frozen dataclass")


@dataclass(frozen=True)
class Family:
    """One way of quantizing, in the manner of torchao: its precisions, each with its config type,
    and the worker that runs them."""

    name: str  # its folder in runner/precisions/
    precisions: tuple[Precision, ...]
    # reader -> {key: value}: its keys of the job's flat `settings:`, read with their defaults and
    # checked; reader.error(key, found, allowed) makes the error that names the file and field.
    read_settings: Callable[[Any], dict]
    # "module:attribute" of its FamilyWorker (runner/precisions/worker.py): imported only where a
    # variant of it runs, never by the driver.
    worker: str
    # What a fork server may import before it forks, on a node without a GPU (besides the worker's
    # module): the family's library.
    imports: tuple[str, ...] = ()
    # False for the float casts: they change every layer at once, so a sensitivity study cannot take
    # them apart.
    quantizes_layers: bool = True
    # Settings its precisions take that another family declares and reads (one int4 group size for
    # every int4 method, so that they compare like for like): same default, read once, by the other.
    shares: tuple[str, ...] = ()

    def __post_init__(self):
        for precision in self.precisions:
            if precision.family != self.name:
                raise ValueError(
                    f"{precision.name} names family {precision.family!r}, not {self.name!r}"
                )
        self.defaults()  # every key has one default

    def defaults(self) -> dict:
        """Every key of `settings:` its precisions read, with its default, in precision order."""
        found: dict = {}
        for precision in self.precisions:
            for f in fields(precision.config):
                if f.default is MISSING:
                    raise TypeError(f"{precision.name}: setting {f.name} needs a default")
                if found.setdefault(f.name, f.default) != f.default:
                    raise ValueError(f"{self.name}: the precisions disagree on {f.name}'s default")
        return found

    def precision(self, name: str) -> Precision:
        """Its precision of that name. Raises ValueError for a name it does not declare."""
        found = next((p for p in self.precisions if p.name == name), None)
        if found is None:
            declared = [p.name for p in self.precisions]
            raise ValueError(f"family {self.name!r} declares no precision {name!r}: {declared}")
        return found

    def family_worker(self):
        """Its FamilyWorker, resolved by name: torch and its library are imported now. A work
        item carries the Family, so the process that runs it needs no registry."""
        return resolve(self.worker)

    @property
    def worker_module(self) -> str:
        return self.worker.partition(":")[0]

    @property
    def preload(self) -> tuple[str, ...]:
        """What a fork server on a node without a GPU imports for it: its library and its worker."""
        return (*self.imports, self.worker_module)
