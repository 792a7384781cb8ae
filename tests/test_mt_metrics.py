"""VTDA against the VTD paper's Table 14, Δm by hand, config errors, and the `multitask` entry of
the trainer's evaluations (EvalHook with a stand-in trainer: no Ray fit)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gppf.config.base import ConfigError
from gppf.config.job import JobConfig, MultiTaskMetricsConfig, TrainConfig
from gppf.engine.hooks import EvalHook
from gppf.engine.metrics_log import flat_eval
from gppf.engine.mt_metrics import check_tasks, delta_m, scale_from_sigma, vtda, with_multitask

# VTD Table 14 (App. F.2): group -> [(task/metric, printed s_t, ST baseline, VTDNet)].
TABLE_14 = {
    "cls": [("tag_weather/acc", 1.00, 81.9, 83.2), ("tag_scene/acc", 0.50, 77.9, 79.7)],
    "seg": [
        ("sem/iou", 0.20, 59.7, 63.8),
        ("drivable/iou", 0.50, 83.9, 85.4),
        ("lane/iou", 0.50, 28.4, 27.8),
    ],
    "loc": [
        ("det/ap", 0.33, 32.3, 33.4),
        ("ins/ap", 0.25, 20.2, 27.1),
        ("pose/ap", 0.14, 37.0, 39.7),
        ("mot/ap", 0.33, 32.9, 34.7),
        ("mots/ap", 0.25, 27.2, 31.6),
    ],
    "ass": [("flow/iou", 0.50, 59.6, 60.3), ("mot/assa", 0.50, 48.8, 50.1), ("mots/assa", 0.33, 42.4, 45.1)],
}


def _scores(column: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for rows in TABLE_14.values():
        for row in rows:
            task, metric = row[0].split("/")
            out.setdefault(task, {})[metric] = row[column]
    return out


def _table_cfg() -> MultiTaskMetricsConfig:
    # The printed σ_t are rounded (Sem. IoU: σ 2.0 but s_t 0.20), so the test uses the printed s_t.
    return MultiTaskMetricsConfig(
        groups={g: [r[0] for r in rows] for g, rows in TABLE_14.items()},
        scale={r[0]: r[1] for rows in TABLE_14.values() for r in rows},
    )


@pytest.mark.parametrize(
    "column, groups, total",
    [(2, (80.6, 56.7, 29.7, 51.3), 218.2), (3, (82.0, 57.8, 32.9, 52.7), 225.3)],
    ids=["st_baselines", "vtdnet"],
)
def test_vtda_reproduces_table_14(column, groups, total):
    out = vtda(_scores(column), _table_cfg())
    # Printed task scores carry ±0.05, so each group mean does too (and the sum ±0.2): the group
    # scores round to the printed ones and the totals agree to 0.1.
    for name, printed in zip(("cls", "seg", "loc", "ass"), groups):
        assert out[f"VTDA_{name}"] == pytest.approx(printed, abs=0.05 + 1e-9), name
    assert out["VTDA"] == pytest.approx(total, abs=0.1)
    assert out["VTDA"] == pytest.approx(sum(out[f"VTDA_{g}"] for g in TABLE_14))


def test_unweighted_means_would_not_match_table_14():
    """The check can fail: without the s_t weights the ST row's classification score is 79.9."""
    cfg = _table_cfg()
    cfg.scale = {}
    assert vtda(_scores(2), cfg)["VTDA_cls"] == pytest.approx(79.9)


def test_scale_from_sigma_uses_the_ceiling_of_two_sigma():
    # Unrounded σ consistent with Table 14's printed σ_t and s_t.
    assert scale_from_sigma(0.41) == 1.0  # Acc^Gw: ⌈0.82⌉ = 1
    assert scale_from_sigma(0.62) == 0.5  # Acc^Gs: ⌈1.24⌉ = 2
    assert scale_from_sigma(2.04) == 0.2  # Sem. IoU: printed σ 2.0, ⌈4.08⌉ = 5
    assert scale_from_sigma(1.04) == pytest.approx(1 / 3)  # MOT AP: printed σ 1.0, s_t 0.33
    assert scale_from_sigma(1.0) == 0.5  # a σ of exactly 1.0 would have given 0.50
    assert scale_from_sigma(3.1) == pytest.approx(1 / 7)  # Pose AP: s_t 0.14


