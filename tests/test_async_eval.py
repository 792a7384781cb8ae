"""Asynchronous evaluation (`train.eval_async`, gppf.engine.async_eval):

- an evaluator scores what a blocking evaluation on the workers scores (2 gloo ranks, each its
  share, states summed) from the same weights;
- in a run, no rank waits: the step at which an evaluation is sent off takes at most 1.2x a
  normal step; each evaluation lands at its own step in metrics.jsonl, TensorBoard, the reports
  a callback receives and results.json, with the values a blocking run of the same job has there;
- a task's own `eval_every` evaluates it at its cadence only;
- a sweep's ASHA stops a trial on asynchronous evaluations.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

import task_plugins  # noqa: F401
from gppf.api.hooks import Hook
from gppf.api.registry import build_tasks
from gppf.config.base import to_dict
from gppf.config.job import BackboneConfig, JobConfig, LegoConfig, TrainConfig
from gppf.dist.local_dist import run_distributed
from gppf.engine.async_eval import Evaluator
from gppf.engine.evaluation import evaluate
from gppf.engine.hooks import EvalHook
from gppf.launch.fit import fit
from tests.staged_job import EVAL_EVERY, TOTAL, staged_config
from tests.tasks_for_tests import task_entries

TASKS = ["cls", "seg", "det"]


def _job(demo_root: Path, max_batches: int) -> JobConfig:
    entries = task_entries(demo_root)
    job = JobConfig(
        tasks={"cls": entries["cls_folder"], "seg": entries["seg"], "det": entries["det"]},
        backbone=BackboneConfig(name="resnet10t", kind="lego", lego=LegoConfig(num_units=2, mode="hard")),
        train=TrainConfig(eval_max_batches=max_batches),
    )
    for task in build_tasks(job):  # the driver fills num_classes in (gppf.launch.fit.resolve)
        task.check_data()
        job.tasks[task.name] = {"type": job.tasks[task.name]["type"], **to_dict(task.cfg)}
    return job


def _blocking(rank: int, world: int, job: dict, weights: dict) -> dict:
    from gppf.config.base import from_dict
    from gppf.models.build import build_model

    cfg = from_dict(JobConfig, job)
    tasks = build_tasks(cfg)
    model = build_model(cfg, tasks)
    model.load_state_dict(weights)
    m = cfg.train.eval_max_batches
    return evaluate(model, tasks, cfg.data, torch.device("cpu"), rank, world, m, local=True)


@pytest.mark.parametrize("max_batches", [1, 0])
def test_an_evaluator_scores_what_the_workers_would(demo_root, max_batches):
    job = _job(demo_root, max_batches)
    torch.manual_seed(0)
    from gppf.models.build import build_model

    model = build_model(job, build_tasks(job))
    for p in model.parameters():  # weights that are not the initial ones
        p.data.add_(0.01 * torch.randn_like(p))
    weights = model.state_dict()
    job_dict = json.loads(json.dumps(to_dict(job)))
    ranks = run_distributed(_blocking, 2, job_dict, weights)
    assert ranks[0] == ranks[1]  # the summed states: every rank holds the whole split's metrics
    scores = Evaluator(job_dict).score(weights, TASKS, world=2)
    assert scores == ranks[0]
    assert {k for m in scores.values() for k in m} >= {"top1", "mIoU", "box_AP"}


class StepTimes(Hook):
    """Rank 0 writes each step's train_step seconds and what its EvalHook spent sending off an
    evaluation after it (runs after EvalHook)."""

    def __init__(self, path: str):
        self.path, self.rows = path, {}

    def after_step(self, t, out):
        if t.rank == 0:
            ev = next(h for h in t.hooks if isinstance(h, EvalHook))
            self.rows[t.step] = {"step_s": out.seconds, "launch_s": ev.launch_seconds.get(t.step)}

    def after_train(self, t):
        if t.rank == 0:
            Path(self.path).write_text(json.dumps(self.rows))


@pytest.fixture(scope="module")
def async_run(demo_root, ray_session, staged_run, tmp_path_factory):
    """tests/staged_job.py again, evaluating asynchronously on an evaluator of 0.5 CPU."""
    import ray.train

    runs = tmp_path_factory.mktemp("async")
    record, times = runs / "reports.jsonl", runs / "times.json"

    class Recorder(ray.train.UserCallback):  # defined here: pickled by value to Ray's controller
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    cfg = staged_config(demo_root, runs, "a")
    cfg.train.eval_async = "on"
    cfg.train.eval_resources = {"CPU": 0.5}
    cfg.train.checkpoint_every = 0  # checkpoints only at stage ends: the eval steps stand alone
    cfg.tasks["det"] = {**cfg.tasks["det"], "eval_every": 2 * EVAL_EVERY}  # its own cadence
    result = fit(cfg, callbacks=[Recorder(str(record))], hooks=[StepTimes(str(times))])
    reports = [json.loads(line) for line in record.read_text().splitlines()]
    return result, runs / "a", reports, json.loads(times.read_text())


EVAL_STEPS = [0, *range(EVAL_EVERY, TOTAL, EVAL_EVERY), TOTAL]


def test_asynchronous_evaluations_land_at_their_steps_with_the_blocking_values(async_run, staged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, run, reports, _ = async_run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval"] for m in lines if m.get("eval")}
    assert sorted(evals) == EVAL_STEPS
    # The blocking run of the same job (tests/staged_job.py, same seeds: the same weights at every
    # step) scored the same values at the same steps.
    blocking = {e["step"]: e["eval"] for e in staged_run[0]["evaluations"]}
    assert sorted(blocking) == EVAL_STEPS
    for step in EVAL_STEPS:
        # det at its own cadence (tasks.det.eval_every = 8), at step 0 and at the end
        det = step in (0, 2 * EVAL_EVERY, TOTAL)
        assert set(evals[step]) == set(TASKS if det else ["cls", "seg"]), step
        assert evals[step] == {k: blocking[step][k] for k in evals[step]}, step
    assert result["initial_eval"] == evals[0] and result["final_eval"] == evals[TOTAL]
    assert [e["step"] for e in result["evaluations"]] == EVAL_STEPS  # results.json
    assert json.loads((run / "results.json").read_text())["evaluations"] == result["evaluations"]
    # Every evaluation but the final one was reported after a later step than its own.
    late = [m for m in lines if "reported_at_step" in m]
    assert [m["step"] for m in late] == EVAL_STEPS[:-1]
    assert all(m["reported_at_step"] > m["step"] for m in late)

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    for tag in ("val/cls/top1", "val/seg/mIoU", "val/det/box_AP"):
        task, metric = tag.split("/")[1:]
        events = {e.step: e.value for e in tb.Scalars(tag)}
        assert sorted(events) == [s for s in EVAL_STEPS if task in evals[s]], tag
        assert all(abs(events[s] - evals[s][task][metric]) < 1e-4 for s in events), tag

    reported = {m["step"]: m for m in reports if m.get("eval")}
    assert sorted(reported) == EVAL_STEPS
    for s in EVAL_STEPS:
        assert reported[s]["val/cls/top1"] == evals[s]["cls"]["top1"], s


def test_no_rank_waits_for_an_asynchronous_evaluation(async_run):
    _, _, _, times = async_run
    rows = {int(k): v for k, v in times.items()}
    launched = [s for s, r in rows.items() if r["launch_s"] is not None]
    assert launched == list(range(EVAL_EVERY, TOTAL, EVAL_EVERY))
    normal = statistics.median(r["step_s"] for r in rows.values())
    for s in launched:  # a normal step plus sending the evaluation off
        assert normal + rows[s]["launch_s"] <= 1.2 * normal, (s, rows[s], normal)


def test_asha_stops_a_trial_on_asynchronous_evaluations(ray_session, tmp_path):
    """Two trials, one after the other: lr 0.05, then lr 0 (it cannot learn). ASHA compares them at
    step 8 on asynchronous evaluations reported at step 8 and stops the second."""
    from ray import tune

    from gppf.launch.sweep import run_sweep
    from tests.test_jobs import load_job

    job = load_job(Path(__file__).resolve().parents[1] / "jobs" / "tune_gppf.py")
    argv = [*("--demo-root", str(tmp_path / "demo"), "--demo-images", "16", "--name", "asha")]
    for s in (
        "max_concurrent=1",
        f"sweep_dir={tmp_path}",
        "grace_period=8",
        "reduction_factor=2",
        "objective=demo_seg/pixel_acc",
        "num_samples=1",
        "data_cpus_per_trial=0.5",
    ):
        argv += ["--sweep", s]
    for s in (
        "train.steps=16",
        "train.eval_every=8",
        "train.eval_async=on",
        "train.eval_max_batches=1",
        'train.eval_resources={"CPU": 0.5}',
        "train.checkpoint_every=8",
        "optim.warmup_steps=1",
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        "data.prefetch_batches=1",
    ):
        argv += ["--set", s]
    cfg, _, added, sweep = job.build(job.parse(argv))
    summary = run_sweep(cfg, {"optim.lr": tune.grid_search([0.05, 0.0])}, sweep, additions=added)
    status = {r["params"]["optim.lr"]: r["status"] for r in summary["trials"]}
    assert status == {0.05: "completed", 0.0: "stopped at step 8"}, summary["trials"]
    logs = list((tmp_path / "asha" / "runs").rglob("metrics.jsonl"))
    assert len(logs) == 2
    for log in logs:  # the step-8 evaluation came back after a later step: asynchronous
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        assert any(m["step"] == 8 and m.get("reported_at_step", 0) > 8 for m in lines), log
