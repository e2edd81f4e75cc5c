"""`twophase slurm`: one sbatch script per stage, and a submit.sh that chains them by what each stage needs."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from twophase.launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "launch" / "configs" / "wu17_v5.yaml"
JOBS = ["eval_original", "dpo", "eval_dpo", "eval_dpo_exact", "grpo_random", "eval_grpo_random", "grpo_zero", "eval_grpo_zero", "tables"]

# A stand-in for sbatch: logs its arguments, answers like `sbatch --parsable` on a federated cluster ("id;cluster").
FAKE_SBATCH = """#!/bin/bash
n=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 101 ))
echo "$n $*" >> "$SBATCH_LOG"
echo "$n;cluster"
"""


def _write_scripts(tmp_path, capsys, *extra) -> Path:
    out = tmp_path / "slurm"
    main(["slurm", "--config", str(PUBLISHED), "--out", str(out), "--set", f"run_dir={tmp_path / 'run'}", *extra])
    capsys.readouterr()
    return out


def _submit(out: Path, tmp_path: Path) -> dict[str, tuple[int, list[int]]]:
    """Run submit.sh with the fake sbatch; returns {stage: (job id, ids it depends on)}."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SBATCH_LOG=str(log))
    result = subprocess.run(["bash", str(out / "submit.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    jobs = {}
    for line in log.read_text().splitlines():
        job_id, *args = line.split()
        assert "--parsable" in args and "--kill-on-invalid-dep=yes" in args
        stage = re.fullmatch(r"\d\d_(\w+)\.sbatch", args[-1]).group(1)
        dependency = next((a for a in args if a.startswith("--dependency=")), None)
        needs = [int(i) for i in dependency.removeprefix("--dependency=afterok:").split(":")] if dependency else []
        jobs[stage] = (int(job_id), needs)
    assert f"tables: job {jobs['tables'][0]}" in result.stdout
    return jobs


def test_one_script_per_stage_with_the_cluster_options(tmp_path, capsys):
    out = _write_scripts(tmp_path, capsys, "--partition", "gpu-a100", "--account", "safety", "--time", "12:00:00",
                         "--set", "dpo.max_steps=10", "--set", "eval.judge=local:/models/my judge")  # fmt: skip
    names = sorted(p.name for p in out.glob("*.sbatch"))
    assert names == [f"{i:02d}_{stage}.sbatch" for i, stage in enumerate(JOBS, start=1)]  # fv: no Lean project, no job
    dpo = (out / "02_dpo.sbatch").read_text()
    assert dpo.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --job-name=run-dpo", "#SBATCH --partition=gpu-a100", "#SBATCH --account=safety",
                 "#SBATCH --gres=gpu:a100:1", "#SBATCH --time=12:00:00", f"#SBATCH --output={tmp_path / 'run' / 'logs'}/dpo-%j.log"):  # fmt: skip
        assert line in dpo.splitlines(), line
    command = next(line for line in dpo.splitlines() if " pipeline --config " in line).removesuffix(" &")
    assert " pipeline --config " + str(PUBLISHED) + " --stage dpo " in command
    assert "--set dpo.max_steps=10" in command and "--set 'eval.judge=local:/models/my judge'" in command
    assert command.split()[0].endswith("twophase")
    assert f"cd {Path.cwd()}" in dpo
    assert (tmp_path / "run" / "logs").is_dir()  # Slurm would not create it
    for line in ("#SBATCH --signal=B:TERM@600", "#SBATCH --requeue", '  scontrol requeue "$SLURM_JOB_ID" || true  # preemption may have requeued it already'):
        assert line in dpo.splitlines(), line
    tables = (out / "09_tables.sbatch").read_text()
    assert "--gres" not in tables and "--stage tables" in tables  # no GPU to wait for
    assert "#SBATCH --time=00:30:00" in tables.splitlines() and "#SBATCH --cpus-per-task=2" in tables.splitlines()
    assert "--requeue" not in tables and "--signal" not in tables


def test_without_account_or_partition_no_such_lines(tmp_path, capsys):
    out = _write_scripts(tmp_path, capsys, "--gpu-type", "")
    script = (out / "01_eval_original.sbatch").read_text()
    assert "--account" not in script and "--partition" not in script
    assert "#SBATCH --gres=gpu:1" in script.splitlines()


def test_submit_chains_each_stage_after_what_it_needs(tmp_path, capsys):
    jobs = _submit(_write_scripts(tmp_path, capsys), tmp_path)
    assert list(jobs) == JOBS  # submitted in pipeline order
    ids = {stage: job_id for stage, (job_id, _) in jobs.items()}
    assert jobs["eval_original"][1] == [] and jobs["dpo"][1] == []  # these two run side by side
    assert jobs["eval_dpo"][1] == [ids["dpo"]] and jobs["eval_dpo_exact"][1] == [ids["dpo"]]
    assert jobs["grpo_random"][1] == [ids["dpo"]] and jobs["grpo_zero"][1] == [ids["dpo"]]  # conditions in parallel
    assert jobs["eval_grpo_random"][1] == [ids["grpo_random"]]
    assert jobs["eval_grpo_zero"][1] == [ids["grpo_zero"]]
    evals = ("eval_original", "eval_dpo", "eval_dpo_exact", "eval_grpo_random", "eval_grpo_zero")
    assert sorted(jobs["tables"][1]) == sorted(ids[s] for s in evals)


def test_a_configured_lean_project_adds_the_fv_jobs(tmp_path, capsys):
    project = tmp_path / "mathlib"
    project.mkdir()
    (project / "lakefile.lean").write_text("-- a Lake project\n")
    out = _write_scripts(tmp_path, capsys, "--set", f"conditions.fv.reward_options.lean.project_dir={project}")
    jobs = _submit(out, tmp_path)
    assert jobs["grpo_fv"][1] == [jobs["dpo"][0]] and jobs["eval_grpo_fv"][1] == [jobs["grpo_fv"][0]]
    assert jobs["eval_grpo_fv"][0] in jobs["tables"][1]
    assert f"--set conditions.fv.reward_options.lean.project_dir={project}" in (out / "09_grpo_fv.sbatch").read_text()


def test_bad_config_stops_before_writing_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "--config", str(PUBLISHED), "--out", str(tmp_path / "slurm"), "--set", "dpo.lr_typo=1"])
    assert exit_info.value.code == 2 and "lr_typo" in capsys.readouterr().err
    assert not (tmp_path / "slurm").exists()


