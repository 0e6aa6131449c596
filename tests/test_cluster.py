"""The pipeline on a real SLURM cluster (tests/cluster/start_slurm.sh; .ci/run starts one).

One module-scoped run covers every assertion, to stay within the CI budget: the project is
copied at the smallest smoke budget, with MoW trained by 2 torchrun ranks in one job; the
Atari DAG up to results/atari_table.csv (STORM and MoW training, evaluation of each game,
aggregation; MoW's full variant only, no Meta-World) runs once locally as the reference, then through `snakemake --profile workflow/profiles/slurm`, logging to an
`mlflow server` on localhost. The SLURM run is interrupted (SIGINT, the plugin's stop) once a
job has finished while others still run, and rerun to the end.

Skipped, with the reason in pytest's summary, when `sinfo` does not answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from test_pipeline import job_stats, make_copy

TARGET = "results/atari_table.csv"   # STORM on the default protocol, the MoW chain, evaluation, aggregation
GAMES = ("Pong", "Breakout")
RULES = {"collect", "pretrain", "cluster", "train_mow", "train_storm", "evaluate", "evaluate_mow_atari", "aggregate"}
MOW_RUN = "runs/smoke/atari/storm_compat/mow/full/all/seed1"
# First status check 2 s after a submission instead of the profile's 40 s: these jobs last
# seconds (the plugin then backs off by 10 s per check in which nothing finished).
FAST_POLL = ["--slurm-init-seconds-before-status-checks", "2"]


def _cluster_missing() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (`sinfo` not found); as root, tests/cluster/start_slurm.sh installs and starts one"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=30)
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "SLURM did not answer `sinfo` within 30 s"
    if res.returncode:
        return f"SLURM does not answer: sinfo: {(res.stderr.strip().splitlines() or ['?'])[-1]}"
    if not any(line.startswith("up ") and line.split()[1].startswith(("idle", "mixed")) for line in res.stdout.splitlines()):
        return f"no idle SLURM node (sinfo: {res.stdout.strip()!r})"
    if "jobcomp/filetxt" not in conf.stdout:
        return "the cluster test reads finished jobs from JobCompType=jobcomp/filetxt (tests/cluster/start_slurm.sh)"
    return None


SKIP = _cluster_missing()
# one xdist worker runs the whole module, so the module-scoped run happens once (make test: --dist loadscope)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SKIP is not None, reason=f"cluster tests: {SKIP}")]


def jobcomp_records() -> dict[str, dict[str, str]]:
    """SLURM's record of every finished job (jobcomp/filetxt), by job id."""
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    path = Path(re.search(r"^JobCompLoc\s*=\s*(\S+)", conf, flags=re.M).group(1))
    records = {}
    for line in path.read_text().splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        # an array task has its own JobId; Snakemake knows it as <array job>_<task>
        key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}" if fields.get("ArrayTaskId") else fields["JobId"]
        records[key] = fields
    return records


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return server, f"http://127.0.0.1:{port}"


