"""A real multi-node Ray cluster on this machine (scripts/local_cluster.py: `ray start --head` plus
`ray start --address=...` worker nodes): `ray job submit` of the elastic demo job
(scaling.min_workers=1, num_workers=2) succeeds through a training worker killed by pid, a node
joining (the group grows from one worker to two) and that node lost (it shrinks back to one),
each time resuming from the last checkpoint with the step counter continuing from the
checkpointed step; metrics.jsonl logs the world size of every step.

One job covers both fault tolerance and elasticity: each restart of a Ray Train worker group
costs ~35 s here, and two jobs on two clusters took 7.6 minutes of the suite."""

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
SLOT = '{"trainer_slot": 1}'  # one training worker per node that has this resource


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


def test_elastic_demo_job_survives_a_killed_worker_grows_and_loses_a_node(cluster, tmp_path):
    env, script = cluster
    runs = tmp_path / "runs"

    def logs() -> str:
        return "job logs (tail):\n" + _ray(env, "job", "logs", "gppf-fault")[-6000:]

    def committed_after(step: int):
        return lambda: max(committed_steps(runs), default=-1) > step

    # The fixture's node 0 has no trainer slot (it runs data tasks only); node 1 has one, so the
    # job starts with one worker of the two it asks for.
    script("add-node", "--cpus", "2", "--resources", SLOT)
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
                "train.steps=48",
                f"train.checkpoint_every={CKPT_EVERY}",
                "train.log_every=2",
                "train.eval_at_start=false",
                "train.eval_max_batches=1",
                "scaling.min_workers=1",
                "scaling.num_workers=2",
                f"scaling.resources_per_worker={SLOT}",
                "scaling.resize_check_s=5",
                "scaling.max_failures=6",
                f"run_dir={runs}",
                "data.chunk_rows=64",
                "data.min_rows_per_pass=64",
                "tasks.demo_det.batch_size=2",
                # Steps of a few hundred ms on a fast machine ended the 48 steps before the added
                # node had registered (the group never grew): 128 px images give every step more
                # work, and the join time to spare.
                "tasks.*.input_size=128",
            )
            for a in ("--set", s)
        ],
    )
    assert "gppf-fault" in submitted, submitted
    try:
        # 1. A training worker process dies (SIGKILL by pid) after the first checkpoint is committed.
        _wait("a committed checkpoint", committed_after(0), diagnose=logs)
        os.kill(_train_workers(env)[0], signal.SIGKILL)
        first = _wait(
            "a resumed attempt", lambda: [m for m in _lines(runs) if m["start_step"] > 0], diagnose=logs
        )[0]

        # 2. A node with a trainer slot joins: the group grows to two workers, from a checkpoint
        # committed after the first resume (so every attempt has its own start step).
        _wait("a checkpoint committed after the first resume", committed_after(first["start_step"]))
        script("add-node", "--cpus", "2", "--resources", SLOT)  # index 2
        grown = _wait(
            "the group to grow to 2", lambda: [m for m in _lines(runs) if m["world_size"] == 2], diagnose=logs
        )[0]
        # The joining node unpacked the job's working_dir too, without pulling it from under the
        # other nodes' workers (which would make every later import that calls os.getcwd() fail).
        assert not _workers_without_cwd(env), _workers_without_cwd(env)

        # 3. That node dies (every process of it, SIGKILL): the group shrinks back to one worker.
        _wait("a checkpoint committed on two workers", committed_after(grown["start_step"]), diagnose=logs)
        script("kill-node", "2")
        _wait(
            "a resume after the node was lost",
            lambda: [m for m in _lines(runs) if m["start_step"] > grown["start_step"]],
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
    finally:
        _ray(env, "job", "stop", "gppf-fault")
    text = _ray(env, "job", "logs", "gppf-fault")
    assert status.group(1) == "succeeded", text[-4000:]
    resumed = [int(s) for s in re.findall(r"\[gppf\] resumed from checkpoint at step (\d+)", text)]
    assert len(resumed) >= 3 and all(s % CKPT_EVERY == 0 and s > 0 for s in resumed), resumed
    # The step counter continues from the checkpointed step: each attempt's first logged step
    # comes right after its start step, and the run ends at its last step with the results table.
    # A node killed after the last checkpoint (step 48) was reported leaves an attempt that only
    # evaluates: it logs its evaluation at step 48 and no training window.
    lines = _lines(runs)
    attempts: dict[int, list[int]] = {}
    for m in lines:
        attempts.setdefault(m["start_step"], [])
        if "step_time_s" in m:  # a training window (not the final evaluation)
            attempts[m["start_step"]].append(m["step"])
    for start, steps in attempts.items():
        only_evaluates = start == 48 and not steps
        assert only_evaluates or (steps[:1] == [start + 2] and steps == sorted(steps)), (start, steps)
    assert sorted(attempts)[1:] == sorted(set(resumed))
    assert re.search(r"demo_det \| box_AP", text) and "48 steps in" in text
    # World sizes 1 ... 1, 2 ... 2, 1 ... 1 (the kill by pid restarts at one worker).
    sizes = [m["world_size"] for m in lines]
    assert [s for i, s in enumerate(sizes) if i == 0 or sizes[i - 1] != s] == [1, 2, 1], sizes
    for m in lines:  # a 2-worker step records two task choices, a 1-worker step one
        assert all(len(c) == m["world_size"] for c in m.get("task_choices", [])), m
