"""Commands that show the history for people to look at: ui (a local web view), report (the
same view as one HTML file). `kedit log --plot` draws through the same library (kedit/ui/)."""

from __future__ import annotations

from pathlib import Path

import click

from kedit.cli.common import command, json_option, open_repo, say
from kedit.cli.jsonout import emit_json
from kedit.core.errors import KeditError


@command()
@click.option("--port", type=click.IntRange(0, 65535), default=8642, show_default=True,
              help="The port (0: any free one).")
@click.option("--host", default=None, help="The address to bind (default 127.0.0.1; another needs --allow-remote).")
@click.option("--allow-remote", is_flag=True,
              help="Allow --host to be an address other machines reach (the view asks for no login).")
@json_option
@click.pass_context
def ui(ctx: click.Context, port: int, host: str | None, allow_remote: bool, as_json: bool) -> None:
    """Serve a read-only web view of the repository on 127.0.0.1 until interrupted: the log as
    a graph, each commit, metric trends, the behavioural diff of two revisions, the probe suite.

    With --json, the address is printed as one JSON document once the server listens.

    \b
    Example:
        kedit ui                        # then open http://127.0.0.1:8642/
        kedit ui --port 0 --json        # any free port; the URL on stdout
    """
    from kedit.ui.server import DEFAULT_HOST, make_server

    if allow_remote and host is None:
        raise KeditError("--allow-remote is for a --host other than 127.0.0.1: name the address too")
    root = open_repo(ctx).root
    try:
        server = make_server(root, host or DEFAULT_HOST, port, allow_remote=allow_remote)
    except OSError as e:
        raise KeditError(f"cannot serve on {host or DEFAULT_HOST} port {port}: {e.strerror or e}",
                         hint="--port 0 takes a free port") from e
    if as_json:
        emit_json(url=server.url, host=server.server_address[0], port=server.server_address[1])
    else:
        click.echo(server.url)
    say(ctx, "kedit ui: serving read-only; Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say(ctx, "kedit ui: stopped")
    finally:
        server.server_close()


@command()
@click.argument("spec", metavar="REV..REV", default="HEAD")
@click.option("--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The HTML file to write.")
@click.option("--behaviour", is_flag=True,
              help="Also the behavioural diff between the range's ends on the probe suite (loads both models).")
@json_option
@click.pass_context
def report(ctx: click.Context, spec: str, out: Path, behaviour: bool, as_json: bool) -> None:
    """Write the web view of the commits REV..REV names (default: HEAD's history) as one
    self-contained HTML file: log, metric trends, every commit, the probe suite.

    \b
    Example:
        kedit report v1..main --out report.html
        kedit report main~5..main --out report.html --behaviour
    """
    from kedit.ui.report import write_report

    result = write_report(open_repo(ctx), spec, out, behaviour=behaviour)
    if as_json:
        emit_json(path=str(result.path), commits=result.commits, bytes=result.bytes,
                  behaviour_changed=result.behaviour_changed)
        return
    changed = "" if result.behaviour_changed is None else f", {result.behaviour_changed} prompts continue differently"
    click.echo(f"wrote {result.path} ({len(result.commits)} commits{changed})")