def wait_for_server(server: subprocess.Popen, uri: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server not answering at {uri} after 120 s: {log.read_text()[-2000:]}")


# the plugin's line for each job it submits: Snakemake job id, SLURM job id, the job's SLURM log
SUBMISSION = r"Job (\d+) has been submitted with SLURM jobid (\S+) \(log: (\S+)\)\."


def submitted(log: str) -> dict[int, str]:
    """Snakemake job id -> SLURM job id (`<array job>_<task>` for an array task), from the
    plugin's submission lines."""
    ids = {int(a): b for a, b, _ in re.findall(SUBMISSION, log)}
    for jobs, array, first in re.findall(r"Submitted array job with Snakemake IDs ([\d,]+) and SLURM job ID (\d+)\. "
                                         r"The individual task IDs are (\d+)-", log):
        for i, job in enumerate(jobs.split(",")):   # the plugin numbers the tasks in this order
            ids[int(job)] = f"{array}_{int(first) + i}"
    return ids


def finished_jobs(log: str) -> dict[int, str]:
    """Snakemake job id -> rule of every job Snakemake saw finish."""
    return {int(a): b for a, b in re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", log)}


def finished_inside(log: str) -> dict[int, str]:
    """Snakemake job id -> rule of every job whose SLURM log (`log` names them) shows that
    the Snakemake run inside the job finished the rule: its outputs and their metadata were
    written, whatever SLURM recorded after that."""
    done = {}
    for jobid, _, path in re.findall(SUBMISSION, log):
        text = Path(path).read_text() if Path(path).is_file() else ""
        match = re.search(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", text, flags=re.M)
        if match:
            done[int(jobid)] = match.group(1)
    return done


def job_outputs(log: str, jobid: int) -> list[str]:
    """The outputs Snakemake printed for job `jobid`."""
    for block in re.split(r"\n(?=\[)", log):
        if re.search(rf"^\s+jobid: {jobid}$", block, flags=re.M):
            match = re.search(r"^\s+output: (.+)$", block, flags=re.M)
            return [p.strip() for p in match.group(1).split(",")] if match else []
    raise AssertionError(f"job {jobid} not in the log")


def _default_sigint() -> None:
    # A test session started in the background by a shell without job control (`cmd &` in a
    # script, as CI runners may do) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: Snakemake would ignore the interrupt this test sends.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def slurm_snakemake(work: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/slurm", TARGET,
                             # no slurmdbd on the test cluster: ask squeue (the profile says when)
                             "--slurm-status-command", "squeue", "--slurm-keep-successful-logs", *FAST_POLL],
                            cwd=work, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=_default_sigint)


def queued(uuid: str, ignore: set[str]) -> list[str]:
    """Jobs of SLURM run `uuid` (but `ignore`) still pending or running, after up to 2 min for a
    cancel to land."""
    for _ in range(240):
        ids = subprocess.run(["squeue", "-h", "-n", uuid, "-t", "PD,R", "-o", "%i"], capture_output=True, text=True,
                             timeout=30).stdout.split()
        ids = [i for i in ids if i not in ignore]
        if not ids:
            break
        time.sleep(0.5)
    return ids


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    work = make_copy(base, metaworld=False, variants=("full",))
    params = yaml.safe_load((work / "params.yaml").read_text())
    smoke = params["scales"]["smoke"]
    smoke["train"]["nproc_per_node"] = 2   # train_mow: one job, 2 torchrun ranks (gloo)
    smoke["protocols"]["storm_compat"]["max_frames"] = 400   # evaluation episodes of 100 agent steps
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    profile = work / "workflow/profiles/slurm/config.yaml"   # the site settings a user edits
    text = profile.read_text()
    assert text.count('"CHANGE_ME"') == 2
    profile.write_text(text.replace('slurm_partition: "CHANGE_ME"', "slurm_partition: debug")
                       .replace('slurm_account: "CHANGE_ME"', "slurm_account: root"))
    local = base / "local"
    shutil.copytree(work, local)

    server, uri = start_mlflow_server(base)
    # The reference: the same DAG on this machine, run alongside the SLURM one (CPU results
    # do not depend on the load; the serial MoW chain leaves each run a core idle otherwise).
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'local.db'}"}
    local_start = time.monotonic()
    reference = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", TARGET], cwd=local, env=env,
                                 stdout=open(base / "local.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_server(server, uri, base / "server.log")
        env = {**env, "MLFLOW_TRACKING_URI": uri}
        # first SLURM run, stopped with SIGINT once a job has finished and another is running
        start = time.monotonic()
        proc = slurm_snakemake(work, env, base / "slurm1.log")
        stopped_while = None
        deadline = time.monotonic() + 900
        while proc.poll() is None and time.monotonic() < deadline:
            log = (base / "slurm1.log").read_text()
            uuid = re.search(r"SLURM run ID: (\S+)", log)
            if finished_jobs(log) and uuid:
                running = subprocess.run(["squeue", "-h", "-t", "R", "-n", uuid.group(1), "-o", "%i"],
                                         capture_output=True, text=True, timeout=30).stdout.split()
                if running:
                    stopped_while = running
                    proc.send_signal(signal.SIGINT)
                    break
            time.sleep(0.5)
        proc.wait(timeout=300)
        print(f"first SLURM run, interrupted: {time.monotonic() - start:.0f} s")
        first = (base / "slurm1.log").read_text()
        assert stopped_while, f"no moment with a finished and a running job: {first[-3000:]}"
        assert "Terminating processes on user request" in first, f"Snakemake did not act on SIGINT: {first[-3000:]}"
        # A job whose sbatch was still in flight when the interrupt arrived escapes the plugin's
        # cancel: Snakemake logs its submission after "Terminating processes" and the job runs
        # to its end unattended (README, cluster section). Every other job must be cancelled.
        late = set(submitted(first[first.index("Terminating processes on user request"):]).values())
        left_running = queued(re.search(r"SLURM run ID: (\S+)", first).group(1), ignore=late)
        # done: the jobs whose own Snakemake (inside the SLURM job) recorded them finished.
        # Not "the jobs the main Snakemake saw finish": a job can finish its rule and record
        # its outputs complete, then be cancelled while it exits (CANCELLED in SLURM's record,
        # never reported finished), and a rerun rightly keeps its outputs; with squeue as the
        # status command, a job cancelled mid-rule can look finished to the main Snakemake.
        done = finished_inside(first)
        kept = {out: (work / out).stat().st_mtime_ns for j in done for out in job_outputs(first, j)}

        start = time.monotonic()
        proc = slurm_snakemake(work, env, base / "slurm2.log")
        proc.wait(timeout=900)
        print(f"second SLURM run: {time.monotonic() - start:.0f} s")
        second = (base / "slurm2.log").read_text()
        assert proc.returncode == 0, second[-4000:]
        reference.wait(timeout=900)
        print(f"local run: {time.monotonic() - local_start:.0f} s")
        assert reference.returncode == 0, (base / "local.log").read_text()[-4000:]
        yield SimpleNamespace(work=work, local=local, first=first, second=second, uri=uri, done=done, kept=kept,
                              stopped_while=stopped_while, left_running=left_running, late=late)
    finally:
        for log in base.glob("slurm*.log"):   # a failed run leaves nothing behind on the cluster
            for uuid in re.findall(r"SLURM run ID: (\S+)", log.read_text()):
                subprocess.run(["scancel", "--name", uuid], capture_output=True, timeout=30)
        if reference.poll() is None:
            reference.send_signal(signal.SIGINT)
            reference.wait(timeout=120)
        os.killpg(server.pid, signal.SIGTERM)   # the server's own session: its workers too
        server.wait(timeout=60)


def test_every_job_ran_as_a_slurm_job_of_this_workflow(runs):
    records = jobcomp_records()
    stats = job_stats(runs.first)
    assert set(stats) - {"total"} == RULES and stats["train_storm"] == len(GAMES) and stats["train_mow"] == 1
    for log in (runs.first, runs.second):
        for jobid, slurm_id in submitted(log).items():
            record = records.get(slurm_id)
            assert record is not None, f"SLURM has no record of job {slurm_id}"
            assert Path(record["WorkDir"]) == runs.work
    # every job the second run needed completed on SLURM, each with its job id in its log name
    for jobid, slurm_id in submitted(runs.second).items():
        assert records[slurm_id]["JobState"] == "COMPLETED", records[slurm_id]
    logs = {p.stem: p for p in (runs.work / ".snakemake/slurm_logs").rglob("*.log")}
    rules_seen = {p.relative_to(runs.work / ".snakemake/slurm_logs").parts[0] for p in logs.values()}
    assert rules_seen == {f"rule_{r}" for r in RULES}
    first = submitted(runs.first)
    for slurm_id in [*(first[j] for j in runs.done), *submitted(runs.second).values()]:   # each completed job
        assert slurm_id in logs, slurm_id
    # one sbatch per job: no job arrays (workflow/profiles/slurm/config.yaml says why)
    assert not any("_" in slurm_id for slurm_id in submitted(runs.first).values())


def test_slurm_outputs_equal_the_local_run(runs):
    from mow import checkpoint

    raws = sorted(p.relative_to(runs.local) for p in runs.local.glob("results/raw/**/*.json"))
    assert len(raws) == 2 * len(GAMES)   # STORM and MoW on each game
    for raw in raws:
        a, b = json.loads((runs.local / raw).read_text()), json.loads((runs.work / raw).read_text())
        # not checkpoint_sha256: the checkpoint holds the id of its MLflow run (another store here)
        for key in ("returns", "lengths", "episodes", "env_steps_trained", "params_hash"):
            assert a[key] == b[key], f"{raw}: {key}"
    for name in ("atari_table.csv", "atari_summary.csv"):   # every column but the MLflow ids (other stores)
        a, b = (pd.read_csv(root / "results" / name).drop(columns="mlflow_run_ids") for root in (runs.local, runs.work))
        pd.testing.assert_frame_equal(a, b)
    assert (runs.local / "results/metrics.json").read_text() == (runs.work / "results/metrics.json").read_text()
    for ckpt in [f"{MOW_RUN}/model.ckpt", *(f"runs/smoke/atari/storm_compat/storm/full/{g}/seed1/model.ckpt"
                                            for g in GAMES)]:
        a, b = checkpoint.load(runs.local / ckpt), checkpoint.load(runs.work / ckpt)
        for part in ("world_model", "actor_critic"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), f"{ckpt}: {part}.{key}"


def test_mow_trained_by_two_torchrun_ranks_in_one_slurm_job(runs):
    from mow import checkpoint

    train_mow = [j for j, rule in finished_jobs(runs.first + runs.second).items() if rule == "train_mow"]
    assert len(train_mow) == 1
    records = jobcomp_records()
    slurm_ids = [submitted(log)[j] for log in (runs.first, runs.second) for j in train_mow if j in submitted(log)]
    final = records[slurm_ids[-1]]
    assert final["JobState"] == "COMPLETED" and final["ProcCnt"] == "2"   # one job holding both ranks' CPUs
    run = runs.work / MOW_RUN / "checkpoints"
    rank0, rank1 = checkpoint.load(run / "state.ckpt"), checkpoint.load(run / "state.rank1.ckpt")
    assert rank0["step"] == rank1["step"] == 150   # each rank stepped half of the 300 steps per game
    for part in ("world_model", "actor_critic"):
        for key in rank0[part]:
            assert torch.equal(rank0[part][key], rank1[part][key]), f"{part}.{key}"
    assert not torch.equal(rank0["replay"]["actions"], rank1["replay"]["actions"])   # their own envs


def test_interrupted_slurm_run_reruns_only_unfinished_jobs(runs):
    # the interrupt cancelled the jobs that were running (the plugin's scancel), except one
    # submitted while Snakemake was already stopping ...
    assert runs.left_running == [], f"not cancelled: {runs.left_running} (submitted during the stop: {runs.late})"
    records = jobcomp_records()
    # (one may have completed in the moment between the check and the signal)
    assert any(records[s]["JobState"] == "CANCELLED" for s in runs.stopped_while), runs.stopped_while
    # ... and the rerun did exactly the rest: no finished job again, their outputs untouched
    total = job_stats(runs.first)
    again = job_stats(runs.second)
    done = Counter(runs.done.values())
    assert done and sum(done.values()) < total["total"]
    for rule in RULES:
        assert again.get(rule, 0) == total[rule] - done[rule], (rule, again, done)
    for out, mtime in runs.kept.items():
        assert (runs.work / out).stat().st_mtime_ns == mtime, f"{out} was rewritten"
    assert (runs.work / TARGET).is_file()


def test_mlflow_server_received_every_metric(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.uri)
    exp = client.get_experiment_by_name("mow-atari")
    by_name = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=1000)}
    mirrors = {f"storm/{g}/seed1": runs.work / f"runs/smoke/atari/storm_compat/storm/full/{g}/seed1/metrics.jsonl"
               for g in GAMES}
    mirrors["mow/all/seed1"] = runs.work / MOW_RUN / "metrics.jsonl"
    for name, mirror in mirrors.items():
        run = by_name[name]
        assert run.info.status == "FINISHED", name
        logged = {}
        for line in mirror.read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key != "step":
                    logged.setdefault(key, {})[record["step"]] = value
        for key, steps in logged.items():
            history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            if not history:   # per-task evaluation metrics live in the nested run `mow/<game>/seed1`
                game = key.rsplit("/", 1)[-1]
                history = {m.step: m.value for m in client.get_metric_history(
                    by_name[f"mow/{game}/seed1"].info.run_id, key.rsplit("/", 1)[0])}
            for step, value in steps.items():
                assert step in history and history[step] == pytest.approx(value), f"{name}: {key} at step {step}"
