"""Ray Tune sweeps (gppf.launch.sweep, jobs/tune_gppf.py): a bad search space fails before any trial,
naming the entry; a shrunk sweep of jobs/tune_gppf.py is interrupted after its first trial and
resumed without rerunning it; the objective Tune recorded is the trial's own final evaluation;
the best override file runs through jobs/gppf_r50.py's --set-file."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
from pathlib import Path

import pytest
from ray import tune

from gppf.config.base import ConfigError, apply_values
from gppf.config.sweep import SweepConfig
from gppf.launch.sweep import check_space, flat_evaluation, run_sweep
from tests.test_jobs import load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.fixture(scope="module")
def job():
    return load_job(JOBS / "tune_gppf.py")


@pytest.fixture(scope="module")
def demo_base(job, demo_root):
    cfg, added = job.demo_base(str(demo_root))
    cfg = apply_values(cfg, {**added, "train.eval_every": 30}, "test")
    return cfg, job.search_space(cfg)


@pytest.mark.parametrize(
    "entry, domain, named",
    [
        ("model.adapter", tune.choice(["fpn", "prefix"]), r"model\.adapter.*'prefix'.*must be one of"),
        ("tasks.rotation.loss_weight", tune.uniform(-0.1, 0.2), r"tasks\.rotation\.loss_weight.*>= 0"),
        (
            "backbone.lego.tau_end",
            tune.uniform(0.5, 3.0),
            r"backbone\.lego\.tau_end.*tau_start=2\.0.*tau_end=3\.0",
        ),
        ("optim.lrr", tune.uniform(0.01, 0.1), r"search space entry 'optim\.lrr'.*unknown key optim\.lrr"),
        (
            "tasks.nope.loss_weight",
            tune.uniform(0.5, 1.0),
            r"'tasks\.nope\.loss_weight'.*unknown key tasks\.nope",
        ),
    ],
)
def test_a_bad_search_space_entry_fails_naming_it(demo_base, entry, domain, named):
    cfg, space = demo_base
    with pytest.raises(ConfigError, match=named):
        check_space(cfg, {**space, entry: domain}, SweepConfig())


def test_the_job_space_covers_all_four_kinds_and_is_valid(demo_base):
    cfg, space = demo_base
    check_space(cfg, space, SweepConfig())
    assert {"tasks.demo_cls.loss_weight", "tasks.demo_seg.loss_weight", "tasks.rotation.loss_weight"} <= set(
        space
    )
    assert {"backbone.lego.tau_start", "backbone.lego.tau_end", "backbone.lego.tau_decay_fraction"} <= set(
        space
    )
    assert set(space["model.adapter"].categories) == {"fpn", "pre", "post", "pre_scalar", "pre_vector"}
    assert set(space["model.language.variant"].categories) == {"", "lv_adapter"}


def test_sweep_settings_are_checked_before_any_trial(demo_base, tmp_path):
    cfg, space = demo_base
    with pytest.raises(ConfigError, match="grid_search.*searcher=random"):
        check_space(cfg, {**space, "optim.lr": tune.grid_search([0.01, 0.1])}, SweepConfig(searcher="optuna"))
    with pytest.raises(ConfigError, match="train.eval_every > 0"):
        check_space(apply_values(cfg, {"train.eval_every": 0}), space, SweepConfig())
    with pytest.raises(ConfigError, match="'demo_det' is not a task"):
        check_space(cfg, space, SweepConfig(objective="demo_det/box_AP"))
    with pytest.raises(ConfigError, match="sweep.searcher must be one of"):
        SweepConfig(searcher="bayes")
    sweep = SweepConfig(sweep_dir=str(tmp_path), name="bad")
    with pytest.raises(ConfigError, match="backbone.lego.tau_end"):
        run_sweep(cfg, {**space, "backbone.lego.tau_end": tune.uniform(0.5, 9.0)}, sweep)
    assert not (tmp_path / "bad").exists()  # nothing was started or written


def test_a_report_reaches_tune_as_flat_metrics_and_the_objective():
    report = {"step": 40, "loss": 1.0, "eval": {"a": {"top1": 50.0}, "multitask": {"VTDA": 75.0}}}
    flat = flat_evaluation(report, "multitask/VTDA")
    assert flat == {"step": 40, "a/top1": 50.0, "multitask/VTDA": 75.0, "objective": 75.0, "final": False}
    assert flat_evaluation({**report, "final_eval": report["eval"]}, "a/top1")["final"]
    with pytest.raises(ConfigError, match="'a/miou' is not among .*a/top1, multitask/VTDA"):
        flat_evaluation(report, "a/miou")


def test_set_file_errors_name_the_file(tmp_path, capsys):
    gppf_r50 = load_job(JOBS / "gppf_r50.py")
    from gppf.launch.cli import main

    bad = tmp_path / "bad.json"
    cases = ((json.dumps({"optim.lrr": 0.1}), f"--set-file {bad}: optim.lrr=0.1"), ("{x", "not JSON"))
    for text, said in cases:
        bad.write_text(text)
        with pytest.raises(SystemExit):
            argv = ["--set-file", str(bad), "--print-config"]
            main(gppf_r50.__doc__, gppf_r50.full_config, gppf_r50.demo_config, argv)
        assert said in capsys.readouterr().err


class InterruptOnce(tune.Callback):
    """Interrupts the sweep (SIGUSR1: Tune saves its state and returns) when the first trial
    ends; the marker file keeps the restored copy of this callback from doing it again."""

    def __init__(self, marker: str):
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


STEPS = 4


@pytest.fixture(scope="module")
def sweep(job, ray_session, tmp_path_factory):
    """The job's sweep, shrunk to 2 trials of 4 steps, interrupted after the first and resumed."""
    root = tmp_path_factory.mktemp("sweep")
    argv = [
        *("--demo-root", str(root / "demo"), "--demo-images", "16", "--name", "t"),
        *("--sweep", "num_samples=2", "--sweep", "max_concurrent=1", "--sweep", f"sweep_dir={root}"),
        *("--sweep", "grace_period=2", "--sweep", "data_cpus_per_trial=0.5"),
    ]
    for s in (
        f"train.steps={STEPS}",
        "train.eval_every=2",
        "train.eval_max_batches=1",
        "train.checkpoint_every=2",
        "optim.warmup_steps=1",
        "data.chunk_rows=16",
        "data.min_rows_per_pass=16",
        "data.prefetch_batches=1",
    ):
        argv += ["--set", s]
    marker = root / "interrupted"
    cfg, space, added, sweep_cfg = job.build(job.parse(argv))
    first = run_sweep(cfg, space, sweep_cfg, additions=added, callbacks=[InterruptOnce(str(marker))])
    done = marker.read_text()
    results = root / "t" / "runs" / done / "results.json"
    mtime = results.stat().st_mtime
    second = job.run(argv)  # the same command again: Tune restores the sweep
    return {
        "first": first,
        "second": second,
        "done": done,
        "results": results,
        "mtime": mtime,
        "dir": root / "t",
    }


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep, capsys):
    first, second = sweep["first"], sweep["second"]
    assert not first["complete"] and "best_overrides" not in first["files"]
    assert second["complete"] and len(second["trials"]) == 2
    assert [r["status"] for r in first["trials"] if r["trial"] == sweep["done"]] == ["completed"]
    # The finished trial's run was not redone; the other one trained in the second call.
    assert sweep["results"].stat().st_mtime == sweep["mtime"]
    other = [r["trial"] for r in second["trials"] if r["trial"] != sweep["done"]]
    assert len(other) == 1 and (sweep["dir"] / "runs" / other[0] / "results.json").is_file()


