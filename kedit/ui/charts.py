"""The charts of the web view and the report, drawn by plotly (no hand-written charting).

Each chart is a plotly figure turned into a `<div>` and a call to `Plotly.newPlot`; the page
loads plotly.js itself, from the copy inside the installed plotly package (`plotly_js`), never
from a CDN. The x axis of a trend has one position per commit, in history order.
"""

from __future__ import annotations

import functools
from typing import Any

from kedit.core.errors import KeditError
from kedit.ui.views import FEATURED, Trend

PLOT_CONFIG = {"displaylogo": False, "responsive": True}  # no link out to plotly's site
TREND_DIV = "trend"  # the element ids tests and readers can find the charts by
BATCH_DIV = "batch"
REQUESTS_DIV = "requests"


def _plotly() -> Any:
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise KeditError("the charts need plotly", hint="pip install 'kedit[ui]'") from None
    return go


@functools.cache
def plotly_js() -> str:
    """plotly.min.js as the installed plotly package ships it."""
    _plotly()
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def chart_html(figure: Any, div_id: str) -> str:
    """The figure as a `<div>` and its script (plotly.js must already be on the page)."""
    import plotly.io as pio

    return pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOT_CONFIG)


SCORE_AXIS = {"title": {"text": "score"}, "range": [-0.05, 1.05]}  # fractions: the same scale on every chart
FLUENCY_AXIS = {"title": {"text": "fluency (n-gram entropy, bits)"}, "overlaying": "y", "side": "right",
                "showgrid": False}


def _axis(trend: Trend) -> dict[str, Any]:
    """Commits as ticks: their short ids, in history order, every commit in view (charts align)."""
    return {"tickmode": "array", "tickvals": list(range(len(trend.commits))), "range": [-0.5, len(trend.commits) - 0.5],
            "ticktext": [c.short for c in trend.commits], "title": {"text": "commit (oldest first)"}}


def _on_fluency_axis(name: str) -> bool:
    """Fluency is an entropy in bits (about 4 to 6), not a fraction: it gets its own axis on the right."""
    return name.startswith("fluency")


def trend_figure(trend: Trend, shown: tuple[str, ...] = FEATURED) -> Any:
    """One line per metric, one x position per commit (a gap where a commit has no score); the
    metrics not `shown` start greyed out in the legend."""
    go = _plotly()
    figure = go.Figure()
    x = list(range(len(trend.commits)))
    hover = [f"{c.short} {c.method or c.kind}: {c.message}" for c in trend.commits]
    for name in trend.names():
        figure.add_trace(go.Scatter(
            x=x, y=trend.series[name], name=name, mode="lines+markers", text=hover, connectgaps=True,
            hovertemplate=f"{name}=%{{y:.3f}}<br>%{{text}}<extra>{trend.protocols[name]}</extra>",
            visible=True if name in shown else "legendonly", yaxis="y2" if _on_fluency_axis(name) else "y"))
    layout: dict[str, Any] = {"yaxis2": FLUENCY_AXIS} if any(map(_on_fluency_axis, trend.series)) else {}
    figure.update_layout(title="Metrics along the history", xaxis=_axis(trend), yaxis=SCORE_AXIS, height=420,
                         margin={"t": 50, "b": 40}, legend={"orientation": "h", "y": -0.25}, **layout)
    return figure


def batch_figure(trend: Trend) -> Any | None:
    """Batch edits' per-request scores: one dot per request at its commit (None without batches)."""
    if not trend.per_request:
        return None
    go = _plotly()
    figure = go.Figure()
    for name in sorted(trend.per_request, key=lambda s: (s not in FEATURED, s)):
        points = trend.per_request[name]
        figure.add_trace(go.Scatter(
            x=[i for i, _, _ in points], y=[v for _, _, v in points], name=name, mode="markers",
            text=[f"{trend.commits[i].short} request {r}" for i, r, _ in points],
            hovertemplate=f"{name}=%{{y:.3f}}<br>%{{text}}<extra></extra>",
            visible=True if name in FEATURED else "legendonly"))
    figure.update_layout(title="Batch edits: each request's scores", xaxis=_axis(trend), yaxis=SCORE_AXIS,
                         height=380, margin={"t": 50, "b": 40})
    return figure


def requests_figure(per_request: dict[int, list[Any]]) -> Any | None:
    """One commit's per-request scores as grouped bars (None for a commit of one request)."""
    if not per_request:
        return None
    go = _plotly()
    names = sorted({m.name for scores in per_request.values() for m in scores if m.stage in ("post", "eval")},
                   key=lambda s: (s not in FEATURED, s))
    figure = go.Figure()
    for name in names:
        values = {r: next((m.value for m in scores if m.name == name and m.stage in ("post", "eval")), None)
                  for r, scores in per_request.items()}
        figure.add_trace(go.Bar(x=[f"request {r}" for r in values], y=list(values.values()), name=name,
                                visible=True if name in FEATURED else "legendonly"))
    figure.update_layout(title="Scores per request", barmode="group", height=360, margin={"t": 50, "b": 40})
    return figure
