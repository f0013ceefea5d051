"""kedit ui / kedit report / kedit log --plot on a tiny model's history: the view models, the
HTTP server (read-only, loopback only), the self-contained report, the plots, and the pages in a
real headless Chromium (tests/test_ui_browser.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import markupsafe
import pytest
from click.testing import CliRunner

from kedit.cli import cli
from kedit.repository import Repository
from kedit.ui import views
from kedit.ui.server import ViewServer, check_host, is_loopback, make_server
from tests.test_cli_edit import EDIT, PROMPT
from tests.test_cli_mass_edit import FACTS, TINY
from tests.tiny import make_model, make_tokenizer


def run(root: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["--repo", str(root), *args])
    assert result.exit_code == code, (args, result.stdout, result.stderr)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model's history: base, a ROME edit, a MEMIT batch of 4 facts, a GRACE edit (an
    adapter), probes, and the outputs a generation check kept at HEAD and its parent."""
    where = tmp_path_factory.mktemp("ui-history")
    folder = where / "model"
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (where / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    root = where / "work"
    run(root, "init", str(folder))
    run(root, "probe", "add", "--prompt", PROMPT, "--answer", "Paris", "--kind", "locality",
        "--prompt", "Berlin is the capital of", "--answer", "Germany")
    run(root, *EDIT, "--set", "mom2_adjustment=false", "-m", "France -> Japan")
    run(root, "edit", "--method", "memit", "--requests", str(where / "facts.jsonl"), *TINY,
        "--set", "mom2_adjustment=false", "--set", "mom2_update_weight=0.05")
    run(root, "edit", "--method", "grace", "--prompt", "Madrid makes the Apple", "--subject", "Apple",
        "--target", "capital", "-m", "a codebook entry")
    run(root, "check", "--protocol", "generation", "--threshold", "1.0")
    return root


@pytest.fixture
def server(history: Path) -> Iterator[ViewServer]:
    """The view of `history` served on a free port of 127.0.0.1 while the test runs."""
    srv = make_server(history, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def get(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode("utf-8"), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8"), dict(e.headers)


# -- what the pages show ----------------------------------------------------------------------


def test_trend_has_one_position_per_commit_and_batch_scores(history: Path) -> None:
    repo = Repository.open(history)
    line = views.first_parent_line(repo)
    trend = views.trend_of(line)
    assert line[0].kind == "init" and len(line) == 4
    assert all(len(values) == len(line) for values in trend.series.values())
    assert trend.series["reliability"][0] is None  # the base has no scores: a gap, not a shift
    assert trend.series["reliability"][1] == 1.0  # the ROME edit's own score
    memit = [i for i, c in enumerate(line) if c.method == "memit"]
    assert {r for i, r, _ in trend.per_request["reliability"] if i in memit} == set(range(len(FACTS)))


def test_commit_page_has_tensors_adapters_metrics_and_kept_checks(history: Path) -> None:
    repo = Repository.open(history)
    rome = views.commit_page(repo, "HEAD~2")
    assert rome.commit.method == "rome" and rome.requests[0]["shown_prompt"] == PROMPT
    assert len(rome.tensors) == 1 and rome.tensors[0].encoding == "lowrank" and rome.tensors[0].rank == 1
    assert {m.name for m in rome.metrics} >= {"reliability", "gen_efficacy"}
    memit = views.commit_page(repo, "HEAD~1")
    assert sorted(memit.per_request) == list(range(len(FACTS)))
    grace = views.commit_page(repo, "HEAD")
    (adapter,) = grace.adapters
    assert adapter.op == "add" and adapter.entries[0]["prompt"].startswith("Madrid makes the")
    checks = {r.probe.prompt: r for r in grace.checks}
    assert set(checks) >= {PROMPT, "Berlin is the capital of", "Madrid makes the Apple"}  # locality and edit probes
    assert checks["Berlin is the capital of"].parent is not None  # the check also kept the parent's outputs
    assert all(isinstance(r.output, str) for r in grace.checks)  # generation: the continuation itself


def test_kept_checks_fall_where_kedit_check_says_they_broke(history: Path) -> None:
    repo = Repository.open(history)
    report = repo.check("HEAD", protocol="generation")  # from the outputs the fixture's check kept
    rows = views.check_rows(repo, repo.get_commit(repo.head()))
    assert {r.probe.id for r in rows if r.fell} == {r.probe.id for r in report.broken}
    assert {r.probe.id: r.now for r in rows} == {r.probe.id: r.now for r in report.results}


# -- the server -------------------------------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("[::1]", True), ("0.0.0.0", False), ("192.168.1.5", False),
                                            ("example.org", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_ui_refuses_another_host_without_allow_remote(history: Path) -> None:
    out = run(history, "ui", "--host", "0.0.0.0", "--port", "0", code=1)
    assert out.strip().count("\n") == 0 and "--allow-remote" in out
    out = run(history, "ui", "--allow-remote", "--port", "0", code=1)
    assert "name the address" in out
    assert check_host("0.0.0.0", allow_remote=True) == "0.0.0.0"


def test_ui_on_a_port_in_use_says_so_in_one_line(history: Path, server: ViewServer) -> None:
    out = run(history, "ui", "--port", str(server.server_address[1]), code=1)
    assert out.strip().count("\n") == 0 and "in use" in out and "--port 0" in out


def test_every_page_is_served_and_nothing_written(history: Path, server: ViewServer) -> None:
    db = history / ".kedit" / "kedit.db"
    before = db.stat().st_mtime_ns
    repo = Repository.open(history)
    pages = ["", "trends", "probes", "diff", *(f"commit/{c.id}" for c in repo.log())]
    for page in pages:
        status, body, headers = get(server.url + page)
        assert status == 200, (page, body[:300])
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert "https://" not in body.split("<main>")[0]  # the head loads nothing from elsewhere
    status, body, _ = get(server.url + "commit/HEAD~1")
    assert status == 200 and "(+3 more)" in body and "request 3" in body
    status, body, _ = get(server.url + "static/plotly.min.js")
    assert status == 200 and len(body) > 1_000_000
    assert db.stat().st_mtime_ns == before


def test_server_is_read_only_and_refuses_other_host_names(server: ViewServer) -> None:
    assert get(server.url, method="POST")[0] == 405
    assert get(server.url, method="DELETE")[0] == 405
    assert get(server.url, headers={"Host": "attacker.example:80"})[0] == 403  # a rebound DNS name
    status, body, _ = get(server.url + "commit/nosuchrev")
    assert status == 404 and "nosuchrev" in body
    assert get(server.url + "no/such/page")[0] == 404


def test_behaviour_diff_page(server: ViewServer) -> None:
    status, body, _ = get(server.url + "diff?a=HEAD&b=HEAD&kl=1")
    suite = len({(p.prompt, p.answer) for p in views.probe_suite(Repository.open(server.repo_path))})
    assert status == 200 and f"0 of {suite} continuations changed, 0 answers flipped; KL 0 nats/token" in body
    status, body, _ = get(server.url + "diff?a=HEAD&b=nosuchrev")
    assert status == 200 and "nosuchrev" in body and 'class="error"' in body
    status, body, _ = get(server.url + "diff?a=HEAD&b=HEAD&kl=many")
    assert status == 200 and "reference texts: a number" in body and 'id="behaviour"' not in body


def test_behaviour_page_shows_what_kedit_diff_behaviour_prints(server: ViewServer) -> None:
    """The same comparison: continuations, answer probabilities and their shifts, flips, KL, summary."""
    prompts = [f"{PROMPT}=>Japan", "Berlin is the capital of=>Germany"]
    cli_doc = json.loads(run(server.repo_path, "diff", "--behaviour", "HEAD~3", "HEAD~2", "--json",
                             "--reference-texts", "2", *(x for p in prompts for x in ("--prompt", p)), code=1))
    query = urllib.parse.urlencode({"a": "HEAD~3", "b": "HEAD~2", "kl": "2", "prompts": "\n".join(prompts)})
    status, body, _ = get(server.url + "diff?" + query)
    s = cli_doc["summary"]
    assert status == 200 and s["changed"] >= 1 and s["flipped"] >= 1 and s["kl"] > 0
    assert (f"{s['changed']} of {s['prompts']} continuations changed, {s['flipped']} answers flipped; "
            f"KL {s['kl']:.4g} nats/token over {cli_doc['kl_tokens']} reference tokens") in body
    for p in cli_doc["prompts"]:
        assert str(markupsafe.escape(p["after"])) in body
        assert f"{p['p_before']:.3f} → {p['p_after']:.3f} ({p['p_after'] - p['p_before']:+.3f})" in body
    assert body.count('class="changed flipped"') == s["flipped"] and 'id="largest-shifts"' in body


def ui_json(root: Path, check: Callable[[dict], None]) -> dict:
    """Run `kedit ui --port 0 --json` in a process of its own, read the JSON document it prints
    once it listens, call `check(document)` while it serves, then stop it."""
    proc = subprocess.Popen([sys.executable, "-m", "kedit.cli", "--repo", str(root), "ui", "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        while not lines or lines[-1] != "}\n":
            lines.append(proc.stdout.readline())  # type: ignore[union-attr]
            assert lines[-1], proc.stderr.read()  # type: ignore[union-attr]
        document = json.loads("".join(lines))
        check(document)
        return document
    finally:
        proc.terminate()
        proc.wait(30)


def test_ui_json_prints_the_url_first(history: Path) -> None:
    def serves(doc: dict) -> None:
        assert doc["kedit_json"] == 1 and doc["host"] == "127.0.0.1" and doc["url"].endswith(f":{doc['port']}/")
        status, body, _ = get(doc["url"])
        assert status == 200 and "France -&gt; Japan" in body

    ui_json(history, serves)


# -- report and plots -------------------------------------------------------------------------


def test_report_is_one_self_contained_file(history: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    doc = json.loads(run(history, "report", "HEAD~3..HEAD", "--out", str(out), "--json", "-q"))
    assert doc["path"] == str(out) and len(doc["commits"]) == 3 and doc["bytes"] == out.stat().st_size
    html = out.read_text()
    assert "<script src=" not in html and "<link rel=\"stylesheet\"" not in html
    assert html.count('<section id="commit-') == 3 and "Plotly.newPlot" in html
    assert "(+3 more)" in html and "a codebook entry" in html and "France -&gt; Japan" in html
    run(history, "report", "nosuchrev..HEAD", "--out", str(out), code=1)


def test_log_plot_writes_png_svg_and_html(history: Path, tmp_path: Path) -> None:
    run(history, "log", "--plot", "reliability", "--out", str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run(history, "log", "--plot", "reliability", "--out", str(tmp_path / "t.svg"))
    assert b"<svg" in (tmp_path / "t.svg").read_bytes()[:500]
    run(history, "log", "--plot", "gen_efficacy", "--out", str(tmp_path / "t.html"))
    assert "Plotly.newPlot" in (tmp_path / "t.html").read_text()
    plotted = json.loads(run(history, "log", "HEAD~2..HEAD", "--plot", "reliability", "--out", str(tmp_path / "r.png"),
                             "--json", "-q"))
    assert [c["short"] for c in plotted["commits"]] == [c.short for c in Repository.open(history).log()[:2]]
    out = run(history, "log", "--plot", "nonsense", "--out", str(tmp_path / "x.png"), code=1)
    assert "reliability" in out and out.strip().count("\n") == 0
    assert "go together" in run(history, "log", "--plot", "reliability", code=1)
    assert ".png" in run(history, "log", "--plot", "reliability", "--out", str(tmp_path / "t.jpg"), code=1)