def test_tune_records_the_trials_own_final_evaluation(sweep):
    row = next(r for r in sweep["second"]["trials"] if r["trial"] == sweep["done"])
    final = json.loads(sweep["results"].read_text())
    assert final["step"] == STEPS == row["step"] and row["status"] == "completed"
    assert row["objective"] == final["final_eval"]["multitask"]["VTDA"]
    for task in ("demo_cls/top1", "demo_seg/mIoU", "rotation/top1"):
        t, m = task.split("/")
        assert row["metrics"][task] == final["final_eval"][t][m]


def test_the_sweep_writes_its_table_plot_and_best_overrides(sweep):
    d, summary = sweep["dir"], sweep["second"]
    with open(d / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["trial"] for r in rows} == {t["trial"] for t in summary["trials"]}
    assert "model.adapter" in rows[0] and "objective" in rows[0]
    assert (d / "objective_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((d / "best_overrides.json").read_text())
    params = summary["best"]["params"]
    assert {k: best[k] for k in params} == params and best["model.neck"] == "fpn"
    for run in (d / "runs").iterdir():
        assert any(run.rglob("events.out.tfevents.*")), f"no TensorBoard log in {run}"


def test_best_overrides_run_through_gppf_r50(sweep, capsys):
    gppf_r50 = load_job(JOBS / "gppf_r50.py")
    from gppf.launch.cli import main

    best_file = sweep["dir"] / "best_overrides.json"
    best = json.loads(best_file.read_text())
    root = str(sweep["dir"].parent / "demo")
    argv = ["--demo-root", root, "--demo-images", "16", "--set-file", str(best_file), "--print-config"]
    capsys.readouterr()
    main(gppf_r50.__doc__, gppf_r50.full_config, gppf_r50.demo_config, argv)
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["adapter"] == best["model.adapter"] and resolved["model"]["neck"] == "fpn"
    assert resolved["model"]["language"]["variant"] == best["model.language.variant"]
    lego = resolved["backbone"]["lego"]
    assert [lego["tau_start"], lego["tau_end"], lego["tau_decay_fraction"]] == [
        best["backbone.lego.tau_start"],
        best["backbone.lego.tau_end"],
        best["backbone.lego.tau_decay_fraction"],
    ]
    assert resolved["tasks"]["rotation"]["loss_weight"] == best["tasks.rotation.loss_weight"]
    assert resolved["tasks"]["demo_cls"]["loss_weight"] == best["tasks.demo_cls.loss_weight"]
    assert set(resolved["tasks"]) == {"demo_cls", "demo_det", "demo_seg", "rotation"}
    assert re.search(r'"VTDA|groups', json.dumps(resolved["metrics"]))


def test_optuna_suggests_values_inside_the_job_space(demo_base):
    from gppf.config.base import apply_values
    from gppf.launch.fit import validate
    from gppf.launch.sweep import _searcher

    cfg, space = demo_base
    searcher = _searcher(SweepConfig(searcher="optuna", seed=3))
    searcher.set_search_properties("objective", "max", space)
    for i in range(4):
        params = searcher.suggest(f"t{i}")
        assert set(params) == set(space)
        assert 0.01 <= params["tasks.rotation.loss_weight"] <= 0.2
        assert params["model.adapter"] in space["model.adapter"].categories
        validate(apply_values(cfg, params, "optuna"))  # every suggestion is a valid config
