"""`kedit log --plot METRIC --out FILE`: one metric along the history, as a picture.

The file's suffix picks the format: .png, .svg or .pdf through matplotlib (no browser needed),
.html through plotly (plotly.js inlined). Batch edits' per-request scores are drawn as dots at
their commit beside the commit's own score.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from kedit.core.errors import KeditError
from kedit.core.store import atomic_write_bytes
from kedit.ui.views import Trend

IMAGE_SUFFIXES = (".png", ".svg", ".pdf")
SUFFIXES = (*IMAGE_SUFFIXES, ".html")


@dataclass(frozen=True)
class Plot:
    path: Path
    metric: str
    points: int  # commits with a score
    commits: int


def _values(trend: Trend, metric: str) -> list[float | None]:
    if metric not in trend.series and metric not in trend.per_request:
        known = ", ".join(sorted({*trend.series, *trend.per_request})) or "none (no commit here has scores)"
        raise KeditError(f"no metric {metric!r} in this history; it has: {known}")
    return trend.series.get(metric, [None] * len(trend.commits))


def _image(trend: Trend, metric: str, values: list[float | None], fmt: str) -> bytes:
    """The plot as png/svg/pdf bytes, drawn by matplotlib without a display."""
    try:
        import matplotlib
    except ImportError:
        raise KeditError("a .png/.svg/.pdf plot needs matplotlib; write .html instead, or install it",
                         hint="pip install 'kedit[ui]'") from None
    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(6.0, 0.35 * len(trend.commits)), 3.6), dpi=120)
    try:
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        if points:
            axes.plot([i for i, _ in points], [v for _, v in points], marker="o", label=metric)
        batch = trend.per_request.get(metric, [])
        if batch:
            axes.scatter([i for i, _, _ in batch], [v for _, _, v in batch], s=10, alpha=0.4, color="grey",
                         label=f"{metric}, each request of a batch")
        axes.set_xticks(range(len(trend.commits)), [c.short for c in trend.commits], rotation=60, fontsize=7)
        axes.set_xlim(-0.5, len(trend.commits) - 0.5)
        axes.set_xlabel("commit (oldest first)")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt)
        return buffer.getvalue()
    finally:
        plt.close(figure)


def plot_metric(trend: Trend, metric: str, out: Path) -> Plot:
    """Write `metric` along `trend`'s commits to `out` (its suffix picks the format)."""
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise KeditError(f"cannot plot to {out.name!r}: give a file ending in {', '.join(SUFFIXES)}")
    values = _values(trend, metric)
    if suffix == ".html":
        from kedit.ui import charts

        figure = charts.trend_figure(Trend(trend.commits, {metric: values}, {metric: trend.protocols.get(metric, "")},
                                           {}), shown=(metric,))
        import plotly.io as pio

        data = pio.to_html(figure, include_plotlyjs=True, full_html=True, config=charts.PLOT_CONFIG).encode("utf-8")
    else:
        data = _image(trend, metric, values, suffix.lstrip("."))
    atomic_write_bytes(out.resolve(), data, durable=False)
    return Plot(out.resolve(), metric, sum(v is not None for v in values), len(trend.commits))

