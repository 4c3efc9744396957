"""The shared look of the result figures, chosen to stay legible at the study's size (7 backbones × 23
representations): one colour and marker per representation that no other representation shares, points with interval
whiskers grouped by backbone (bars of 23 colours per group hide small differences), and one legend outside every axes
so that it never covers data. Also the intervals the summary tables do not store (Wilson, Student t)."""

from __future__ import annotations

import colorsys
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from scipy import stats  # noqa: E402

BASE = "base"
BASE_STYLE = ((0.0, 0.0, 0.0), "s")            # the reference: black squares in every figure
MARKERS = ("o", "^", "D", "v", "P", "X", "<", ">", "h", "p")
LIGHTNESS = (0.38, 0.62)                       # beyond tab10: each hue once dark, once light
SPAN = 0.84                                    # share of a group's unit width that its points use
SLOT_INCHES = 0.09                             # horizontal room per point, so 7 × 23 points stay apart
Z95 = stats.norm.ppf(0.975)

Style = Mapping[str, tuple[tuple[float, float, float], str]]


def order(names: Iterable[str]) -> list[str]:
    """base first (what every variant is compared with), then the variants alphabetically."""
    names = set(names)
    return ([BASE] if BASE in names else []) + sorted(names - {BASE})


def distinct_colours(n: int) -> list[tuple[float, float, float]]:
    """n pairwise distinct RGB colours: tab10 up to 10 (the qualitative set readers know); beyond, ⌈n/2⌉ evenly
    spaced hues, each once dark and once light, so that even 22 variants keep visibly different colours."""
    if n <= len(plt.get_cmap("tab10").colors):
        return [tuple(float(v) for v in c[:3]) for c in plt.get_cmap("tab10").colors[:n]]
    hues = -(-n // len(LIGHTNESS))
    return [colorsys.hls_to_rgb((i % hues) / hues, LIGHTNESS[i // hues], 0.8) for i in range(n)]


def styles(names: Iterable[str]) -> dict[str, tuple[tuple[float, float, float], str]]:
    """Colour and marker of each representation in `order`: base black squares, every variant its own colour, with
    markers cycling as a second cue where two colours are close."""
    names = order(names)
    variants = [n for n in names if n != BASE]
    out = {BASE: BASE_STYLE} if BASE in names else {}
    out.update({name: (colour, MARKERS[i % len(MARKERS)])
                for i, (name, colour) in enumerate(zip(variants, distinct_colours(len(variants))))})
    return out


def wilson_interval(share: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion from its value and count (the summary tables store no interval);
    it stays inside [0, 1] and is exact enough at the demo's few thousand trials as at THINGS' 4.7 M."""
    share, n = np.asarray(share, dtype=float), np.asarray(n, dtype=float)
    centre = (share + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * np.sqrt(share * (1 - share) / n + z ** 2 / (4 * n ** 2))
    return centre - half, centre + half


def t_interval(mean: np.ndarray, sem: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """mean ± t(level, n − 1) × SEM: the across-participant interval (docs/methods.md P-28), honest at few participants."""
    mean, sem, n = (np.asarray(a, dtype=float) for a in (mean, sem, n))
    half = stats.t.ppf(0.5 + level / 2, np.where(n > 1, n - 1, np.nan)) * sem
    return mean - half, mean + half


def panel_width(n_groups: int, n_members: int) -> float:
    """Width (inches) of an axes with n_groups × n_members points."""
    return max(5.0, 0.8 + SLOT_INCHES * n_groups * n_members)


def grouped_points(ax: Axes, frame: pd.DataFrame, groups: Sequence[str], style: Style) -> None:
    """One point per row of `frame` (columns group, member, value, low, high; optional bool `filled`), members side
    by side within their group in `style` order, whiskers from low to high (none where NaN) and a dotted line at the
    group's base value. A point is hollow where `filled` is False. Each member is one errorbar container labelled
    with its name; its filled points are the line with gid `filled:<member>`."""
    slots = list(style)
    step = SPAN / len(slots)
    centres = np.arange(len(groups), dtype=float)
    for member in [m for m in slots if m in set(frame["member"])]:
        rows = frame[frame["member"] == member].set_index("group").reindex(groups)
        colour, marker = style[member]
        x = centres - SPAN / 2 + (slots.index(member) + 0.5) * step
        y = rows["value"].to_numpy(dtype=float)
        yerr = np.vstack([y - rows["low"].to_numpy(dtype=float), rows["high"].to_numpy(dtype=float) - y])
        filled = rows["filled"].fillna(False).to_numpy(dtype=bool) if "filled" in rows else np.isfinite(y)
        ax.errorbar(x, y, yerr=yerr, fmt=marker, color=colour, mfc="white", ms=4, elinewidth=0.9, capsize=0,
                    label=member)
        ax.plot(x[filled], y[filled], marker, color=colour, ms=4, linestyle="none", zorder=2.2,  # over the hollow
                gid=f"filled:{member}")
    if BASE in set(frame["member"]):
        base = frame[frame["member"] == BASE].set_index("group")["value"].reindex(groups).to_numpy(dtype=float)
        ax.hlines(base, centres - SPAN / 2, centres + SPAN / 2, colors=[style[BASE][0]], linestyles=":",
                  linewidth=0.8, zorder=1.5, gid="base-level")
    for boundary in centres[:-1] + 0.5:
        ax.axvline(boundary, color="0.88", linewidth=0.8)
    ax.set_xticks(centres, groups)
    ax.set_xlim(-0.5, len(groups) - 0.5)


def style_handles(style: Style) -> list[Line2D]:
    """Legend entries, one per representation, in `style` order."""
    return [Line2D([], [], color=colour, marker=marker, linestyle="none", label=name)
            for name, (colour, marker) in style.items()]


def outside_legend(fig: Figure, handles: Sequence[Artist], title: str | None = None) -> Legend:
    """One legend to the right of every axes, clear of the title (constrained layout makes room for it), in columns
    of ≤ 25 entries."""
    return fig.legend(handles=list(handles), loc="outside right center", frameon=False, fontsize=8, title=title,
                      title_fontsize=8, ncols=max(1, -(-len(handles) // 25)))
