"""Exact resume: a run whose training worker is killed (SIGKILL, by pid) and restarted by Ray Train
from its last checkpoint makes the same per-step task choices and the same losses as a run that
was never interrupted (same seed, same world size, deterministic demo data)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from gppf.config.job import (
    BackboneConfig,
    JobConfig,
    LegoConfig,
    OptimConfig,
    ScalingConfig,
    StreamConfig,
    TrainConfig,
)
from gppf.launch.fit import fit
from tests.tasks_for_tests import task_entries
from tests.test_local_cluster import committed_steps

STEPS = 12


def _config(root: Path, run_dir: Path, run_name: str) -> JobConfig:
    entries = task_entries(root)
    return JobConfig(
        name="resume",
        run_dir=str(run_dir),
        run_name=run_name,
        # Dropout (UperNet), RPN/RoI sampling (detection), Mixup and RandAugment (cls_augs) and hard
        # Gumbel routing all draw random numbers: the test covers every source a step has.
        tasks={k: entries[k] for k in ("cls_augs", "seg", "det")},
        backbone=BackboneConfig(name="resnet18", kind="lego", lego=LegoConfig(num_units=2, mode="hard")),
        optim=OptimConfig(lr=0.02, warmup_steps=2),
        train=TrainConfig(
            steps=STEPS, log_every=1, checkpoint_every=4, eval_at_start=False, eval_max_batches=1
        ),
        data=StreamConfig(min_rows_per_pass=16, chunk_rows=16, prefetch_batches=1),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5, max_failures=2),
    )


def _steps(metrics_file: Path) -> dict[int, dict]:
    """The last logged line of each step (a restarted run logs some steps twice)."""
    out = {}
    for line in metrics_file.read_text().splitlines():
        m = json.loads(line)
        out[m["step"]] = m
    return out


def _training_worker_pids() -> list[int]:
    """RayTrainWorker processes of this test's own Ray instance (descendants of this process):
    never another Ray job's on the same machine."""
    rows = [
        line.split(None, 2)
        for line in subprocess.run(
            ["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
        ).stdout.splitlines()
    ]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    mine, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in mine:
                mine.add(child)
                todo.append(child)
    return [int(r[0]) for r in rows if int(r[0]) in mine and len(r) > 2 and "ray::RayTrainWorker" in r[2]]


def test_killed_worker_resumes_exactly(demo_root, tmp_path, ray_session):
    fit(_config(demo_root, tmp_path, "a"))
    reference = _steps(tmp_path / "a" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, STEPS + 1))

    cfg = _config(demo_root, tmp_path / "rb", "b")
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(fit(cfg)), daemon=True)
    runner.start()
    metrics_file = tmp_path / "rb" / "b" / "metrics.jsonl"
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline:
        if any(s >= 4 for s in committed_steps(tmp_path / "rb")):  # the step-4 checkpoint is registered
            killed = _training_worker_pids()[-1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed, "run b never committed its step-4 checkpoint"
    runner.join(timeout=600)
    assert done.get("step") == STEPS, done

    lines = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    restarts = sorted({m["start_step"] for m in lines} - {0})
    assert restarts and all(s % 4 == 0 and s >= 4 for s in restarts), restarts  # from a checkpoint
    assert_same_steps(reference, _steps(metrics_file), STEPS)


def assert_same_steps(reference: dict[int, dict], resumed: dict[int, dict], steps: int) -> None:
    """Every step 1..steps logged, with the reference's task choices and losses (1e-6)."""
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        a, b = reference[step], resumed[step]
        assert a["task_choices"] == b["task_choices"], f"step {step}"
        losses = {k: v for k, v in a.items() if k.startswith("loss/")}
        assert losses.keys() == {k for k in b if k.startswith("loss/")}, f"step {step}"
        for k, v in losses.items():
            assert abs(v - b[k]) <= 1e-6, f"step {step} {k}: {v} vs {b[k]}"
