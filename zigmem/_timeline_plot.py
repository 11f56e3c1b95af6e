"""The picture of a memory timeline (``Timeline.plot``), drawn with matplotlib's Agg backend.

Top panel: one stacked area per disjoint subsystem (those not ``within`` another), so the
stack's height is the memory held, counted once; each subsystem's "used", "peak" and
"resident" figures are lines over its own band, and the subsystems within it thin lines in
the same band. Below: one small panel per disjoint subsystem on its own scale (subsystems
that never held a byte are left out). The x axis is
the marks in order, one step each, so every token gets the same width however long it took
(the times are in the samples); tick labels are thinned to what fits.

matplotlib is imported here only, through ``Figure`` and the canvas classes rather than
pyplot, so drawing neither needs a display nor touches the caller's pyplot state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# One subsystem's series: {"kind", "within", "root", "figures": {figure: [value or None]}}.
_Series = dict[str, Any]

_DPI = 100
# Figures in bytes and how they are drawn; any other figure is a count (blocks, positions)
# and stays in the data only.
_LINES = {"used": "-", "peak": "--", "resident": ":", "cached": "-."}
_WITHIN_STYLE = (0, (5, 1, 1, 1, 1, 1))  # held by a subsystem drawn inside another's band
_UNITS = ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B"))
_DETAIL_ROW_PX = 110  # the least height a row of small panels stays readable in
_MAX_LABEL = 24   # characters of a mark's label on the x axis


def draw(samples: list[dict[str, Any]], path: str, width: int, height: int) -> None:
    """Write the picture of ``samples`` to ``path`` (PNG or SVG by suffix).

    Raises:
        ImportError: matplotlib is missing, naming the extra that installs it.
        InvalidArgumentError: unknown suffix, size out of range, no samples.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".svg"):
        raise InvalidArgumentError(f"plot writes .png or .svg files, not {suffix or 'no suffix'!r} ({path})")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or not 200 <= value <= 10000:
            raise InvalidArgumentError(f"{name} must be an integer number of pixels in [200, 10000], got {value!r}")
    if not samples:
        raise InvalidArgumentError("nothing to plot: the timeline has no samples (record in its with block)")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("Timeline.plot needs matplotlib: pip install 'zigmem[plot]'") from None

    xs = list(range(len(samples)))  # the marks in order, one step each
    series = _series(samples)
    # Subsystems that never held a byte stay in the data, out of the picture.
    roots = [name for name, info in series.items()
             if info["root"] == name and any(_largest(i) for i in series.values() if i["root"] == name)]
    # Panels for the largest subsystems, in as many rows of 4 as fit in 40% of the height.
    fit = 4 * max(1, min(2, int(0.4 * height) // _DETAIL_ROW_PX))
    largest = sorted(roots, key=lambda r: -_largest(series[r]))[:fit]
    detailed = [r for r in roots if r in largest]
    # Pixel-exact size: Agg truncates width * dpi, so nudge the inches up by a hair.
    fig = Figure(figsize=((width + 0.01) / _DPI, (height + 0.01) / _DPI), dpi=_DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    columns = max(1, min(len(detailed), 4))
    rows = math.ceil(len(detailed) / columns)
    # Two sub-figures, so the overview's legend takes width from the overview only.
    # (matplotlib's stubs say SubFigure | ndarray: two rows are always an array of two)
    overview, details = fig.subfigures(  # type: ignore[misc]
        2, 1, height_ratios=[3, 1.5 * max(rows, 1)])
    top = overview.add_subplot()
    colors = {name: f"C{i % 10}" for i, name in enumerate(roots)}
    legend_rows = max(3, int(height * 3 / (3 + 1.5 * max(rows, 1)) * 0.8) // 11)  # 11 px each
    _draw_stack(top, xs, series, roots, colors, legend_rows)
    _mark_axis(top, samples, xs, width)
    top.set_title("memory held, per subsystem (stacked: each byte counted once)", fontsize=10)
    for i, root in enumerate(detailed):
        ax = details.add_subplot(rows, columns, i + 1)
        _draw_detail(ax, xs, series, root, colors[root], title_chars=int(width / columns / 7))
        if len(xs) > 1:
            ax.set_xlim(xs[0], xs[-1])
        ax.set_xticks(xs, minor=True)
        ax.tick_params(axis="x", labelbottom=False, bottom=False)
    fig.savefig(path, format=suffix[1:], dpi=_DPI)


def _series(samples: list[dict[str, Any]]) -> dict[str, _Series]:
    """Per subsystem name: its kind, its root (the disjoint subsystem it is drawn in) and
    one list per figure, None where the subsystem was absent from a sample."""
    series: dict[str, _Series] = {}
    for i, sample in enumerate(samples):
        for name, figures in sample["subsystems"].items():
            info = series.setdefault(name, {"kind": figures["kind"], "within": figures.get("within"),
                                            "figures": {}})
            for key, value in figures.items():
                if key not in ("kind", "within"):
                    info["figures"].setdefault(key, [None] * len(samples))[i] = value
    for name, info in series.items():  # follow "within" to the top, never round a cycle
        root, seen = name, {name}
        while series.get(root, {}).get("within") in series and series[root]["within"] not in seen:
            root = series[root]["within"]
            seen.add(root)
        info["root"] = root
    return series


def _unit(largest: float) -> tuple[int, str]:
    for size, unit in _UNITS:
        if largest >= size:
            return size, unit
    return 1, "B"


def _values(values: list[float | None], scale: float,
            base: list[float] | None = None) -> list[float]:
    """Scaled figures over ``base``; NaN (a gap in the line) where absent."""
    out: list[float] = []
    for i, v in enumerate(values):
        out.append(math.nan if v is None else v / scale + (base[i] if base else 0.0))
    return out


def _draw_stack(ax: Axes, xs: list[int], series: dict[str, _Series], roots: list[str],
                colors: dict[str, str], legend_rows: int) -> None:
    from matplotlib.patches import Patch

    held_total = [sum(series[r]["figures"].get("held", [0] * len(xs))[i] or 0 for r in roots)
                  for i in range(len(xs))]
    scale, unit = _unit(max(held_total + [_largest(info) for info in series.values()]))
    base = [0.0] * len(xs)
    for root in roots:
        held = [(v or 0) / scale for v in series[root]["figures"].get("held", [0] * len(xs))]
        top = [b + h for b, h in zip(base, held)]
        ax.fill_between(xs, base, top, step=None, color=colors[root], alpha=0.45,
                        linewidth=0, label=root)
        for name, figure, values, style in _lines(series, root):
            ax.plot(xs, _values(values, scale, base), linestyle=style, color=colors[root],
                    linewidth=1.6 if name == root else 0.9,
                    label=name if figure == "held" else f"{name}: {figure}")
        base = top
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.margins(x=0)
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > legend_rows:  # too many to list: the areas only, as many as fit
        pairs = [(h, l) for h, l in zip(handles, labels) if l in roots]
        handles, labels = [h for h, _ in pairs], [l for _, l in pairs]
        if len(handles) > legend_rows:
            more = len(handles) - legend_rows + 1
            handles = handles[:legend_rows - 1] + [Patch(alpha=0)]
            labels = labels[:legend_rows - 1] + [f"and {more} more"]
    if handles:  # beside the stack, never over it
        ax.legend(handles, [_short(label, 40) for label in labels], loc="upper left",
                  bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)


def _draw_detail(ax: Axes, xs: list[int], series: dict[str, _Series], root: str, color: str,
                 title_chars: int) -> None:
    scale, unit = _unit(max(_largest(info) for info in series.values() if info["root"] == root))
    held = series[root]["figures"].get("held")
    if held is not None:
        ax.fill_between(xs, 0, [(v or 0) / scale for v in held], color=color, alpha=0.45,
                        linewidth=0)
    for name, _, values, style in _lines(series, root):
        ax.plot(xs, _values(values, scale), linestyle=style, color=color,
                linewidth=1.2 if name == root else 0.8)
    ax.set_title(_short(root, title_chars), fontsize=8)
    ax.set_ylabel(unit, fontsize=7)
    ax.set_ylim(bottom=0)
    ax.margins(x=0)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)


def _lines(series: dict[str, _Series],
           root: str) -> Iterator[tuple[str, str, list[float | None], Any]]:
    """(name, figure, values, line style) of every line drawn in ``root``'s band: its own
    used / peak / resident / cached figures, and what the subsystems within it hold and use."""
    for name, info in series.items():
        if info["root"] != root:
            continue
        held = info["figures"].get("held")
        for figure, values in info["figures"].items():
            if figure in _LINES and values == held:
                continue  # a line on the area's edge says nothing (a peak never above held)
            if figure in _LINES:
                yield name, figure, values, _LINES[figure]
            elif figure == "held" and name != root:
                yield name, figure, values, _WITHIN_STYLE


def _largest(info: _Series) -> float:
    """The largest byte figure of one subsystem (0 if none)."""
    return max((v for figure, values in info["figures"].items()
                if figure == "held" or figure in _LINES for v in values if v is not None), default=0)


def _mark_axis(ax: Axes, samples: list[dict[str, Any]], xs: list[int], width: int) -> None:
    """The marks as x ticks, their labels thinned to about one per 45 pixels."""
    fits = max(2, int(0.7 * width) // 45)  # the legend takes some of the width
    step = max(1, math.ceil(len(samples) / fits))
    labels = [_short(s["label"]) for s in samples[::step]]
    ax.set_xticks(xs[::step], labels, rotation=40, ha="right", fontsize=7)
    ax.set_xticks(xs, minor=True)
    ax.set_xlabel("marks, in the order they were made", fontsize=8)


def _short(text: str, limit: int = _MAX_LABEL) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\N{HORIZONTAL ELLIPSIS}"
