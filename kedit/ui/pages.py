"""HTML for the web view and the report, from Jinja2 templates (`kedit/ui/templates/`) that
escape every value: prompts, messages and targets are user text.

A `Pages` renders for one of two homes: the server (pages link to each other, plotly.js is
fetched from the server's `/static/`) or the report (one file: commits link to their section,
plotly.js is inlined).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kedit
from kedit.core.repo import Repository
from kedit.eval.probes import list_probes
from kedit.ui import charts, views

if TYPE_CHECKING:
    from kedit.eval.behaviour import BehaviourDiff

TEMPLATES = Path(__file__).parent / "templates"
PLOTLY_PATH = "/static/plotly.min.js"
LOG_COLUMNS = ("efficacy", "gen_efficacy", "reliability", "locality", "neighbourhood", "fluency")


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _entry_keys(entries: list[dict[str, Any]]) -> list[str]:
    """The columns of an adapter's entries: prompt and target first, then the rest as they come."""
    keys = list(dict.fromkeys(k for e in entries for k in e))
    return sorted(keys, key=lambda k: (k not in ("prompt", "target"), k != "prompt"))


def _environment() -> Any:
    try:
        import jinja2
    except ImportError:
        from kedit.core.errors import KeditError

        raise KeditError("the web view needs jinja2", hint="pip install 'kedit[ui]'") from None
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, bytes=_bytes, entry_keys=_entry_keys)
    return env


def _columns(rows: list[views.LogRow]) -> list[str]:
    """The log's metric columns: those of LOG_COLUMNS some commit has."""
    present = {name for row in rows for name in row.metrics}
    return [c for c in LOG_COLUMNS if c in present]


class Pages:
    """Renders every page of one repository, for the server (`server=True`) or the report."""

    def __init__(self, repo: Repository, *, server: bool) -> None:
        self.repo, self.server = repo, server
        self.env = _environment()
        self.link: Callable[[str], str] = (lambda cid: f"/commit/{cid}") if server else (lambda cid: f"#commit-{cid}")
        script = (f'<script src="{PLOTLY_PATH}"></script>' if server
                  else "<script>" + charts.plotly_js().replace("</script", "<\\/script") + "</script>")
        self.common = {"server": server, "repo_name": repo.root.name, "script_tag": script, "link": self.link}

    def _render(self, template: str, title: str, **values: Any) -> str:
        return self.env.get_template(template).render(title=title, **self.common, **values)

    def log(self, limit: int | None = None) -> str:
        rows = views.log_rows(self.repo, limit)
        return self._render("log.html", "log", rows=rows, columns=_columns(rows),
                            count=sum(1 for r in rows if r.commit))

    def commit(self, rev: str) -> str:
        page = views.commit_page(self.repo, rev)
        return self._render("commit.html", page.commit.short, page=page, requests_chart=self._requests_chart(page))

    def _requests_chart(self, page: views.CommitPage) -> str:
        figure = charts.requests_figure(page.per_request)
        return charts.chart_html(figure, f"{charts.REQUESTS_DIV}-{page.commit.short}") if figure else ""

    def _trend_charts(self, trend: views.Trend) -> dict[str, str]:
        batch = charts.batch_figure(trend)
        return {"trend_chart": charts.chart_html(charts.trend_figure(trend), charts.TREND_DIV),
                "batch_chart": charts.chart_html(batch, charts.BATCH_DIV) if batch else ""}

    def trends(self, rev: str = "HEAD") -> str:
        trend = views.trend_of(views.first_parent_line(self.repo, rev))
        return self._render("trends.html", "trends", rev=rev, count=len(trend.commits), **self._trend_charts(trend))

    def diff(self, a: str, b: str, prompts: str, kl: str, result: BehaviourDiff | None, error: str | None) -> str:
        """The behaviour page: the form, and the comparison `kedit diff --behaviour` prints, when there is one."""
        revs = [*self.repo.refs.branches(), *self.repo.refs.tags(), *(c.short for c in self.repo.log("HEAD", 50))]
        suite = len({(p.prompt, p.answer) for p in list_probes(self.repo)})
        return self._render("diff.html", "behaviour diff", a=a, b=b, prompts=prompts, kl=kl, diff=result,
                            error=error, revs=revs, suite_size=suite)

    def probes(self) -> str:
        return self._render("probes.html", "probes", probes=views.probe_suite(self.repo))

    def error(self, status: str, message: str) -> str:
        return self._render("error.html", status, status=status, message=message)

    def report(self, spec: str, commits: list[Any], diff: BehaviourDiff | None = None) -> str:
        """`commits` oldest first; the log lists them newest first, every commit gets its section."""
        refs = views.decorations(self.repo)
        rows = [views.LogRow("*", c, refs.get(c.id, [])) for c in reversed(commits)]
        pages = [views.commit_page(self.repo, c.id) for c in reversed(commits)]
        return self._render("report.html", f"report {spec}", spec=spec, rows=rows, columns=_columns(rows),
                            commits=[(p, self._requests_chart(p)) for p in pages], diff=diff,
                            probes=views.probe_suite(self.repo), version=kedit.__version__,
                            written=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                            **self._trend_charts(views.trend_of(commits)))