def test_scale_wins_over_sigma_and_defaults_to_one():
    scores = {"a": {"m": 10.0}, "b": {"m": 40.0}}
    by_sigma = MultiTaskMetricsConfig(groups={"g": ["a/m", "b/m"]}, sigma={"a/m": 0.4, "b/m": 1.4})
    assert vtda(scores, by_sigma)["VTDA_g"] == pytest.approx((1.0 * 10 + 40 / 3) / (1 + 1 / 3))
    given = MultiTaskMetricsConfig(groups={"g": ["a/m", "b/m"]}, sigma={"a/m": 0.4}, scale={"a/m": 0.5})
    assert vtda(scores, given)["VTDA_g"] == pytest.approx((0.5 * 10 + 1.0 * 40) / 1.5)


def test_delta_m_by_hand_with_a_lower_is_better_metric():
    scores = {"cls": {"top1": 60.0}, "seg": {"mIoU": 45.0, "pixel_acc": 80.0}, "depth": {"rmse": 0.9}}
    cfg = MultiTaskMetricsConfig(
        baselines={"cls/top1": 50.0, "seg/mIoU": 50.0, "depth/rmse": 1.0}, lower_is_better=["depth/rmse"]
    )
    # 100/3 * ((60-50)/50 + (45-50)/50 - (0.9-1.0)/1.0) = 100/3 * (0.2 - 0.1 + 0.1)
    assert delta_m(scores, cfg) == pytest.approx(20 / 3)
    cfg.lower_is_better = []  # the sign matters: unsigned, the changes cancel
    assert delta_m(scores, cfg) == pytest.approx(0.0)


def test_multitask_entry_holds_only_what_is_configured():
    scores = {"a": {"m": 30.0}, "b": {"m": 60.0}}
    assert with_multitask(scores, MultiTaskMetricsConfig()) == scores
    only_dm = with_multitask(scores, MultiTaskMetricsConfig(baselines={"a/m": 20.0}))
    assert only_dm["multitask"] == {"delta_m": pytest.approx(50.0)}
    both = with_multitask(
        scores, MultiTaskMetricsConfig(groups={"x": ["a/m"], "y": ["b/m"]}, baselines={"b/m": 60.0})
    )
    assert both["multitask"] == {"VTDA": 90.0, "VTDA_x": 30.0, "VTDA_y": 60.0, "delta_m": 0.0}
    assert both["a"] == scores["a"] and "multitask" not in scores


