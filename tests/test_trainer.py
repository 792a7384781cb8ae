"""The trainer in one process (no Ray): stage plans, freezing, init_from vs resume, hooks, payload."""

from __future__ import annotations

import pytest
import torch

from gppf.api.hooks import Hook
from gppf.config.base import ConfigError
from gppf.config.job import BackboneConfig, JobConfig, ModelConfig, OptimConfig, StageConfig, TrainConfig
from gppf.dist.payload import StepPayload
from gppf.engine.hooks import StageHook
from gppf.engine.optim import warmup_cosine
from gppf.engine.stages import StagePlan
from gppf.engine.trainer import Trainer
from gppf.io.checkpoint import save_checkpoint
from gppf.models.lego import gumbel_tau


class FixedStream:
    """Stands in for a TaskStream: one in-memory batch, every step."""

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch, 0.0

    def start(self):
        pass

    def close(self):
        pass

    def state(self):
        return {"pass_idx": 0, "taken": 0}

    def load_state(self, state):
        pass


def _config(**kw) -> JobConfig:
    tasks = {
        name: {"type": "classification", "data_root": "/unused", "num_classes": n, "batch_size": 4}
        for name, n in (("a", 3), ("b", 5))
    }
    return JobConfig(
        tasks=tasks,
        backbone=BackboneConfig(name="resnet10t"),
        optim=OptimConfig(lr=0.1, warmup_steps=0),
        train=TrainConfig(steps=4),
        **kw,
    )


def _trainer(cfg: JobConfig, hooks=()) -> Trainer:
    t = Trainer(cfg, torch.device("cpu"), hooks=hooks)
    g = torch.Generator().manual_seed(0)
    for task in t.tasks:
        n = task.cfg.num_classes
        t.streams[task.name] = FixedStream(
            {"image": torch.randn(4, 3, 32, 32, generator=g), "label": torch.randint(0, n, (4,), generator=g)}
        )
    return t


def test_plan_without_stages_is_the_single_phase_schedule():
    plan = StagePlan([], {"a": 1.0, "b": 3.0}, total_steps=100, warmup_steps=10)
    assert plan.total == 100 and [s.name for s in plan.stages] == ["train"]
    for step in (0, 5, 10, 50, 99):
        assert plan.weights_at(step) == [1.0, 3.0]
        assert plan.lr_multiplier(step) == warmup_cosine(step, 100, 10)
        assert plan.tau_clock(step) == (step, 100)
        assert gumbel_tau(*plan.tau_clock(step)) == gumbel_tau(step, 100)


def test_plan_of_three_stages():
    stages = [
        StageConfig("one", 10, tasks=["a"]),
        StageConfig("two", 20, tasks={"a": 1.0, "b": 2.0}, tau_decay=False),
        StageConfig("three", 10, freeze=["backbone.*"], lr_factor=0.1, schedule="stage", warmup_steps=2),
    ]
    plan = StagePlan(stages, {"a": 1.0, "b": 3.0}, total_steps=999, warmup_steps=5)
    assert plan.total == 40
    assert [plan.index_at(s) for s in (0, 9, 10, 29, 30, 39, 40)] == [0, 0, 1, 1, 2, 2, 2]
    assert (
        plan.weights_at(3) == [1.0, 0.0]
        and plan.weights_at(12) == [1.0, 2.0]
        and plan.weights_at(35) == [1.0, 3.0]
    )
    assert [plan.is_stage_end(s) for s in (9, 10, 30, 40)] == [False, True, True, True]
    # τ decays in stages one and three only (20 steps), and holds through stage two.
    assert plan.tau_clock(5) == (5, 20) and plan.tau_clock(15) == (10, 20) and plan.tau_clock(33) == (13, 20)
    assert plan.lr_multiplier(12) == warmup_cosine(12, 40, 5)
    assert plan.lr_multiplier(31) == pytest.approx(0.1 * warmup_cosine(1, 10, 2))  # its own schedule


@pytest.mark.parametrize(
    "stages, message",
    [
        ([StageConfig("x", 5, tasks=["nope"])], r"stages\[0\] \(x\): unknown task 'nope'"),
        ([StageConfig("x", 5, tasks={"a": 0.0})], r"stages\[0\] \(x\): sampling weights"),
        ([StageConfig("x", 5), StageConfig("x", 5)], r"stages\[1\]: the stage name 'x' is used twice"),
        ([StageConfig("", 5)], r"stages\[0\]: every stage needs a name"),
    ],
)
def test_bad_stages_are_named(stages, message):
    with pytest.raises(ConfigError, match=message):
        StagePlan(stages, {"a": 1.0, "b": 1.0}, total_steps=10, warmup_steps=0)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        StageConfig("y", 0)


def test_frozen_stage_keeps_backbone_and_bn_statistics_and_drops_optimizer_state():
    cfg = _config(stages=[StageConfig("joint", 2), StageConfig("heads", 2, freeze=["backbone.*"])])
    cfg.optim.warmup_steps = 0
    seen = []

    class Snapshot(Hook):
        def before_step(self, t, *args):
            seen.append({k: v.clone() for k, v in t.model.state_dict().items()})

    t = _trainer(cfg, hooks=[StageHook(), Snapshot()])
    t.run()
    start, end = seen[2], t.model.state_dict()  # before the first step of stage 2, after its last
    assert t.stage_index == 1
    backbone = [k for k in start if k.startswith("backbone.")]
    assert any("running_var" in k for k in backbone)
    assert all(torch.equal(start[k], end[k]) for k in backbone)
    assert not all(torch.equal(seen[0][k], start[k]) for k in backbone)  # stage 1 did train it
    for task in ("a", "b"):  # both heads still train (each ran in stage 2: 2 steps, 1 rank, p = 1/2)
        keys = [k for k in start if k.startswith(f"heads.{task}.")]
        ran = any(not torch.equal(start[k], end[k]) for k in keys)
        assert ran == (task in {t.tasks[t.task_at(s)].name for s in (2, 3)})
    backbone_params = {id(p) for p in t.model.backbone.parameters()}
    assert not any(id(p) in backbone_params for p in t.optimizer.state)
    assert all(not p.requires_grad for p in t.model.backbone.parameters())
    bns = [m for m in t.model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns) and t.model.heads.training
    t.set_train_mode()  # what evaluation ends with: the frozen backbone's BN stays in eval mode
    assert not any(m.training for m in bns) and t.model.heads.training


