"""The `twophase` command line: one click group, one subcommand per job.

Each subcommand lives in its own module and is imported only when it runs, so
`twophase --help` stays fast. Errors the user can fix (`UserError`) are printed
as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import re
import sys
import warnings

import click

from twophase.data.base.errors import UserError
from twophase.data.base.signals import sigterm_as_interrupt

# name -> (module, attribute, one-line help)
COMMANDS = {
    "demo": ("twophase.launch.demo", "demo_command", "Run the whole experiment on the CPU, offline, with a tiny model."),
    "dpo": ("twophase.launch.train", "dpo_command", "Phase 1: LoRA DPO from a config file."),
    "merge": ("twophase.launch.merge", "merge_command", "Merge a LoRA adapter into its base model."),
    "grpo": ("twophase.launch.train", "grpo_command", "Phase 2: GRPO from a config file."),
    "eval": ("twophase.launch.provenance", "eval_command", "Evaluate a model on the safety and capability benchmarks."),
    "compare": ("twophase.eval.cli", "compare_command", "Print the comparison table of two or more eval runs."),
    "plot": ("twophase.launch.plot", "plot_command", "Plot training curves (loss, rewards, KL, ...) of one or more runs as a PNG."),
    "bench": ("twophase.launch.bench.training", "bench_group", "Measure speed and memory of training and eval on this machine."),
    "pipeline": ("twophase.launch.pipeline", "pipeline_command", "Run eval -> DPO -> merge -> eval -> GRPO -> eval."),
    "status": ("twophase.launch.pipeline", "status_command", "Show the state of each stage of a pipeline run."),
    "slurm": ("twophase.launch.slurm", "slurm_command", "Write chained sbatch scripts, one per pipeline stage."),
    "lean": ("twophase.launch.lean", "lean_group", "Serve Lean proof checking over HTTP for GRPO runs elsewhere (lean serve)."),
}


class LazyGroup(click.Group):
    def invoke(self, ctx):
        # Here rather than in main(), so that click's CliRunner sees what the console script does.
        try:
            with sigterm_as_interrupt():  # SIGTERM anywhere in a command is Ctrl-C (the merge's writing too)
                return super().invoke(ctx)
        except UserError as err:
            report_error(f"error: {err}")
            ctx.exit(2)
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo(INTERRUPTED, err=True)
            ctx.exit(130)
        except Exception as err:
            failure = None if isinstance(err, click.exceptions.ClickException) else failed_write(err)
            if failure is None:
                raise
            click.echo(f"error: {failed_write_message(*failure)}", err=True)
            ctx.exit(2)

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[name]
        command = getattr(importlib.import_module(module_name), attribute)
        if name == "bench":  # one check runs the whole pipeline, which launch/bench (one room down) must not import
            command.add_command(importlib.import_module("twophase.launch.pipeline").check_pipeline_command, "pipeline")
        return command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """twophase: hand-written DPO and GRPO, and the evaluations around them."""


def quiet_library_noise() -> None:
    """Hide library warnings that say nothing about the user's run."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU 4-bit kernels we never use
    logging.getLogger("huggingface_hub").setLevel(logging.CRITICAL)  # offline retries; we report one line instead
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")


INTERRUPTED = "interrupted: rerun the same command to continue where it stopped (twophase dpo and grpo: with --resume)"


# A write the file system refused, and what to do about it. The run's data stay resumable (every write
# is atomic), so the one line says what happened, where, and how to continue.
WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device; free some space (or choose another output directory)",
    errno.EDQUOT: "disk quota exceeded; free some space (or choose another output directory)",
    errno.EROFS: "the file system is read-only; choose a writable output directory",
    errno.EFBIG: "file too large for this process's file-size limit (ulimit -f); raise the limit",
    errno.EPERM: "operation not permitted; check the folder's permissions and flags (lsattr: immutable)",
    errno.EACCES: "permission denied; check the folder's permissions",
}
_RUST_IO_ERROR = re.compile(r"(?:os error |code: )(\d+)")  # how safetensors reports an OS error


def failed_write(err: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) when `err`, or an exception it came from, is a write the file system refused; else None."""
    while err is not None:
        number = getattr(err, "errno", None)
        if number is None and "safetensor" in type(err).__name__.lower():
            found = _RUST_IO_ERROR.search(str(err))
            number = int(found.group(1)) if found else None
        if number in WRITE_FAILURES:
            return number, getattr(err, "filename", None)
        err = err.__cause__ or err.__context__
    return None


def failed_write_message(number: int, path: str | None) -> str:
    where = f" writing {path}" if path else ""
    return (f"{WRITE_FAILURES[number]} ({errno.errorcode[number]}{where}); then rerun the same command "
            f"(twophase dpo and grpo: with --resume): the run continues from its last checkpoint")


def report_error(line: str) -> None:
    """One line on stderr. Under torchrun, an error before the process group exists comes from the config and
    is the same on every rank, so rank 0 says it; one after it may be a single rank's, so that rank says it."""
    distributed = sys.modules.get("twophase.data.base.distributed")  # imported (with torch) only by commands that need it
    if distributed is not None and distributed.active():
        line = f"[rank {distributed.rank()}] {line}"
    elif os.environ.get("RANK", "0") != "0":
        return
    click.echo(line, err=True)


def quiet_other_ranks() -> None:
    """Under torchrun only rank 0 prints progress and results (errors still reach stderr from any rank)."""
    if os.environ.get("RANK", "0") != "0":  # torchrun's rank of this process
        os.environ["TQDM_DISABLE"] = "1"  # silences bars and plain progress lines (data/base/progress.py)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def main(argv=None):
    quiet_library_noise()
    quiet_other_ranks()
    try:
        code = cli.main(args=argv, standalone_mode=False)
    except UserError as err:  # raised before a command runs
        report_error(f"error: {err}")
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    finally:
        _leave_process_group()
    if isinstance(code, int) and code:  # a command's ctx.exit(code)
        sys.exit(code)


def _leave_process_group() -> None:
    distributed = sys.modules.get("twophase.data.base.distributed")
    if distributed is not None:
        distributed.stop()


if __name__ == "__main__":
    main()