@pytest.mark.parametrize(
    "metrics, match",
    [
        (
            {"groups": {"g": ["a/m"]}, "sigma": {"a/m": -1.0}},
            r"config\.metrics\.sigma\.a/m must be a positive",
        ),
        ({"groups": {"g": ["a/m"]}, "scale": {"a/m": 0}}, r"config\.metrics\.scale\.a/m must be a positive"),
        ({"groups": {"g": ["a/m"]}, "sigma": {"b/m": 1.0}}, r"config\.metrics\.sigma\.b/m: 'b/m' is in none"),
        ({"groups": {"g": ["top1"]}}, r"config\.metrics\.groups\.g\[0\]: 'top1' is not of the form"),
        ({"groups": {"g": []}}, r"config\.metrics\.groups\.g: a group needs"),
        ({"groups": {"g": ["a/m", "a/m"]}}, r"config\.metrics\.groups\.g\[1\]: 'a/m' is listed twice"),
        ({"baselines": {"a/m": 0.0}}, r"config\.metrics\.baselines\.a/m must be a positive"),
        ({"baselines": {"a/m": 1.0}, "lower_is_better": ["b/m"]}, r"lower_is_better\[0\]: 'b/m' has no"),
        (
            {"groups": {"g": ["a/m"]}, "baselines": {"a/m": 1.0}, "lower_is_better": ["a/m"]},
            r"lower_is_better\[0\]: 'a/m' is in config\.metrics\.groups",
        ),
        ({"groupz": {}}, r"unknown key config\.metrics\.groupz"),
    ],
)
def test_config_errors_name_the_key(metrics, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig.from_dict({"metrics": metrics})


def test_unknown_task_is_an_error_when_the_job_is_resolved():
    from gppf.launch.fit import resolve

    metrics = {"groups": {"g": ["a/top1", "seg/mIoU"]}}
    cfg = JobConfig.from_dict({"tasks": {"a": {"type": "classification"}}, "metrics": metrics})
    with pytest.raises(ConfigError, match=r"config\.metrics\.groups\.g\[1\]: 'seg' is not a task .*tasks: a"):
        resolve(cfg)  # before any task is built or its data looked at
    bad = MultiTaskMetricsConfig(baselines={"b/x": 1.0})
    with pytest.raises(ConfigError, match=r"config\.metrics\.baselines\.b/x: 'b' is not a task"):
        check_tasks(bad, ["a"])
    with pytest.raises(ConfigError, match=r"config\.tasks\.multitask"):
        check_tasks(MultiTaskMetricsConfig(baselines={"a/x": 1.0}), ["a", "multitask"])
    check_tasks(MultiTaskMetricsConfig(), ["multitask"])  # no scores configured: the name is free


def test_unknown_metric_at_evaluation_names_the_key_and_the_task_metrics():
    cfg = MultiTaskMetricsConfig(groups={"g": ["seg/miou"]})
    with pytest.raises(
        ConfigError, match=r"groups\.g\[0\]: task 'seg' reports no metric 'miou' .*mIoU, pixel_acc"
    ):
        vtda({"seg": {"mIoU": 1.0, "pixel_acc": 2.0}}, cfg)
    with pytest.raises(ConfigError, match=r"baselines\.cls/top1: the evaluation has no task 'cls'"):
        delta_m({"seg": {"mIoU": 1.0}}, MultiTaskMetricsConfig(baselines={"cls/top1": 1.0}))


def test_eval_hook_reports_the_multitask_entry_at_every_evaluation():
    from gppf.tools.tables import results_table

    metrics = {"groups": {"g": ["cls/top1", "seg/mIoU"]}, "baselines": {"cls/top1": 40.0}}
    cfg = JobConfig.from_dict({"metrics": metrics})
    cfg.train = TrainConfig(steps=4, eval_every=2, eval_max_batches=1)
    evals = iter(
        [
            {"cls": {"top1": 20.0}, "seg": {"mIoU": 10.0}},
            {"cls": {"top1": 30.0}, "seg": {"mIoU": 10.0}},
            {"cls": {"top1": 50.0}, "seg": {"mIoU": 30.0}},
        ]
    )
    t = SimpleNamespace(
        cfg=cfg,
        step=0,
        total_steps=4,
        initial_eval=None,
        report=SimpleNamespace(metrics={}, log=False),
        tasks=[SimpleNamespace(name=n, cfg=SimpleNamespace(eval_every=0)) for n in ("cls", "seg")],
        evaluate=lambda max_batches, names=None: next(evals),
    )
    hook = EvalHook.from_config(cfg.train, cfg.metrics)
    hook.before_train(t)
    assert t.initial_eval["multitask"] == {"VTDA": 15.0, "VTDA_g": 15.0, "delta_m": -50.0}
    assert t.report.metrics["eval"] is t.initial_eval
    t.step, t.report.metrics = 2, {}
    hook.after_step(t, None)  # train.eval_every
    assert t.report.metrics["eval"]["multitask"] == {"VTDA": 20.0, "VTDA_g": 20.0, "delta_m": -25.0}
    t.step = 4
    hook.after_train(t)
    final = t.report.metrics["final_eval"]
    assert final["multitask"] == {"VTDA": 40.0, "VTDA_g": 40.0, "delta_m": 25.0}
    assert flat_eval(final)["val/multitask/VTDA"] == 40.0  # what Ray Train callbacks and Tune read
    table = results_table({**t.report.metrics, "step": 4})
    assert " multitask | VTDA    | 15.00  | 40.00  | +25.00 " in table
    assert " multitask | delta_m | -50.00 | 25.00  | +75.00 " in table
