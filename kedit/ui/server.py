"""`kedit ui`: a read-only view of a repository, served on 127.0.0.1 by the standard library's
`ThreadingHTTPServer`.

Calling sequence:
    server = make_server(repo_path, host="127.0.0.1", port=0)   # port 0: a free one
    server.url; server.serve_forever(); ... server.shutdown(); server.server_close()

Read-only: only GET and HEAD are answered (other methods get 405) and no page writes the
repository; each request opens the repository afresh, so the view follows commits made while it
runs. It binds to a loopback address unless `allow_remote` (no login is asked for, so anyone who
can reach the port can read the history). Bound locally, a request whose Host header is not a
loopback name is refused (403): a web page cannot reach the view by rebinding a DNS name to
127.0.0.1. Every page forbids loading anything from another origin (Content-Security-Policy).

Caveats: a behavioural diff loads two models; one runs at a time, other pages are served meanwhile.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from kedit.core.errors import KeditError, RevisionError
from kedit.ui import charts
from kedit.ui.pages import PLOTLY_PATH, Pages

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8642
MAX_REFERENCE_TEXTS = 64  # the behaviour page's KL divergence: texts the base writes first
LOOPBACK_NAMES = ("localhost",)
SECURITY_HEADERS = {
    # plotly.js builds some functions at run time ('unsafe-eval'); everything comes from this server
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, *, allow_remote: bool) -> str:
    """The address to bind: a loopback one, or any other only when asked for explicitly."""
    if not is_loopback(host) and not allow_remote:
        raise KeditError(f"kedit ui serves the history without a login, so it binds to 127.0.0.1; "
                         f"to serve it on {host} anyway, add --allow-remote")
    return host


class ViewServer(ThreadingHTTPServer):
    """The HTTP server of one repository's view."""

    daemon_threads = True  # a page being rendered does not keep `kedit ui` from exiting

    def __init__(self, address: tuple[str, int], repo_path: Path, *, allow_remote: bool = False) -> None:
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.repo_path = repo_path
        self.local_only = is_loopback(address[0]) and not allow_remote
        self.diff_lock = threading.Lock()  # one behavioural diff (two models in memory) at a time

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in str(host) else host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    server_version = "kedit-ui"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   head=False, extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def _answer(self, *, head: bool) -> None:
        host = self.headers.get("Host", "")
        if self.server.local_only and not is_loopback(host.rsplit(":", 1)[0] if not host.endswith("]") else host):
            self._send(HTTPStatus.FORBIDDEN, b"this view answers only to a loopback host name\n",
                       "text/plain; charset=utf-8", head=head)
            return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if url.path == PLOTLY_PATH:
            self._send(HTTPStatus.OK, charts.plotly_js().encode("utf-8"), "text/javascript; charset=utf-8", head=head)
            return
        from kedit.repository import Repository

        try:
            repo = Repository.open(self.server.repo_path)
            try:
                status, body = self._page(Pages(repo, server=True), url.path, query)
            finally:
                repo.close()
        except Exception as e:  # the page fails, the server goes on; the log has the traceback
            log.exception("%s failed", self.path)
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, f"kedit ui: {type(e).__name__}: {e}\n"
            self._send(status, body.encode("utf-8"), "text/plain; charset=utf-8", head=head)
            return
        self._send(status, body.encode("utf-8"), "text/html; charset=utf-8", head=head)

    def _page(self, pages: Pages, path: str, query: dict[str, str]) -> tuple[HTTPStatus, str]:
        try:
            if path == "/":
                return HTTPStatus.OK, pages.log()
            if path.startswith("/commit/"):
                return HTTPStatus.OK, pages.commit(unquote(path.removeprefix("/commit/")))
            if path == "/trends":
                return HTTPStatus.OK, pages.trends(query.get("rev") or "HEAD")
            if path == "/diff":
                return HTTPStatus.OK, self._diff(pages, query)
            if path == "/probes":
                return HTTPStatus.OK, pages.probes()
        except RevisionError as e:
            return HTTPStatus.NOT_FOUND, pages.error("Not found", str(e))
        except KeditError as e:
            return HTTPStatus.BAD_REQUEST, pages.error("Cannot show this", str(e))
        return HTTPStatus.NOT_FOUND, pages.error("Not found", f"no page at {path}")

    def _diff(self, pages: Pages, query: dict[str, str]) -> str:
        from kedit.eval.behaviour import REFERENCE_TEXTS, compare, watched_prompts

        a, b, text = query.get("a", "").strip(), query.get("b", "").strip(), query.get("prompts", "")
        kl = query.get("kl", "").strip()
        if not (a and b):
            return pages.diff(a, b, text, kl, None, "Give both revisions." if a or b else None)
        if kl and not (kl.isdigit() and int(kl) <= MAX_REFERENCE_TEXTS):
            return pages.diff(a, b, text, kl, None, f"reference texts: a number from 0 to {MAX_REFERENCE_TEXTS}")
        repo = pages.repo
        try:
            with self.server.diff_lock:
                result = compare(repo, repo.load, a, b, watched_prompts(repo, prompts=text.splitlines()),  # type: ignore[attr-defined]
                                 n_reference=int(kl) if kl else REFERENCE_TEXTS)
        except KeditError as e:
            return pages.diff(a, b, text, kl, None, str(e) + (f" (hint: {e.hint})" if e.hint else ""))
        return pages.diff(a, b, text, kl, result, None)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**SECURITY_HEADERS, "Content-Type": content_type, "Content-Length": str(len(body)),
                            **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def make_server(repo_path: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                allow_remote: bool = False) -> ViewServer:
    """A server of the repository at `repo_path` (its `.kedit` folder), bound and ready to serve."""
    return ViewServer((check_host(host, allow_remote=allow_remote), port), repo_path, allow_remote=allow_remote)
