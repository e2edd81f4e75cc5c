"""`twophase slurm`: one sbatch script per pipeline stage, chained by job dependencies.

The layout of the published runs: one GPU per stage (A100-80GB). Every job
runs the same command, `twophase pipeline --config FILE --stage NAME`, so a
job does exactly what that stage does in a local run, manifest and resume
included. `submit.sh` submits the jobs in pipeline order, each waiting
(`afterok`) only for the stages it needs: the original model's eval runs
beside Phase 1, the GRPO conditions run side by side once the merged DPO
model exists, and each eval starts when its own training ends. A skipped
stage (fv without a Lean project) gets no job.

With `--lean-server DIR`, a CPU job runs `twophase lean serve` on the Lake project DIR (Lean where the GPUs
are not): it writes its address and a key of its own to RUN_DIR/lean_server.json (readable by you only),
every Lean-rewarded condition checks its proofs there (reward_options.lean.server), its job starts once
the server's job has started, and the server is cancelled when those conditions end.

With `--nodes` or `--gpus-per-node` above 1, a GPU stage's job runs one
`torchrun` per node through `srun`, meeting at the first node of the job
(c10d rendezvous): the stage then uses all the job's GPUs (data/base/distributed.py).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from twophase.data.base.errors import UserError
from twophase.data.base.files import atomic_write_text

CPU_ONLY_STAGES = ("tables",)  # reads JSON files and writes tables: no GPU to wait for
CPU_STAGE_TIME, CPU_STAGE_CPUS = "00:30:00", 2  # the tables take seconds; a short job starts sooner
# Where models and datasets are cached, and whether to look for the hub at all: a job sees them as they
# were where `twophase slurm` ran, so the node reads the same pre-downloaded files (launch/README.md: offline machines).
CARRIED_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "HF_HUB_OFFLINE",
                     "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")  # fmt: skip


@dataclass
class ClusterOptions:
    partition: str | None = None
    account: str | None = None
    time: str = "48:00:00"
    gpu_type: str | None = "a100"
    cpus_per_task: int = 8
    mem: str | None = None
    signal_seconds: int = 600  # SIGTERM this long before the time limit: time to write a checkpoint
    requeue: bool = True  # a preempted or timed-out stage goes back in the queue and resumes
    environment: dict[str, str] | None = None  # exported in every job (CARRIED_VARIABLES, --offline)
    nodes: int = 1
    gpus_per_node: int = 1

    @property
    def distributed(self) -> bool:
        return self.nodes * self.gpus_per_node > 1


def twophase_executable() -> str:
    """The `twophase` next to this Python, so a job needs no activated environment; else the one on PATH."""
    beside = Path(sys.executable).with_name("twophase")
    return str(beside) if beside.exists() else "twophase"


def stage_command(config_path: Path, stage: str, overrides: tuple[str, ...], options: ClusterOptions | None = None) -> str:
    arguments = ["pipeline", "--config", str(config_path), "--stage", stage]
    for item in overrides:
        arguments += ["--set", item]
    if options is None or not options.distributed or stage in CPU_ONLY_STAGES:
        return shlex.join([twophase_executable(), *arguments])
    return torchrun_lines(arguments, options)


RENDEZVOUS_PORT = 29500


def torchrun_lines(arguments: list[str], options: ClusterOptions) -> str:
    """One torchrun per node (srun starts them), meeting at the job's first node; each starts gpus_per_node ranks."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    words = [
        torchrun, f"--nnodes={options.nodes}", f"--nproc-per-node={options.gpus_per_node}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=$head:{RENDEZVOUS_PORT}", "--rdzv-id=$SLURM_JOB_ID",
        "-m", "twophase.launch.cli", *arguments,
    ]  # fmt: skip
    quoted = " ".join(w if w.startswith("--rdzv-") else shlex.quote(w) for w in words)  # $head, $SLURM_JOB_ID expand
    return "\n".join([
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous host',
        "export NCCL_NVLS_ENABLE=0  # NVLink multicast off (see trainers/README.md, \"More than one GPU\")",
        f"srun --ntasks-per-node=1 {quoted}",
    ])  # fmt: skip


