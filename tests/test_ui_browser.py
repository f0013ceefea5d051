"""`kedit ui` and `kedit report` in a real headless Chromium (Debian's package, driven by
Playwright): every page loads without a console error, nothing is requested from anywhere but
127.0.0.1 (the report: from nowhere), and the trend chart has one position per commit.

`make test` installs Chromium when it is missing and it can (root, apt); without it these tests
skip, saying so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from kedit.cli import cli
from kedit.repository import Repository
from kedit.ui.server import ViewServer
from tests.test_ui import history, server  # noqa: F401  (fixtures: a tiny history, its view on a free port)

CHROMIUM = os.environ.get("KEDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                                                       "'kedit[dev]')")
    if CHROMIUM is None:
        pytest.skip("no Chromium here (apt-get install chromium, or set KEDIT_CHROMIUM to its path)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


class Visit:
    """A browser tab that records console errors and every request that would leave 127.0.0.1
    (such a request is aborted, and fails the test)."""

    def __init__(self, browser: Any, allowed: set[str]) -> None:
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.allowed = allowed
        self.context = browser.new_context(viewport={"width": 1300, "height": 900})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _route(self, route: Any) -> None:
        url = urlsplit(route.request.url)
        if url.scheme in ("data", "blob", "about") or (url.scheme, url.hostname) in self.allowed:
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def open(self, url: str) -> Any:
        response = self.page.goto(url, wait_until="load")
        self.page.wait_for_load_state("networkidle")
        assert not self.errors, (url, self.errors)
        assert not self.outside, (url, self.outside)
        return response


@pytest.fixture
def visit(browser: Any) -> Iterator[Visit]:
    v = Visit(browser, {("http", "127.0.0.1")})
    yield v
    v.context.close()


def trend_points(page: Any, metric: str = "reliability") -> tuple[list[str], list[int], int]:
    """(trace names, x positions of each trace, markers drawn on `metric`'s line) of the trend chart."""
    page.wait_for_function("document.getElementById('trend') && document.getElementById('trend').data")
    names = page.evaluate("document.getElementById('trend').data.map(t => t.name)")
    lengths = page.evaluate("document.getElementById('trend').data.map(t => t.x.length)")
    shown = page.evaluate("document.getElementById('trend').data.filter(t => t.visible === true).map(t => t.name)")
    markers = page.locator("#trend .scatterlayer .trace").nth(shown.index(metric)).locator("path.point").count()
    return names, lengths, markers


def test_every_page_loads_clean_in_chromium(history: Path, server: ViewServer, visit: Visit) -> None:  # noqa: F811
    repo = Repository.open(history)
    commits = repo.log()
    for path in ["", "probes", "diff", *(f"commit/{c.id}" for c in commits)]:
        response = visit.open(server.url + path)
        assert response.status == 200, path
    visit.open(server.url + f"commit/{commits[-2].id}")  # the ROME edit: one rank-one delta
    assert visit.page.locator("table.tensors tr").count() == 1 + len(repo.changes(commits[-2].id)) == 2
    visit.open(server.url)
    assert visit.page.locator("#log tr.commit").count() == len(commits)
    visit.page.locator("#log a", has_text=commits[0].short).click()
    visit.page.wait_for_load_state("load")
    assert visit.page.url.endswith(f"/commit/{commits[0].id}") and not visit.errors


def test_trend_chart_has_one_point_per_commit(history: Path, server: ViewServer, visit: Visit) -> None:  # noqa: F811
    line = Repository.open(history).log()
    visit.open(server.url + "trends")
    names, lengths, markers = trend_points(visit.page)
    assert lengths == [len(line)] * len(names)  # every metric: one x position per commit, base included
    assert markers == sum(1 for c in line if c.kind != "init")  # a point at every edit; the base has no score
    assert visit.page.locator("#batch .scatterlayer .trace path.point").count() > 0  # the MEMIT batch's requests


def test_behaviour_diff_form(history: Path, server: ViewServer, visit: Visit) -> None:  # noqa: F811
    visit.open(server.url + "diff")
    visit.page.fill("input[name=a]", "HEAD~3")
    visit.page.fill("input[name=b]", "HEAD~2")
    visit.page.click("button[type=submit]")
    visit.page.wait_for_selector("#behaviour", timeout=120_000)
    assert visit.page.locator("#behaviour tr.changed").count() >= 1 and not visit.errors and not visit.outside
    summary = visit.page.locator("#behaviour-summary").inner_text()  # what kedit diff --behaviour prints last
    assert "continuations changed" in summary and "answers flipped; KL" in summary
    assert visit.page.locator("#behaviour tr.flipped").count() >= 1  # the edited fact's answer flipped
    assert visit.page.locator("#largest-shifts li").count() >= 1


def test_report_opens_from_a_file_and_fetches_nothing(history: Path, browser: Any, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["--repo", str(history), "report", "HEAD~3..HEAD", "--out", str(out)])
    assert result.exit_code == 0, result.output
    v = Visit(browser, {("file", None)})
    try:
        v.open(out.as_uri())
        names, lengths, markers = trend_points(v.page)
        assert lengths == [3] * len(names) and markers == 3
        assert v.page.locator("section[id^=commit-]").count() == 3
    finally:
        v.context.close()



def test_a_request_leaving_127_0_0_1_is_caught(browser: Any, server: ViewServer) -> None:  # noqa: F811
    """The guard is real: a page (without the view's Content-Security-Policy, which would block
    the request before it is made, with a console error) that asks another host is reported."""
    v = Visit(browser, {("http", "127.0.0.1")})
    try:
        v.page.set_content(f'<img src="{server.url}static/plotly.min.js"><img src="http://example.org/x.png">')
        v.page.wait_for_load_state("networkidle")
        assert v.outside == ["http://example.org/x.png"]
    finally:
        v.context.close()
