"""The `twophase` command line: one click group, one subcommand per job.

Each subcommand lives in its own module and is imported only when it runs, so
`twophase --help` stays fast. Errors the user can fix (`UserError`) are printed
as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

import click

from data.errors import UserError

# name -> (module, attribute, one-line help)
COMMANDS = {
    "demo": ("launch.demo", "demo_command", "Run the whole experiment on the CPU, offline, with a tiny model."),
    "dpo": ("launch.train", "dpo_command", "Phase 1: LoRA DPO from a config file."),
    "merge": ("launch.merge", "merge_command", "Merge a LoRA adapter into its base model."),
    "grpo": ("launch.train", "grpo_command", "Phase 2: GRPO from a config file."),
    "eval": ("eval.cli", "eval_command", "Evaluate a model on the safety and capability benchmarks."),
    "compare": ("eval.cli", "compare_command", "Print the comparison table of two or more eval runs."),
    "bench": ("launch.bench", "bench_group", "Measure speed and memory of training and eval on this machine."),
    "pipeline": ("launch.pipeline", "pipeline_command", "Run eval -> DPO -> merge -> eval -> GRPO -> eval."),
    "status": ("launch.pipeline", "status_command", "Show the state of each stage of a pipeline run."),
    "slurm": ("launch.slurm", "slurm_command", "Write chained sbatch scripts, one per pipeline stage."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module_name), attribute)

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


def main(argv=None):
    quiet_library_noise()
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command with --resume to continue from the last checkpoint", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
