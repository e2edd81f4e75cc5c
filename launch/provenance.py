"""Provenance of standalone runs: `twophase dpo`, `grpo` and `eval` write OUT_DIR/manifest.json as pipeline stages do.

The manifest (launch/manifest.py) holds the resolved config, the git commit and whether
the tree was dirty, package versions, the command line, the seed, host, times and how
the run ended. It is written when the run ends (done, interrupted or failed), and only
if the run got as far as writing in OUT_DIR (it created or rewrote its `marker` file): a config refused before anything is written leaves the directory untouched,
and a run refused because another one holds the directory does not touch that one's manifest.
"""

from __future__ import annotations

import functools
import traceback
from contextlib import contextmanager
from pathlib import Path

import click

from twophase.data.base.errors import reason_of
from twophase.launch.manifest import finish, read_manifest, redacted, start_manifest, write_manifest


@contextmanager
def recorded_run(name: str, out_dir, config: dict, seed: int | None, marker: str):
    """Write OUT_DIR/manifest.json when the block ends; yields a dict to fill with the run's outputs."""
    out_dir = Path(out_dir)
    manifest = start_manifest(name, redacted(config), seed, [], read_manifest(out_dir))
    before, outputs = _modified(out_dir / marker), {}
    try:
        yield outputs
    except KeyboardInterrupt:
        _write_if_started(out_dir, marker, before, finish(manifest, "interrupted", reason="interrupted (Ctrl-C or SIGTERM)"))
        raise
    except Exception as err:
        failed = finish(manifest, "failed", reason=reason_of(err), traceback=traceback.format_exc())
        _write_if_started(out_dir, marker, before, failed)
        raise
    _write_if_started(out_dir, marker, before, finish(manifest, "done", outputs=outputs))


def _modified(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _write_if_started(out_dir: Path, marker: str, before: int | None, manifest: dict) -> None:
    """Write the manifest if this run wrote its marker (created or rewrote it): the run got as far as OUT_DIR."""
    now = _modified(out_dir / marker)
    if now is not None and now != before:
        write_manifest(out_dir, manifest)


def recorded_eval_command() -> click.Command:
    """`twophase eval` with its manifest: the command of eval/cli.py (which never imports launch/), wrapped here."""
    from twophase.eval.cli import eval_command

    run = eval_command.callback

    @functools.wraps(run)
    def callback(**arguments):
        with recorded_run("eval", arguments["out_dir"], arguments, arguments.get("seed"), "summary.json") as outputs:
            run(**arguments)
            outputs["summary"] = str(Path(arguments["out_dir"]) / "summary.json")

    return click.Command(eval_command.name, params=eval_command.params, callback=callback, help=eval_command.help,
                         context_settings=eval_command.context_settings)  # fmt: skip


eval_command = recorded_eval_command()
