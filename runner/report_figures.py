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

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from runner.layers import LAYER_TYPES
from runner.measure import hardware_label, machine_name
from runner.schema import Result

DPI = 120
PANEL_IN = 3.4  # width and height of one small-multiple panel, inches
MAX_COLUMNS = 3
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


def panels(
    n: int, title: str, max_columns: int = MAX_COLUMNS, width: float = PANEL_IN
) -> tuple[Figure, list]:
    """n panels of `width` inches (PANEL_IN high), at most max_columns to a row, under title."""
    columns = min(n, max_columns)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(width * columns, PANEL_IN * rows + 0.4), layout="constrained")
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


# ---------------------------------------------------------------------------------------------
# Machines: a colour and a marker each, so that results of two machines in one plot tell apart.

MACHINE_STYLES = (
    ("#1f77b4", "o"),
    ("#ff7f0e", "s"),
    ("#2ca02c", "^"),
    ("#d62728", "D"),
    ("#9467bd", "v"),
    ("#8c564b", "P"),
    ("#e377c2", "X"),
    ("#17becf", "p"),
)


@dataclass(frozen=True)
class MachineStyle:
    name: str
    colour: str
    marker: str


def _machine_name(result: Result) -> str:
    """What the table's hardware row says: the CPU or GPU, and the machine's label or host."""
    env = result.environment or {}
    return f"{hardware_label(env, result.device)} @ {machine_name(env) or '?'}"


def machine_styles(results: dict[str, Result]) -> dict[str, MachineStyle]:
    """Each result's machine (by column key, in column order) and its colour and marker. Two
    machines that name themselves alike are told apart by their results folder (DIR of
    DIR/<job>/<file>), as the table's column keys are."""
    folders: dict[str, set[str]] = {}
    for result in results.values():
        folder = result.file.parent.parent.name if result.file else ""
        folders.setdefault(_machine_name(result), set()).add(folder)
    names = {}
    for key, result in results.items():
        name = _machine_name(result)
        if len(folders[name]) > 1 and result.file:
            name = f"{name} ({result.file.parent.parent.name})"
        names[key] = name
    order = list(dict.fromkeys(names.values()))
    styles = {
        name: MachineStyle(name, *MACHINE_STYLES[i % len(MACHINE_STYLES)])
        for i, name in enumerate(order)
    }
    return {key: styles[name] for key, name in names.items()}


def machine_legend(figure: Figure, ax, styles: list[MachineStyle]) -> None:
    """One legend under the plot: an entry per machine drawn, and the plot's labelled lines
    (tolerances). Under the plot, it hides no point and no label."""
    for style in dict.fromkeys(styles):
        ax.scatter([], [], color=style.colour, marker=style.marker, alpha=0.55, label=style.name)
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=1, fontsize=8)


# ---------------------------------------------------------------------------------------------
# Point labels that do not overlap: each label takes the nearest free place around its point.


@dataclass(frozen=True)
class Box:
    """A rectangle in display units (pixels, y up)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other: Box) -> float:
        """The area both cover."""
        width = min(self.x1, other.x1) - max(self.x0, other.x0)
        height = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(width, 0.0) * max(height, 0.0)

    def outside(self, bounds: Box) -> float:
        """The area of this box outside bounds."""
        return (self.x1 - self.x0) * (self.y1 - self.y0) - self.overlap(bounds)


LABEL_FONT = 8
RINGS = 14  # how far out a label may go: rings of candidate places around its point


def _candidates(radius: float, width: float, height: float, step: float):
    """Offsets of a label's lower-left corner from its point, nearest first: right above, right
    below, left above, left below, right, left, above, below, on rings further and further out."""
    for ring in range(RINGS):
        d = radius + 3.0 + ring * step
        e = d * 0.71  # the diagonal places, as far from the point as the straight ones
        yield ring, (e, e)
        yield ring, (e, -e - height)
        yield ring, (-e - width, e)
        yield ring, (-e - width, -e - height)
        yield ring, (d, -height / 2)
        yield ring, (-d - width, -height / 2)
        yield ring, (-width / 2, d)
        yield ring, (-width / 2, -d - height)


def place_labels(
    anchors: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    radii: list[float],
    bounds: Box,
) -> list[tuple[tuple[float, float], int]]:
    """Where to put each label (width, height) beside its point (anchor, marker radius), all in
    display units: (offset of the label's lower-left corner from its point, ring). Greedy, in the
    order given: each label takes the nearest place that overlaps no label placed before it and
    stays within bounds, the fewest markers covered first; where there is none, the place that
    overlaps least."""
    markers = [Box(x - r, y - r, x + r, y + r) for (x, y), r in zip(anchors, radii)]
    placed: list[Box] = []
    chosen = []
    for index, ((x, y), (width, height), radius) in enumerate(zip(anchors, sizes, radii)):
        best = None
        for order, (ring, (dx, dy)) in enumerate(_candidates(radius, width, height, height / 2)):
            box = Box(x + dx, y + dy, x + dx + width, y + dy + height)
            hard = sum(box.overlap(other) for other in placed) + box.outside(bounds)
            soft = sum(box.overlap(m) for i, m in enumerate(markers) if i != index)
            cost = (hard, soft, order)
            if best is None or cost < best[0]:
                best = (cost, box, (dx, dy), ring)
            if hard == 0 and soft == 0:
                break
        _, box, offset, ring = best
        placed.append(box)
        chosen.append((offset, ring))
    return chosen


def label_points(ax, points: list[tuple[float, float]], labels: list[str], sizes: list[float]):
    """Each point's label beside it where no other label is (place_labels); a label moved away
    from its point gets a line to it. Call it last: it places the labels in the plot as drawn.
    sizes: the points' marker areas (points², as scatter's s). Returns the labels' Text."""
    figure = ax.figure
    FigureCanvasAgg(figure)  # a canvas that can measure text
    figure.canvas.draw()  # the layout settles: the points are where they will be drawn
    renderer = figure.canvas.get_renderer()
    probes = [ax.text(0, 0, t, fontsize=LABEL_FONT, transform=ax.transAxes) for t in labels]
    extents = [probe.get_window_extent(renderer) for probe in probes]
    for probe in probes:
        probe.remove()
    pixels = figure.dpi / 72  # display pixels per point
    radii = [math.sqrt(s) / 2 for s in sizes]  # in points
    frame = ax.get_window_extent(renderer)
    places = place_labels(
        [tuple(xy) for xy in ax.transData.transform(points)],
        [(e.width, e.height) for e in extents],
        [r * pixels for r in radii],
        Box(frame.x0, frame.y0, frame.x1, frame.y1),
    )
    texts = []
    for label, point, ((dx, dy), ring), radius in zip(labels, points, places, radii):
        line = {"arrowstyle": "-", "color": "#888888", "linewidth": 0.6, "shrinkB": radius}
        text = ax.annotate(
            label,
            point,
            textcoords="offset points",
            xytext=(dx / pixels, dy / pixels),
            fontsize=LABEL_FONT,
            va="bottom",
            arrowprops=line if ring > 0 else None,
        )
        text.set_in_layout(False)  # kept inside the axes: the layout stays as measured
        texts.append(text)
    return texts


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