def test_freeze_pattern_that_matches_nothing_is_named():
    cfg = _config(stages=[StageConfig("s", 2, freeze=["backbone.nothing.*"])])
    with pytest.raises(
        ConfigError, match=r"stages\[0\] \(s\): freeze pattern 'backbone.nothing.\*' matches no"
    ):
        _trainer(cfg)


def test_init_from_loads_weights_only_and_starts_at_step_zero(tmp_path):
    a = _trainer(_config())
    for _ in range(3):
        a.train_step()
    save_checkpoint(a.state_dict(), tmp_path)
    b = _trainer(_config(model=ModelConfig(init_from=str(tmp_path))))
    assert b.step == 0 and not b.optimizer.state and b.scheduler.last_epoch == 0
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert [len(r.missing) for r in b.init_reports] == [0]
    resumed = _trainer(_config())  # resume: the whole state, step and optimizer included
    resumed.load_state_dict(a.state_dict())
    assert resumed.step == 3 and len(resumed.optimizer.state) == len(a.optimizer.state) > 0

    other = _config(model=ModelConfig(init_from=str(tmp_path)))
    other.tasks["b"]["num_classes"] = 7  # a head of another shape
    with pytest.raises(
        ValueError, match=r"heads\.b\.fc\.weight has shape \(5, 512\) in the file but \(7, 512\)"
    ):
        _trainer(other)


def test_backbone_init_from_a_plain_state_dict_reports_what_it_loaded(tmp_path):
    a = _trainer(_config())
    state = a.model.backbone.export()
    del state["conv1.0.weight"]
    torch.save(state, tmp_path / "route.pt")
    cfg = _config()
    cfg.backbone.init_from = str(tmp_path / "route.pt")
    b = _trainer(cfg)
    (report,) = b.init_reports
    assert report.missing == ["conv1.0.weight"] and not report.unexpected
    assert "stay as initialised (1): conv1.0.weight" in report.summary()
    assert torch.equal(
        b.model.backbone.body.layer1[0].conv1.weight, a.model.backbone.body.layer1[0].conv1.weight
    )
    state["extra.weight"] = torch.zeros(1)  # a key that maps to nothing is an error naming it
    torch.save(state, tmp_path / "route.pt")
    with pytest.raises(ValueError, match=r"'extra.weight' maps to no parameter of the resnet10t backbone"):
        _trainer(cfg)


def test_payload_slots():
    p = StepPayload()
    p.register("loss", 3)
    p.register("choice", 2, windowed=False)
    with pytest.raises(ValueError, match="already registered"):
        p.register("loss", 1)
    p.add("loss", 2, torch.tensor(0.5))
    p.add("choice", 1, 4)
    vec = p.build(torch.device("cpu"))
    assert vec.tolist() == [0.0, 0.0, 0.5, 0.0, 4.0]
    assert p.view(vec, "choice").tolist() == [0.0, 4.0] and p.windowed_mask().tolist() == [1, 1, 1, 0, 0]
    assert p.build(torch.device("cpu")).sum() == 0  # staged values are consumed
    with pytest.raises(RuntimeError, match="after the first step"):
        p.register("late", 1)


def test_a_hook_registers_a_payload_slot_and_reports_it():
    from gppf.engine.hooks import ReportHook

    reports = []

    class Counter(Hook):
        def before_train(self, t):
            t.payload.register("my_count", 2)

        def before_step(self, t):
            t.payload.add("my_count", 1, 0.5 * t.step)

    cfg = _config()
    cfg.train.log_every = 2
    report = ReportHook(lambda m, ckpt: reports.append(m), None, cfg.train.log_every)
    t = _trainer(cfg, hooks=[Counter(), report])
    t.run()
    assert [r["step"] for r in reports] == [2, 4, 4]  # log steps, then the final report
    assert [r["my_count"] for r in reports[:2]] == [[0.0, 0.25], [0.0, 1.25]]  # per-step mean of the window
    assert all(r["world_size"] == 1 and ("loss/a" in r or "loss/b" in r) for r in reports)


@pytest.mark.parametrize("report_every, expected", [(0, [31, 32, 33]), (10, [10, 20, 30, 31, 32, 33])])
def test_ray_train_gets_checkpoints_evaluations_the_end_and_every_report_every(
    monkeypatch, report_every, expected
):
    """Each Ray Train report waits for the controller's poll (2 s): log windows stay local unless
    `train.report_every` asks for them; the choice is the same on every rank (step and content)."""
    import ray.train

    from gppf.launch.worker import ray_sink

    steps = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: steps.append(metrics["step"]))
    sink = ray_sink(rank=1, report_every=report_every)
    for step in range(1, 31):
        sink({"step": step, "loss/a": 1.0}, None)
    sink({"step": 31, "eval": {"a": {"top1": 1.0}}}, None)
    sink({"step": 32}, {"step": 32})  # a checkpoint (rank 1 reports without writing it)
    sink({"step": 33, "final_eval": {}}, None)
    assert steps == expected
