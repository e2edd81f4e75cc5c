"""`twophase lean serve`: a CPU machine with Lean checks the proofs of GPU jobs elsewhere.

It puts the `lean` reward's local REPL pool (trainers/infra/lean_repl.py) behind the Kimina Lean Server's
HTTP API (trainers/infra/lean_server.py), so a GRPO run anywhere points `reward_options.lean.server` at it.
Bound to 127.0.0.1 unless told otherwise; beyond this machine a key is required, which clients send as
a bearer token (TWOPHASE_LEAN_TOKEN). Each rejected request is one line on stderr.
"""

from __future__ import annotations

import os
import shlex

import click


@click.group("lean")
def lean_group():
    """Check Lean proofs for GRPO runs on other machines."""


@lean_group.command("serve")
@click.option("--project-dir", required=True, type=click.Path(file_okay=False), help="A Lake project with Mathlib and the REPL built.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface; needs a key).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--workers", default=8, show_default=True, type=click.IntRange(min=1), help="REPL processes: proofs checked at once.")
@click.option("--token", default=None, help="The key clients must send [default: $TWOPHASE_LEAN_TOKEN].")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1), help="Longest check a request may ask for, in seconds.")
@click.option("--import-timeout", default=600.0, show_default=True, type=float, help="Seconds a REPL may take to import a header.")
@click.option("--max-request-bytes", default=4 << 20, show_default=True, type=click.IntRange(min=1), help="Larger requests are refused.")
@click.option("--max-snippets", default=256, show_default=True, type=click.IntRange(min=1), help="More proofs in one request are refused.")
@click.option("--command", "repl_command", default=None, help="The REPL command [default: lake exe repl].")
@click.option("--url-file", default=None, type=click.Path(dir_okay=False),
              help="Write the URL and key here (readable by you only): a reward's `server` may name this file.")
@click.option("--warm/--no-warm", default=True, show_default=True,
              help="Import the Lean Workbook header (Mathlib) in every REPL before serving.")
def serve_command(project_dir, host, port, workers, token, timeout, import_timeout, max_request_bytes, max_snippets,
                  repl_command, url_file, warm):  # fmt: skip
    """Serve the local REPL pool over the Kimina Lean Server API (POST /api/check, /verify; GET /health).

    Example: twophase lean serve --project-dir ~/lean/mathlib-repl --workers 16
    """
    from twophase.trainers.infra.lean_repl import LeanReplPool
    from twophase.trainers.infra.lean_server import LeanCheckServer, check_key, token_from_environment

    token = token or token_from_environment()
    check_key(host, token)  # before the REPLs start
    command = shlex.split(repl_command) if repl_command else None
    with LeanReplPool(project_dir, size=workers, timeout=timeout, command=command, import_timeout=import_timeout) as pool:
        server = LeanCheckServer(pool, host, port, token, max_request_bytes, max_snippets, timeout,
                                 log=lambda line: click.echo(line, err=True))  # fmt: skip
        try:
            if warm:
                _warm(pool, project_dir)
            if url_file:  # written once the server can answer: a client waiting for the file finds it ready
                server.write_url_file(url_file)
            click.echo(f"lean serve: {server.url} ({workers} REPLs, {pool.version}); GET /health, POST /api/check", err=True)
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from scancel: a server has nothing to resume
            click.echo("lean serve: stopped", err=True)
        finally:
            server.server_close()
            if url_file and os.path.exists(url_file):
                os.remove(url_file)  # a stale file would send the next run's client to a dead server


def _warm(pool, project_dir) -> None:
    from twophase.data.base.errors import UserError
    from twophase.data.lean_workbook import DEFAULT_HEADER
    from twophase.trainers.infra.lean_repl import ReplError, split_imports

    imports = split_imports(DEFAULT_HEADER)[0]
    try:
        pool.warm(imports)
    except ReplError as err:
        raise UserError(f"lean serve: {project_dir} cannot import {imports!r} ({err}); is Mathlib built there?") from None
