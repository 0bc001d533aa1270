"""What every figure of the report shares: its size, its colours, its panels and legend, and how
it becomes a PNG file and an image on the page."""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from runner.layers import LAYER_TYPES

DPI = 120
PANEL_IN = 3.4  # width and height of one small-multiple panel, inches
MAX_COLUMNS = 3
DEVICE_COLOURS = {"cpu": "#1f77b4", "cuda": "#2ca02c"}  # a variant's marker, by its device
# One colour per layer type, the same in every plot (tab20's: an encoder's types keep tab10's).
TYPE_COLOURS = {
    "query": "#1f77b4",
    "key": "#ff7f0e",
    "value": "#2ca02c",
    "attention_output": "#d62728",
    "intermediate": "#9467bd",
    "output": "#8c564b",
    "classifier": "#e377c2",
    "pooler": "#7f7f7f",
    "other": "#bcbd22",
    "query_key_value": "#aec7e8",
    "mlp_gate": "#17becf",
    "mlp_up": "#c5b0d5",
    "mlp_down": "#c49c94",
    "lm_head": "#f7b6d2",
}
assert set(TYPE_COLOURS) == set(LAYER_TYPES), "a layer type without a colour"


def log_scale(ax, which: str) -> None:
    """One axis of ax ("x" or "y"), drawn already, on a log scale with its ticks in plain numbers
    (matplotlib's own log labels are formulas, which the report's text.parse_math=False would
    print raw); over at most two decades ticks at 1, 2 and 5 times a power of ten, else at each
    power of ten."""
    getattr(ax, f"set_{which}scale")("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    decades = math.log10(high / low) if low > 0 else math.inf
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def log_scale_if_wide(ax, which: str, values: list[float], ratio: float = 20.0) -> None:
    """log_scale where the values span more than ratio times: a linear axis would crowd the
    small ones into a corner."""
    if max(values) / min(values) > ratio:
        log_scale(ax, which)


def device_legend(ax, devices: set[str]) -> None:
    """A legend entry per device the points ran on, and room around them for their labels."""
    for device, colour in DEVICE_COLOURS.items():
        if device in devices:
            ax.scatter([], [], color=colour, alpha=0.55, label=device)
    ax.margins(x=0.12, y=0.15)  # room for the labels
    ax.legend(loc="best", fontsize=8)


def panels(n: int, title: str) -> tuple[Figure, list]:
    columns = min(n, MAX_COLUMNS)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(PANEL_IN * columns, PANEL_IN * rows + 0.4), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for unused in axes[n:]:
        unused.set_visible(False)
    figure.suptitle(title)
    return figure, axes[:n]


def shared_legend(figure: Figure, axes: list) -> None:
    """One legend under the panels, one entry per label over all of them: a layer type may be
    missing from one panel."""
    legend = {}
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    figure.legend(
        list(legend.values()),
        list(legend),
        loc="outside lower center",
        ncols=min(len(legend), 5),
        fontsize=8,
    )


@dataclass(frozen=True)
class Plot:
    """One figure of a job's section: its file name part, heading and caption, how it is drawn
    from the job's collect.JobTable (None: nothing to draw), and what is said instead then."""

    name: str
    heading: str
    caption: str
    draw: Callable[..., Figure | None]
    missing: str


@dataclass(frozen=True)
class TaskPlots:
    """A task's figures: those shown before the figures of the weights every task has, and those
    after them."""

    first: tuple[Plot, ...] = ()
    last: tuple[Plot, ...] = ()


@dataclass(frozen=True)
class Shown:
    """A figure as the page shows it: its PNG in base64, or None and what to say instead."""

    png_base64: str | None
    alt: str = ""
    caption: str = ""
    missing: str = ""


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


class FigureFiles:
    """Writes each figure as a PNG into one folder, and keeps what it wrote."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.written: list[Path] = []

    def show(self, figure: Figure | None, name: str, alt: str, caption: str, missing: str) -> Shown:
        if figure is None:
            return Shown(None, missing=missing)
        encoded = png(figure)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{_safe(name)}.png"
        path.write_bytes(encoded)
        self.written.append(path)
        return Shown(base64.b64encode(encoded).decode("ascii"), alt, caption)


def number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
