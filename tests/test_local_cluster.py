"""A real multi-node Ray cluster on this machine (scripts/local_cluster.py: `ray start --head` plus
`ray start --address=...` worker nodes): `ray job submit` of the demo job succeeds, and survives a
training worker killed by pid and then a whole worker node killed, each time resuming from the
last checkpoint with the step counter continuing from the checkpointed step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_cluster.py"
# The tests find this cluster's workers (and check their working directories) through /proc.
pytestmark = pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")
PORT, DASHBOARD = 6390, 8290  # not Ray's defaults: a user's own cluster may be running
CKPT_EVERY = 6


@pytest.fixture
def cluster(tmp_path):
    env = dict(
        os.environ,
        GPPF_LOCAL_CLUSTER_STATE=str(tmp_path / "cluster.json"),
        RAY_AUTH_MODE="token",
        RAY_ADDRESS=f"http://127.0.0.1:{DASHBOARD}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )

    def script(*args: str) -> str:
        out = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    # The head has no CPUs, so training workers and data tasks run on the worker nodes.
    script(
        "start",
        "--nodes",
        "1",
        "--head-cpus",
        "0",
        "--node-cpus",
        "2",
        "--port",
        str(PORT),
        "--dashboard-port",
        str(DASHBOARD),
        "--object-store-mb",
        "400",
        "--memory-mb",
        "3000",
    )
    try:
        yield env, script
    finally:
        script("stop")


def _ray(env: dict, *args: str) -> str:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), *args], env=env, capture_output=True, text=True, cwd=ROOT
    )
    return out.stdout + out.stderr


def _lines(run_dir: Path) -> list[dict]:
    files = list(run_dir.glob("*/metrics.jsonl"))
    return [json.loads(x) for x in files[0].read_text().splitlines()] if files else []


def committed_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (a report is collected by the controller
    asynchronously: a worker killed right after reporting can take its last checkpoint with it)."""
    snaps = list(run_dir.glob("*/checkpoint_manager_snapshot.json"))
    if not snaps:
        return []
    try:
        doc = json.loads(snaps[0].read_text())
    except json.JSONDecodeError:  # being rewritten
        return []
    return [r["metrics"]["step"] for r in doc.get("checkpoint_results", [])]


def _wait(what: str, cond, timeout: float = 300.0, diagnose=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{diagnose()}" if diagnose else ""))


def _ray_processes(env: dict) -> list[tuple[int, str, str]]:
    """(pid, process name, cwd) of this cluster's Ray workers: a job's workers run in its
    working_dir under the cluster's session directory, so another Ray on the machine (its
    session has another name) is never touched. Linux /proc."""
    session = Path(json.loads(Path(env["GPPF_LOCAL_CLUSTER_STATE"]).read_text())["session_dir"]).name
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            name = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
            cwd = os.readlink(proc / "cwd")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if name.startswith("ray::") and session in cwd:
            out.append((int(proc.name), name, cwd))
    return out


def _train_workers(env: dict) -> list[int]:
    return [pid for pid, name, _ in _ray_processes(env) if name.startswith("ray::RayTrainWorker")]


def _workers_without_cwd(env: dict) -> list[str]:
    """Workers whose working directory was deleted under them."""
    return [f"{pid} {name}: {cwd}" for pid, name, cwd in _ray_processes(env) if cwd.endswith(" (deleted)")]


def test_demo_job_survives_a_killed_worker_and_a_lost_node(cluster, tmp_path):
    env, script = cluster
    runs = tmp_path / "runs"

    def logs() -> str:
        return "job logs (tail):\n" + _ray(env, "job", "logs", "gppf-fault")[-6000:]

    submitted = _ray(
        env,
        "job",
        "submit",
        "--no-wait",
        "--submission-id",
        "gppf-fault",
        "--working-dir",
        ".",
        "--",
        "python",
        "jobs/gppf_r50.py",
        "--demo-root",
        str(tmp_path / "demo"),
        "--demo-images",
        "32",
        *[
            a
            for s in (
                "train.steps=32",
                f"train.checkpoint_every={CKPT_EVERY}",
                "train.log_every=2",
                "train.eval_at_start=false",
                "train.eval_max_batches=1",
                "scaling.max_failures=4",
                f"run_dir={runs}",
                "data.chunk_rows=64",
                "data.min_rows_per_pass=64",
                "tasks.demo_det.batch_size=2",
            )
            for a in ("--set", s)
        ],
    )
    assert "gppf-fault" in submitted, submitted

    # 1. A training worker process dies (SIGKILL by pid) after the first checkpoint is committed.
    _wait("a committed checkpoint", lambda: committed_steps(runs), diagnose=logs)
    os.kill(_train_workers(env)[0], signal.SIGKILL)
    first = _wait(
        "a resumed attempt", lambda: [m for m in _lines(runs) if m["start_step"] > 0], diagnose=logs
    )[0]

    # 2. The worker node dies (every process of it, SIGKILL) once a second node has joined.
    script("add-node", "--cpus", "2")
    _wait(
        "a checkpoint committed after the first resume",
        lambda: max(committed_steps(runs), default=0) > first["start_step"],
        diagnose=logs,
    )
    # The joining node unpacked the job's working_dir too, without pulling it from under node 0's
    # workers (which would make every later import that calls os.getcwd() fail in them).
    assert not _workers_without_cwd(env), _workers_without_cwd(env)
    script("kill-node", "0")
    _wait(
        "a second resume",
        lambda: [m for m in _lines(runs) if m["start_step"] > first["start_step"]],
        timeout=400,
        diagnose=logs,
    )

    status = _wait(
        "the job to end",
        lambda: re.search(
            r"Job 'gppf-fault' (succeeded|failed|was stopped)", _ray(env, "job", "status", "gppf-fault")
        ),
        diagnose=logs,
    )
    text = _ray(env, "job", "logs", "gppf-fault")
    assert status.group(1) == "succeeded", text[-4000:]
    resumed = [int(s) for s in re.findall(r"\[gppf\] resumed from checkpoint at step (\d+)", text)]
    assert len(resumed) >= 2 and all(s % CKPT_EVERY == 0 and s > 0 for s in resumed), resumed
    # The step counter continues from the checkpointed step: each attempt's first logged step
    # comes right after its start step, and the run ends at its last step with the results table.
    attempts: dict[int, list[int]] = {}
    for m in _lines(runs):
        attempts.setdefault(m["start_step"], []).append(m["step"])
    for start, steps in attempts.items():
        assert steps[0] == start + 2 and steps == sorted(steps), (start, steps)
    assert sorted(attempts)[1:] == sorted(set(resumed))
    assert re.search(r"demo_det \| box_AP", text) and "32 steps in" in text