def sbatch_script(stage: str, command: str, job_name: str, log_dir: Path, workdir: Path, options: ClusterOptions) -> str:
    cpu_only = stage in CPU_ONLY_STAGES
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}"]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    if not cpu_only:
        gpus = options.gpus_per_node
        lines.append(f"#SBATCH --gres=gpu:{options.gpu_type}:{gpus}" if options.gpu_type else f"#SBATCH --gres=gpu:{gpus}")
        if options.nodes > 1:
            lines += [f"#SBATCH --nodes={options.nodes}", "#SBATCH --ntasks-per-node=1"]
    lines.append(f"#SBATCH --cpus-per-task={CPU_STAGE_CPUS if cpu_only else options.cpus_per_task}")
    if options.mem and not cpu_only:
        lines.append(f"#SBATCH --mem={options.mem}")
    lines += [f"#SBATCH --time={CPU_STAGE_TIME if cpu_only else options.time}", f"#SBATCH --output={log_dir}/{stage}-%j.log"]
    if options.requeue and not cpu_only:
        lines += [f"#SBATCH --signal=B:TERM@{options.signal_seconds}", "#SBATCH --requeue"]
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(workdir))}  # relative paths in the config and --set mean what they meant here"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted((options.environment or {}).items())]
    *setup, command = command.split("\n")  # torchrun's lines: the rendezvous host and NCCL settings, then srun
    lines += setup
    if options.requeue and not cpu_only:
        lines += _run_and_requeue(command)
    else:
        lines += [f"exec {command}"]
    return "\n".join(lines + [""])


def _run_and_requeue(command: str) -> list[str]:
    """Run the stage; on SIGTERM (preemption, or --signal before the time limit) let it checkpoint, then requeue.

    Slurm signals the batch shell (B:), which passes the signal on; twophase writes a checkpoint
    and exits 130, and `scontrol requeue` puts the job back in the queue under the same id, so the
    jobs waiting for it keep waiting. The requeued job resumes the stage from its checkpoint.
    """
    return [
        f"{command} &",
        "child=$!",
        'trap \'echo "SIGTERM: the stage writes a checkpoint, then the job is requeued"; kill -TERM "$child"\' TERM',
        'wait "$child"; status=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done  # a trapped signal ends the first wait early',
        'if [ "$status" -eq 130 ] || [ "$status" -eq 143 ]; then',
        '  scontrol requeue "$SLURM_JOB_ID" || true  # preemption may have requeued it already',
        "fi",
        'exit "$status"',
    ]