@pytest.mark.parametrize("project, reason", [("missing", "is not a directory"), ("empty", "has no lakefile.lean or lakefile.toml")])
def test_a_lean_project_that_is_not_one_is_refused_before_writing(tmp_path, capsys, project, reason):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "--config", str(PUBLISHED), "--out", str(tmp_path / "slurm"),
              "--set", f"conditions.fv.reward_options.lean.project_dir={tmp_path / project}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: grpo_fv: reward_options.lean.project_dir {tmp_path / project} {reason}; "
                                       + ("pass the Lake project with Mathlib and the REPL built (as the compute nodes see it)\n"
                                          if project == "missing" else
                                          "pass the root of a Lake project with Mathlib and the REPL built\n"))
    assert not (tmp_path / "slurm").exists()


def test_offline_and_cache_variables_reach_every_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", "/scratch/hf cache")
    out = _write_scripts(tmp_path, capsys, "--offline")
    for script in out.glob("*.sbatch"):
        lines = script.read_text().splitlines()
        assert "export HF_HOME='/scratch/hf cache'" in lines and "export HF_HUB_OFFLINE=1" in lines, script.name


def test_sigterm_checkpoints_then_requeues_the_job(tmp_path):
    """The script's own shell code: SIGTERM to the batch shell reaches the stage, which exits 130; the job requeues."""
    import signal
    import time

    from twophase.launch.slurm import ClusterOptions, sbatch_script

    log = tmp_path / "log"
    stage = tmp_path / "stage.sh"  # stands in for twophase: a checkpoint on SIGTERM, then exit 130
    stage.write_text(f"trap 'echo checkpoint >> {log}; exit 130' TERM\necho started >> {log}\nwhile true; do sleep 0.05; done\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"scontrol $*\" >> {log}\n")
    (bin_dir / "scontrol").chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script("dpo", f"bash {stage}", "job", tmp_path, tmp_path, ClusterOptions()))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    job = subprocess.Popen(["bash", str(script)], env=env)
    for _ in range(200):
        if log.exists() and "started" in log.read_text():
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=20) == 130
    assert log.read_text().splitlines() == ["started", "checkpoint", "scontrol requeue 4242"]


def test_a_lean_server_job_serves_the_fv_condition(tmp_path, capsys):
    project = tmp_path / "mathlib"
    project.mkdir()
    (project / "lakefile.lean").write_text("-- a Lake project\n")
    out = _write_scripts(tmp_path, capsys, "--lean-server", str(project), "--lean-command", "lake env /opt/repl/bin/repl")
    server = (out / "00_lean_server.sbatch").read_text()
    assert server.rstrip().endswith("--command 'lake env /opt/repl/bin/repl'")
    assert "--gres" not in server and f"--project-dir {project} --host 0.0.0.0 --port 0 --workers 8" in server
    assert "export TWOPHASE_LEAN_TOKEN=$(" in server  # a key made in the job, never written into a script
    url_file = tmp_path / "run" / "lean_server.json"
    assert f"--url-file {url_file}" in server
    assert f"--set conditions.fv.reward_options.lean.server={url_file}" in (out / "09_grpo_fv.sbatch").read_text()
    submit = (out / "submit.sh").read_text()
    assert "grpo_fv=$(submit --dependency=afterok:$dpo,after:$lean_server 09_grpo_fv.sbatch)" in submit
    assert 'submit --time=00:05:00 --dependency=afterany:$grpo_fv --wrap="scancel $lean_server"' in submit
    assert "after:$lean_server" not in submit.split("grpo_fv=")[0]  # the controls do not wait for Lean
