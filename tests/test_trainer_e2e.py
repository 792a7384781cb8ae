"""The trainer's stages and hooks end to end on 2 Ray Train workers (tests/staged_job.py):

- stage 1 trains one task, stage 2 three, stage 3 every head at lr x 0.1 with the backbone frozen:
  its parameters and BN statistics are bit-identical from the first to the last step of stage 3,
  and every head changes;
- a worker SIGKILLed in stage 2 resumes from a stage-2 checkpoint and repeats the uninterrupted
  run's per-step task choices and losses (1e-6);
- `train.eval_every` evaluations appear at those steps in metrics.jsonl, TensorBoard and the
  reports a callback passed to `fit` receives;
- `model.init_from` starts a new run at step 0 from the loaded weights; `--resume RUN_DIR`
  continues a run in place; a hook passed to `fit` runs on the workers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch

from gppf.api.hooks import Hook
from gppf.engine.optim import warmup_cosine
from gppf.io.checkpoint import load_checkpoint
from gppf.launch.fit import fit
from tests.staged_job import EVAL_EVERY, TOTAL, staged_config, steps_of
from tests.test_exact_resume import _training_worker_pids, assert_same_steps
from tests.test_local_cluster import committed_steps

TASKS = ["cls", "seg", "det"]
EVAL_STEPS = [0, *range(EVAL_EVERY, TOTAL, EVAL_EVERY), TOTAL]


def _states(run: Path) -> dict[int, dict]:
    out = {}
    for d in run.glob("checkpoint_*/"):
        state = load_checkpoint(d)
        out[state["step"]] = state
    return out


def test_stages_run_their_tasks_and_learning_rates(staged_run):
    result, run, _ = staged_run
    assert result["step"] == TOTAL and result["start_step"] == 0
    steps = steps_of(run / "metrics.jsonl")
    assert sorted(steps) == list(range(1, TOTAL + 1))
    stage = {s: steps[s]["stage"] for s in steps}
    assert [stage[s] for s in range(1, TOTAL + 1)] == ["cls"] * 4 + ["joint"] * 6 + ["heads"] * 4
    for s in range(1, 5):  # stage 1: both ranks run task 0 (cls) only
        assert steps[s]["task_choices"] == [[0, 0]], s
    joint = {c for s in range(5, 11) for step in steps[s]["task_choices"] for c in step}
    heads = {c for s in range(11, 15) for step in steps[s]["task_choices"] for c in step}
    assert joint == heads == {0, 1, 2}  # every task (so every head) runs in stages 2 and 3
    # The logged lr is the next step's: the job's warmup-cosine, times 0.1 in stage 3.
    for s in range(1, TOTAL):
        factor = 0.1 if s >= 10 else 1.0
        expected = 0.02 * factor * warmup_cosine(s, TOTAL, 2)
        assert abs(steps[s]["lr"] - expected) < 1e-12, (s, steps[s]["lr"], expected)


def test_stage_three_freezes_the_backbone_and_trains_every_head(staged_run):
    _, run, _ = staged_run
    states = _states(run)
    assert {10, 14} <= set(states), sorted(states)  # stage ends are checkpointed
    first, last = states[10]["model"], states[14]["model"]
    backbone = [k for k in first if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone) and any(".controller." in k for k in backbone)
    for k in backbone:  # parameters, BN running statistics, controller logits
        assert torch.equal(first[k], last[k]), k
    for task in TASKS:
        keys = [k for k in first if k.startswith(f"heads.{task}.")]
        assert any(not torch.equal(first[k], last[k]) for k in keys), f"head {task} did not change"
    # Frozen parameters hold no optimizer state: only head parameters keep momentum in stage 3.
    n_heads = sum(
        1 for k in first if k.startswith("heads.") and "running_" not in k and "num_batches" not in k
    )
    assert len(states[14]["optimizer"]["state"]) <= n_heads < len(states[10]["optimizer"]["state"])
    # Stage 2 trained the backbone: the check above could fail.
    assert any(not torch.equal(states[6]["model"][k], first[k]) for k in backbone)


def test_evaluations_at_eval_every_reach_jsonl_tensorboard_and_callbacks(staged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, run, reports = staged_run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval"] for m in lines if "eval" in m}
    assert sorted(evals) == EVAL_STEPS
    assert all(set(e) == set(TASKS) for e in evals.values())
    assert evals[TOTAL] == result["final_eval"] and evals[0] == result["initial_eval"]

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    for tag in ("val/cls/top1", "val/seg/mIoU", "val/det/box_AP"):
        events = tb.Scalars(tag)
        assert [e.step for e in events] == EVAL_STEPS, tag
        task, metric = tag.split("/")[1:]
        for e in events:
            assert abs(e.value - evals[e.step][task][metric]) < 1e-4

    seen = {r["metrics"]["step"]: r["metrics"] for r in reports if "val/cls/top1" in r["metrics"]}
    assert sorted(seen) == EVAL_STEPS
    for step, m in seen.items():
        assert m["val/seg/mIoU"] == evals[step]["seg"]["mIoU"]
    assert sum(r["checkpoint"] for r in reports) == len(range(2, TOTAL + 1, 2))  # every 2 steps


def test_killed_in_stage_two_resumes_exactly(staged_run, demo_root, tmp_path, ray_session):
    _, run_a, _ = staged_run
    reference = steps_of(run_a / "metrics.jsonl")
    cfg = staged_config(demo_root, tmp_path, "b")
    cfg.train.keep_checkpoints = 2
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(fit(cfg)), daemon=True)
    runner.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline:
        if any(s >= 6 for s in committed_steps(tmp_path)):  # stage 2 runs steps 5..10
            killed = _training_worker_pids()[-1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed, "run b never committed its step-6 checkpoint"
    runner.join(timeout=600)
    assert done.get("step") == TOTAL, done

    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    restarts = sorted({m["start_step"] for m in lines} - {0})
    assert restarts and all(s in (6, 8) for s in restarts), restarts  # from a stage-2 checkpoint
    assert_same_steps(reference, steps_of(tmp_path / "b" / "metrics.jsonl"), TOTAL)


def test_init_from_starts_at_step_zero_and_resume_continues_in_place(staged_run, demo_root, tmp_path):
    result, _, _ = staged_run
    cfg = staged_config(demo_root, tmp_path, "c")
    cfg.stages = []
    cfg.train.steps = 2
    cfg.train.eval_every = 0
    cfg.model.init_from = result["checkpoint"]

    class Marker(Hook):  # defined here: pickled by value to the workers
        def after_step(self, t, out):
            t.report.metrics["marker"] = 10 * t.step

    out = fit(cfg, hooks=[Marker()])
    assert out["start_step"] == 0 and out["step"] == 2
    assert out["marker"] == 20  # a hook passed to fit runs on the workers and reaches the report
    # Evaluated before any step: the loaded weights give the first run's final metrics exactly.
    assert out["initial_eval"] == result["final_eval"]
    first = steps_of(Path(out["run_dir"]) / "metrics.jsonl")[1]
    assert abs(first["lr"] - 0.02 * warmup_cosine(1, 2, 1)) < 1e-12  # a fresh schedule from step 0
    assert first["marker"] == 10

    # --resume RUN_DIR continues that run in place from its newest checkpoint (here: to step 4).
    cfg.train.steps = 4
    more = fit(cfg, resume_from=out["run_dir"])
    assert more["run_dir"] == out["run_dir"] and more["start_step"] == 2 and more["step"] == 4
    lines = steps_of(Path(out["run_dir"]) / "metrics.jsonl")
    assert sorted(lines) == [1, 2, 3, 4] and lines[3]["start_step"] == 2