def submit_script(jobs: list[tuple[str, str, tuple[str, ...]]]) -> str:
    """jobs: (stage, script file name, stages it needs), in pipeline order."""
    lines = [
        "#!/bin/bash",
        "# Submit every stage; each job starts when the stages it needs have succeeded (afterok).",
        "# A failed job cancels the jobs that wait for it (--kill-on-invalid-dep); fix, then run this again:",
        "# stages that are done finish at once.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "submit() { sbatch --parsable --kill-on-invalid-dep=yes \"$@\" | cut -d';' -f1; }  # prints 'jobid' or 'jobid;cluster'",
        "",
    ]
    for stage, script, needs in jobs:
        lines.append(f"{stage}=$(submit {_dependency(needs)}{script})")
    served = [stage for stage, _, needs in jobs if LEAN_SERVER_JOB in needs]
    if served:  # the server's work ends with theirs
        lines.append(f"submit --time=00:05:00 --dependency=afterany:{':'.join(f'${s}' for s in served)} "
                     f"--wrap=\"scancel ${LEAN_SERVER_JOB}\" >/dev/null")  # fmt: skip
    lines += ["", *[f'echo "{stage}: job ${stage}"' for stage, _, _ in jobs], ""]
    return "\n".join(lines)


def _dependency(needs) -> str:
    """afterok on the stages a job needs; only `after` (started) on the Lean server, which never ends by itself."""
    parts = [f"afterok:{':'.join(f'${need}' for need in needs if need != LEAN_SERVER_JOB)}"] if set(needs) - {LEAN_SERVER_JOB} else []
    parts += [f"after:${LEAN_SERVER_JOB}"] if LEAN_SERVER_JOB in needs else []
    return f"--dependency={','.join(parts)} " if parts else ""


def check_lean_projects(stages) -> None:
    """A Lean reward's project_dir must be a Lake project before any job waits in the queue for hours."""
    for stage in stages:
        if stage.skip_reason:
            continue
        lean = ((stage.settings.get("reward_options") or {}).get("lean") or {})
        if lean.get("project_dir") is not None:
            check_lake_project(lean["project_dir"], f"{stage.name}: reward_options.lean.project_dir")


def check_lake_project(project, where: str) -> None:
    path = Path(project).expanduser()
    if not path.is_dir():
        raise UserError(f"{where} {project} is not a directory; pass the Lake "
                        f"project with Mathlib and the REPL built (as the compute nodes see it)")  # fmt: skip
    if not any((path / name).is_file() for name in ("lakefile.lean", "lakefile.toml")):
        raise UserError(f"{where} {project} has no lakefile.lean or lakefile.toml; "
                        f"pass the root of a Lake project with Mathlib and the REPL built")  # fmt: skip


LEAN_SERVER_JOB = "lean_server"
LEAN_SERVER_FILE = "lean_server.json"  # in the run directory: the server's URL and key, for the GRPO jobs


def uses_lean(settings: dict) -> bool:
    return "lean" in [name.strip() for name in str(settings.get("reward", "")).split(",")]


def lean_server_script(project: Path, run_dir: Path, log_dir: Path, workdir: Path, options: ClusterOptions,
                       repl_command: str | None = None) -> str:  # fmt: skip
    """A CPU job serving the Lean REPL pool of `project` to the cluster, with a key made in the job itself."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={run_dir.name}-{LEAN_SERVER_JOB}"]
    for key, value in (("partition", options.partition), ("account", options.account)):
        lines += [f"#SBATCH --{key}={value}"] if value else []
    lines += [f"#SBATCH --cpus-per-task={options.cpus_per_task}", f"#SBATCH --time={options.time}",
              f"#SBATCH --output={log_dir}/{LEAN_SERVER_JOB}-%j.log", "", "set -uo pipefail",
              f"cd {shlex.quote(str(workdir))}"]  # fmt: skip
    key = shlex.join([sys.executable, "-c", "import secrets; print(secrets.token_urlsafe(24))"])
    lines.append(f"export TWOPHASE_LEAN_TOKEN=$({key})  # this job's own key; clients read it from the URL file")
    serve = [twophase_executable(), "lean", "serve", "--project-dir", str(Path(project).expanduser().resolve()),
             "--host", "0.0.0.0", "--port", "0", "--workers", str(options.cpus_per_task),
             "--url-file", str(run_dir.resolve() / LEAN_SERVER_FILE)]  # fmt: skip
    serve += ["--command", repl_command] if repl_command else []
    return "\n".join([*lines, f"exec {shlex.join(serve)}", ""])


def carried_environment(offline: bool) -> dict[str, str]:
    environment = {name: os.environ[name] for name in CARRIED_VARIABLES if os.environ.get(name)}
    if offline:
        environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return environment


def write_scripts(stages, config, config_path: Path, overrides: tuple[str, ...], out_dir: Path, options: ClusterOptions,
                  lean_server: Path | None = None, lean_command: str | None = None) -> list[Path]:  # fmt: skip
    """DIR/NN_<stage>.sbatch for every stage that runs (00_lean_server with `lean_server`), and DIR/submit.sh;
    returns the files written."""
    check_lean_projects(stages)
    run_dir = Path(config.run_dir)
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the directory of --output
    running = [stage for stage in stages if not stage.skip_reason]
    jobs, written = [], []
    if lean_server is not None:
        path = out_dir / f"00_{LEAN_SERVER_JOB}.sbatch"
        atomic_write_text(path, lean_server_script(lean_server, run_dir, log_dir, Path.cwd(), options, lean_command))
        written.append(path)
        jobs.append((LEAN_SERVER_JOB, path.name, ()))
    for number, stage in enumerate(running, start=1):
        script = f"{number:02d}_{stage.name}.sbatch"
        command = stage_command(config_path.resolve(), stage.name, overrides, options)
        text = sbatch_script(stage.name, command, f"{run_dir.name}-{stage.name}", log_dir, Path.cwd(), options)
        path = out_dir / script
        atomic_write_text(path, text)
        written.append(path)
        served = lean_server is not None and uses_lean(stage.settings)
        jobs.append((stage.name, script, (*stage.needs, LEAN_SERVER_JOB) if served else stage.needs))
    submit = out_dir / "submit.sh"
    atomic_write_text(submit, submit_script(jobs))
    os.chmod(submit, 0o755)
    return [*written, submit]


@click.command("slurm")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Pipeline YAML, as for `twophase pipeline`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Where to write the scripts.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Pipeline override, passed to every job.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--account", default=None, help="Slurm account to charge.")
@click.option("--time", "time_limit", default="48:00:00", show_default=True, help="Time limit of each job.")
@click.option("--gpu-type", default="a100", show_default=True, help="GPU type in --gres=gpu:TYPE:1; empty for any.")
@click.option("--cpus-per-task", default=8, show_default=True, type=int, help="CPUs per job (the Lean REPL pool of fv uses them).")
@click.option("--mem", default=None, help="Memory per job, e.g. 128G (default: the partition's).")
@click.option("--signal-seconds", default=600, show_default=True, type=click.IntRange(min=1),
              help="SIGTERM a training job this many seconds before its time limit, to checkpoint and requeue.")
@click.option("--requeue/--no-requeue", default=True, show_default=True,
              help="Requeue a preempted or timed-out job, which then resumes from its checkpoint.")
@click.option("--offline", is_flag=True, help="Jobs never ask the hub (HF_HUB_OFFLINE=1): models and data are pre-downloaded.")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="Nodes per GPU stage (torchrun on each).")
@click.option("--gpus-per-node", default=1, show_default=True, type=click.IntRange(min=1), help="GPUs (ranks) per node.")
@click.option("--lean-server", default=None, type=click.Path(file_okay=False),
              help="A Lake project (Mathlib, REPL built): serve it from a CPU job (twophase lean serve) to the Lean-rewarded conditions.")
@click.option("--lean-command", default=None, help="--lean-server: the REPL command [default: lake exe repl].")
def slurm_command(config_path, out_dir, overrides, partition, account, time_limit, gpu_type, cpus_per_task, mem,
                  signal_seconds, requeue, offline, nodes, gpus_per_node, lean_server, lean_command):  # fmt: skip
    """Write one sbatch script per pipeline stage (one GPU each) and submit.sh, which chains them.

    Example: twophase slurm --config launch/configs/wu17_v5.yaml --out slurm/ --partition gpu --account myproj
    """
    from twophase.launch.experiment import load_pipeline

    config, stages = load_pipeline(config_path, overrides)
    if lean_server:
        check_lake_project(lean_server, "--lean-server")
        overrides = (*overrides, *lean_server_overrides(config))
        config, stages = load_pipeline(config_path, overrides)
    options = ClusterOptions(partition, account, time_limit, gpu_type or None, cpus_per_task, mem, signal_seconds, requeue,
                             carried_environment(offline), nodes, gpus_per_node)  # fmt: skip
    files = write_scripts(stages, config, Path(config_path), tuple(overrides), Path(out_dir), options,
                          Path(lean_server) if lean_server else None, lean_command)  # fmt: skip
    for stage in stages:
        if stage.skip_reason:
            click.echo(f"no job for {stage.name}: {stage.skip_reason}")
    click.echo("wrote:\n" + "\n".join(f"  {path}" for path in files))
    click.echo(f"submit with: bash {Path(out_dir) / 'submit.sh'}; follow with: twophase status {config.run_dir}")


def lean_server_overrides(config) -> list[str]:
    """Every Lean-rewarded condition checks on the served project: its server is the server job's URL file."""
    url_file = Path(config.run_dir).resolve() / LEAN_SERVER_FILE
    lean = [name for name, settings in config.conditions.items() if uses_lean({**config.grpo, **(settings or {})})]
    if not lean:
        raise UserError("--lean-server: no condition of this pipeline uses the lean reward")
    return [item for name in lean for item in (f"conditions.{name}.reward_options.lean.server={url_file}",
                                               f"conditions.{name}.reward_options.lean.project_dir=null")]  # fmt: skip
