"""Ray Tune sweeps: every trial is a full multi-worker SIMT run (gppf.launch.fit.fit).

A sweep is a job config (the base), a search space {dotted config key: Ray Tune domain} and a
`SweepConfig`. Each trial is a small driver function (`run_trial`, Ray 2.60's Train + Tune
pattern) that applies its sampled values to the base config and fits a `TorchTrainer` whose
workers reserve their own resources through `ScalingConfig`; `ObjectiveReport` hands each of the
run's evaluations (`train.eval_every`) to Tune as flat "task/metric" values plus `objective`, so
ASHA can stop trials at equal steps. The sweep lives in `sweep_dir/name`; running the same
command again resumes it (Tune's restore): finished trials are kept, unfinished ones continue
their own runs from their newest checkpoints. Results: gppf.launch.sweep_results.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gppf.config.base import ConfigError, apply_values, to_dict
from gppf.config.job import JobConfig, evaluates_asynchronously, split_key
from gppf.config.sweep import SweepConfig
from gppf.engine.mt_metrics import MULTITASK
from gppf.launch.search_space import corners, describe, is_grid

# --- the search space -----------------------------------------------------------------------------


def check_space(base: JobConfig, space: dict[str, Any], sweep: SweepConfig) -> None:
    """Fails before any trial starts, naming the entry, when a value the space allows makes an
    invalid config: every entry's bounding values are applied to the base config and checked
    (gppf.launch.fit.validate), together with the other entries of the same config section, so
    cross-field rules (tau_end <= tau_start) are checked on every combination they allow."""
    from gppf.launch.fit import validate

    if not space:
        raise ConfigError("the search space is empty: a sweep needs at least one entry")
    for key, domain in space.items():
        if sweep.searcher == "optuna" and (is_grid(domain) or type(domain).__name__ == "Function"):
            raise ConfigError(
                f"search space entry {key!r}: {describe(domain)} needs sweep.searcher=random "
                "(Optuna samples ranges and choices only)"
            )
        values = corners(key, domain)
        try:
            apply_values(base, {key: values[0]} if values else {}, "sweep")
        except ConfigError as e:
            if "unknown key" in str(e):
                raise ConfigError(f"search space entry {key!r}: {e}") from None
    sections: dict[str, list[str]] = {}
    for key in space:
        sections.setdefault(key.rsplit(".", 1)[0], []).append(key)
    for keys in sections.values():
        keys = [k for k in keys if corners(k, space[k])]
        for combo in itertools.product(*(corners(k, space[k]) for k in keys)):
            values = dict(zip(keys, combo))
            try:
                validate(apply_values(base, values, "sweep"))
            except (ConfigError, ValueError, KeyError) as e:
                named = ", ".join(f"{k}: {describe(space[k])}" for k in keys)
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                which = ("entry", "allows") if len(keys) == 1 else ("entries", "allow")
                raise ConfigError(
                    f"search space {which[0]} {named} {which[1]} {shown}, which is not a valid config: {e}"
                ) from None
    check_objective(base, sweep)
    if sweep.scheduler == "asha":
        every = base.train.eval_every
        if every <= 0:
            raise ConfigError(
                "sweep.scheduler=asha compares trials at their evaluations: set train.eval_every > 0"
            )
        if (sweep.grace_period or every) >= base.train.steps:
            raise ConfigError(
                f"sweep.grace_period ({sweep.grace_period or every} steps) must be shorter than "
                f"train.steps ({base.train.steps}), or ASHA never stops a trial"
            )


def check_objective(base: JobConfig, sweep: SweepConfig) -> None:
    task, metric = split_key(sweep.objective, "sweep.objective")
    if task == MULTITASK:
        need = {"VTDA": bool(base.metrics.groups), "delta_m": bool(base.metrics.baselines)}
        if not need.get(metric.split("_")[0] if metric.startswith("VTDA_") else metric, False):
            raise ConfigError(
                f"sweep.objective {sweep.objective!r}: config.metrics must configure it "
                "(VTDA and VTDA_<group>: metrics.groups; delta_m: metrics.baselines)"
            )
    elif task not in base.tasks:
        raise ConfigError(
            f"sweep.objective {sweep.objective!r}: {task!r} is not a task of this job "
            f"(tasks: {', '.join(base.tasks)}; or {MULTITASK}/VTDA, {MULTITASK}/delta_m)"
        )


# --- a trial --------------------------------------------------------------------------------------


def flat_evaluation(metrics: dict[str, Any], objective: str) -> dict[str, Any]:
    """One of a run's reports that carries an evaluation, as Tune sees it: "task/metric" values,
    the step, `objective`, and `final` (the run's last evaluation)."""
    flat = {f"{t}/{k}": v for t, m in metrics["eval"].items() for k, v in m.items()}
    if objective not in flat:
        raise ConfigError(
            f"sweep.objective {objective!r} is not among this run's evaluation metrics: {', '.join(flat)}"
        )
    return {"step": metrics["step"], **flat, "objective": flat[objective], "final": "final_eval" in metrics}


def _tune_report_callback() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        """Only the reports that carry an evaluation reach Tune, flattened (`flat_evaluation`): ASHA
        and the searcher compare trials at their evaluations, not at every log line."""

        def __init__(self, objective: str):
            super().__init__()
            self.objective = objective

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and "eval" in metrics[0]:
                super().after_report(run_context, [flat_evaluation(metrics[0], self.objective)], checkpoint)

    return ObjectiveReport


def run_trial(params: dict[str, Any], base: dict[str, Any], runs_dir: str, objective: str) -> None:
    """A trial's driver: the base config with this trial's values, fitted in runs_dir/<trial id>.
    A trial that a resumed sweep continues picks its run up from its newest checkpoint."""
    from ray import tune

    from gppf.launch.fit import fit

    cfg = apply_values(JobConfig.from_dict(base), params, "sweep parameter")
    trial_id = tune.get_context().get_trial_id()
    cfg.run_dir, cfg.run_name = runs_dir, trial_id
    run = Path(runs_dir) / trial_id
    resume = str(run) if any(run.glob("checkpoint_*")) else None
    fit(cfg, resume_from=resume, callbacks=[_tune_report_callback()(objective)])


# --- the sweep ------------------------------------------------------------------------------------


def trial_cpus(cfg: JobConfig, sweep: SweepConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial occupies: its workers' reservation, CPUs for its data decoding, and
    its evaluators' when it evaluates asynchronously (gppf.engine.async_eval)."""
    s, t = cfg.scaling, cfg.train
    cpus = s.num_workers * s.cpus_per_worker + sweep.data_cpus_per_trial
    gpus = float(s.num_workers if s.use_gpu else 0)
    if evaluates_asynchronously(t, t.steps):
        cpus += t.eval_actors * t.eval_resources.get("CPU", 0.0)
        gpus += t.eval_actors * t.eval_resources.get("GPU", 0.0)
    return cpus, gpus


def concurrency(cfg: JobConfig, sweep: SweepConfig) -> int:
    """Trials at once: `sweep.max_concurrent`, or as many as the cluster holds now. Trials beyond
    it wait in Tune's queue instead of holding half a worker group each."""
    import ray

    if sweep.max_concurrent:
        return sweep.max_concurrent
    cpus, gpus = trial_cpus(cfg, sweep)
    have = ray.cluster_resources()
    n = math.floor(have.get("CPU", 0) / cpus) if cpus else sweep.num_samples
    if gpus:
        n = min(n, math.floor(have.get("GPU", 0) / gpus))
    return max(1, n)


def _searcher(sweep: SweepConfig, max_concurrent: int = 0) -> Any:
    """Random search limits concurrency itself (Tune's `max_concurrent_trials` applies to
    `Searcher`s only); Optuna gets Tune's limit."""
    if sweep.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study and trial otherwise
        return OptunaSearch(seed=sweep.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


def _scheduler(cfg: JobConfig, sweep: SweepConfig) -> Any:
    if sweep.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        # One past the end: at max_t ASHA stops the trial, which would kill its driver before the
        # run has written its results; a trial that reaches the end finishes by itself.
        max_t=cfg.train.steps + 1,
        grace_period=sweep.grace_period or cfg.train.eval_every,
        reduction_factor=sweep.reduction_factor,
    )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _fingerprint(base: JobConfig, space: dict[str, Any], sweep: SweepConfig) -> dict[str, Any]:
    """What makes a sweep directory this sweep: resuming one with another space would mix trials."""
    keep = to_dict(sweep)
    for k in ("max_concurrent", "sweep_dir"):
        keep.pop(k)
    return {"space": {k: describe(v) for k, v in space.items()}, "sweep": keep, "base": to_dict(base)}


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's own terminal output off: its experiment box and status table (the legacy reporter
    at verbose=0 prints nothing), and its end-of-run log lines, which the sweep's table and
    progress lines say better ("Trials did not complete" for a diverged trial)."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    log = logging.getLogger("ray.tune")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def sweep_path(sweep: SweepConfig) -> Path:
    return Path(sweep.sweep_dir).expanduser().absolute() / sweep.name


def run_sweep(
    base: JobConfig,
    space: dict[str, Any],
    sweep: SweepConfig,
    additions: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    applies_to: str = "",
) -> dict[str, Any]:
    """Run (or resume) the sweep; returns its summary (gppf.launch.sweep_results.summarise).

    additions: the overrides that made `base` out of the job it tunes (jobs/tune_gppf.py: a rotation
        task for λ, the shared neck for adapters); written with the best trial's values into
        best_overrides.json, so that job's `--set-file` runs the best trial's config;
    callbacks: extra Ray Tune callbacks (driver side);
    applies_to: the job whose `--set-file` takes best_overrides.json (named in the last line).
    """
    import ray
    from ray import tune

    from gppf.dist.ray_env import ensure_ray
    from gppf.launch import sweep_results
    from gppf.launch.fit import resolve

    check_space(base, space, sweep)
    base = resolve(copy.deepcopy(base))  # data errors now, and each trial's data check is cached
    path = sweep_path(sweep)
    fingerprint = _fingerprint(base, space, sweep)
    saved = path / "sweep.json"
    resume = tune.Tuner.can_restore(str(path))
    if resume and json.loads(saved.read_text()) != json.loads(json.dumps(fingerprint, default=str)):
        raise FileExistsError(
            f"{path} holds a sweep with another search space, objective or base config; pick another "
            f"sweep.name (--name), or delete that directory to start over"
        )
    path.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(fingerprint, indent=2, default=str))
    # Trials' workers log to files under /tmp/ray (and to their run directories); the terminal
    # shows the sweep's own progress lines.
    ensure_ray(log_to_driver=False)
    n_parallel = concurrency(base, sweep)
    cpus, gpus = trial_cpus(base, sweep)
    have = ray.cluster_resources()
    print(
        f"[gppf] sweep {sweep.name}: {sweep.num_samples} trials of {base.train.steps} steps, objective "
        f"{sweep.objective} ({sweep.mode}), {sweep.searcher} search, {sweep.scheduler}; up to {n_parallel} "
        f"at a time (a trial takes {cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''}; the cluster has "
        f"{have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU); directory {path}",
        flush=True,
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, base=to_dict(base), runs_dir=str(path / "runs"), objective=sweep.objective
        ),
        # The driver only waits (Tune refuses an empty request); its Train workers reserve what
        # ScalingConfig asks.
        {"CPU": 0.01},
    )
    progress = sweep_results.Progress(
        sweep, list(space), sweep_results.expected_trials(space, sweep.num_samples)
    )
    if resume:
        print(f"[gppf] resuming the sweep in {path}: finished trials are kept", flush=True)
        # Tune restores the first call's run config, callbacks included (Progress restarts its
        # clock in `setup`).
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="objective",
                mode=sweep.mode,
                search_alg=_searcher(sweep, n_parallel),
                scheduler=_scheduler(base, sweep),
                num_samples=sweep.num_samples,
                max_concurrent_trials=n_parallel if sweep.searcher != "random" else None,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=str(path.parent),
                callbacks=[progress, *(callbacks or [])],
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    t0 = time.time()
    with _quiet_tune():
        tuner.fit()
    summary = sweep_results.write(path, space, sweep, additions or {}, base.train.steps, applies_to)
    print(sweep_results.report(summary, time.time() - t0), flush=True)
    if not summary["complete"]:
        print(
            f"[gppf] the sweep was interrupted; run the same command again to resume it ({path})",
            file=sys.stderr,
            flush=True,
        )
    return summary
