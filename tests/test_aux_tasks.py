"""CompL's self-supervised auxiliary tasks (rotation, MoCo v2, DenseCL) and the composite mode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gppf.config.base import ConfigError
from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, TrainConfig
from gppf.engine.trainer import Trainer
from tests.test_trainer import FixedStream

SIZE = 32


def aux_tasks(root, **extra) -> dict:
    common = {"data_root": str(root / "segmentation"), "images": ["train/images"], "batch_size": 4}
    common["input_size"] = SIZE
    moco = {"dim": 16, "queue_size": 24, "momentum": 0.9}
    return {
        "seg": {
            "type": "segmentation",
            "data_root": str(root / "segmentation"),
            "num_classes": 4,
            "batch_size": 4,
            "input_size": SIZE,
            "head": "simple",
            "head_channels": 16,
        },
        "rot": {"type": "rotation", **common, "val_images": ["val/images"]},
        "moco": {"type": "moco", **common, **moco},
        "dense": {"type": "densecl", **common, **moco, "key_size": 24},
        **extra,
    }


def _config(tasks: dict, **train) -> JobConfig:
    return JobConfig(
        tasks=tasks,
        backbone=BackboneConfig(name="resnet10t"),
        optim=OptimConfig(lr=0.1, warmup_steps=0),
        train=TrainConfig(steps=4, **train),
    )


def _batch(task, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real preprocessed training batch of `task` (its own `pre`, no Ray)."""
    units = task.source("train").units[:n]
    raw = {k: np.array([u[k] for u in units]) for k in units[0]}
    batch = {k: torch.from_numpy(v) for k, v in task.preprocess(raw, train=True, seed=seed).items()}
    return task.to_device(batch, torch.device("cpu"))  # uint8 images normalised, as the trainer does


def _trainer(cfg: JobConfig) -> Trainer:
    t = Trainer(cfg, torch.device("cpu"))
    for task in t.tasks:
        t.streams[task.name] = FixedStream(_batch(task))
    return t


def _shared_grads(t: Trainer, parts: list[int]) -> torch.Tensor:
    t.optimizer.zero_grad(set_to_none=True)
    batches = [t.streams[t.tasks[i].name].next()[0] for i in parts]
    torch.manual_seed(0)
    outs, tie = t.forward(parts, batches)
    (sum(t.losses(parts, outs, batches)) + tie).backward()
    return torch.cat([p.grad.flatten() for p in t.model.backbone.parameters() if p.grad is not None])


@pytest.mark.parametrize("aux", ["rot", "moco", "dense"])
def test_lambda_scales_the_auxiliary_gradient_exactly(demo_root, aux):
    """SIMT: grad(2λ L_a) = 2 grad(λ L_a) bit for bit; composite: the auxiliary part of
    grad(L_t + λ L_a) doubles with λ."""
    t = _trainer(_config(aux_tasks(demo_root)))
    a = [x.name for x in t.tasks].index(aux)
    lam = t.tasks[a].cfg.loss_weight
    g1 = _shared_grads(t, [a])
    t.tasks[a].cfg.loss_weight = 2 * lam
    g2 = _shared_grads(t, [a])
    assert g1.abs().sum() > 0
    assert torch.equal(g2, 2 * g1)
    if aux != "rot":
        return  # the composite check once: its cost is the target's forward and backward
    t.tasks[a].cfg.loss_weight = 0.0
    g0 = _shared_grads(t, [0, a])
    t.tasks[a].cfg.loss_weight = lam
    gl = _shared_grads(t, [0, a])
    t.tasks[a].cfg.loss_weight = 2 * lam
    g2l = _shared_grads(t, [0, a])
    aux_grad = gl - g0
    assert aux_grad.norm() > 0
    # Equal up to float rounding of the sums (a few ulps of the target's gradient).
    assert (g2l - g0 - 2 * aux_grad).norm() <= 1e-5 * aux_grad.norm()


def test_momentum_encoder_changes_only_by_ema(demo_root):
    t = _trainer(_config(aux_tasks(demo_root)))
    head = t.model.heads["moco"]
    key_params = list(head.key_trunk.parameters()) + list(head.key_heads.parameters())
    assert all(not p.requires_grad for p in key_params)
    assert not {id(p) for p in key_params} & {id(p) for p in t.trainable}
    before = [p.detach().clone() for p in key_params]
    t.task_at = lambda step: [x.name for x in t.tasks].index("moco")
    t.train_step()
    assert all(p.grad is None for p in key_params)
    assert not any(id(p) in {id(q) for q in key_params} for p in t.optimizer.state)
    # After the step: key = m key + (1 - m) online, for the trunk copy and the projection MLP.
    online = dict(t.model.backbone.named_parameters())
    m = head.cfg.momentum
    for (name, p), old in zip(head.key_trunk.named_parameters(), before):
        torch.testing.assert_close(p, m * old + (1 - m) * online[name].detach(), rtol=1e-6, atol=1e-7)
    for p, old, q in zip(head.key_heads["proj"].parameters(), before[-4:], head.proj.parameters()):
        torch.testing.assert_close(p, m * old + (1 - m) * q.detach(), rtol=1e-6, atol=1e-7)
    # Its BatchNorms are plain, in eval mode, with the online trunk's running statistics.
    bns = [m for m in head.key_trunk.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(b) is torch.nn.BatchNorm2d and not b.training for b in bns)
    online_buffers = dict(t.model.backbone.named_buffers())
    for name, b in head.key_trunk.named_buffers():
        assert torch.equal(b, online_buffers[name])


def test_queue_rolls_with_every_ranks_keys(demo_root):
    t = _trainer(_config(aux_tasks(demo_root)))
    head = t.model.heads["moco"]
    n, d, size = head.batch_keys, head.cfg.dim, head.cfg.queue_size
    world = 3
    keys = torch.nn.functional.normalize(torch.randn(world, n, d), dim=2)
    keys[1] = 0  # rank 1 ran another task this step
    head.sync_get({"queue": keys.flatten()})
    assert int(head.queue_ptr) == 2 * n
    torch.testing.assert_close(head.queue[:, : 2 * n].T, torch.cat([keys[0], keys[2]]))
    for _ in range(3):  # 3 x 8 more keys: the pointer wraps around the 24 slots
        keys = torch.nn.functional.normalize(torch.randn(world, n, d), dim=2)
        keys[1] = 0
        head.sync_get({"queue": keys.flatten()})
    assert int(head.queue_ptr) == (8 * n) % size == 8
    torch.testing.assert_close(head.queue[:, :8].T, torch.cat([keys[0], keys[2]]))  # the newest


def test_densecl_dense_loss_on_two_feature_sizes(demo_root):
    t = _trainer(_config(aux_tasks(demo_root)))
    i = [x.name for x in t.tasks].index("dense")
    batch = t.streams["dense"].next()[0]
    assert batch["image"].shape[-1] == SIZE and batch["key"].shape[-1] == 24
    outs, tie = t.forward([i], [batch])
    logits, dense = outs[0]
    assert logits.shape == (4, 1 + 24) and dense.shape == (4 * 1, 1 + 24)  # stride 32: one cell
    # Query level 5x5 against key level 3x4: each of the 25 query cells is matched to a key cell.
    head = t.model.heads["dense"]
    head.train()
    feats = [torch.randn(2, head.proj[0].in_features, 5, 5, requires_grad=True)]
    head.key_trunk = _FakeTrunk(torch.randn(2, head.proj[0].in_features, 3, 4))
    out, dense = head(feats, {"key": torch.zeros(2, 3, 8, 8)})
    assert dense.shape == (2 * 25, 1 + 24)
    loss = t.tasks[i].loss((out, dense), {})
    loss.backward()
    assert torch.isfinite(loss) and feats[0].grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.dense.parameters())


class _FakeTrunk(torch.nn.Module):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def forward(self, x, task):
        return [self.level]


def test_composite_step_runs_target_and_auxiliary_in_one_forward(demo_root):
    tasks = aux_tasks(demo_root)
    tasks["rot"]["composite_with"] = "seg"
    t = _trainer(_config(tasks))
    assert t.attached == {0: [1]}
    assert t.plan.weights[0][1] == 0.0  # never sampled on its own
    calls = []
    trunk_forward = t.model.backbone.forward
    t.model.backbone.forward = lambda x, task: calls.append((x.shape[0], task)) or trunk_forward(x, task)
    seen = []
    forward = t.forward
    t.forward = lambda parts, batches: seen.append((parts, batches)) or forward(parts, batches)
    t.task_at = lambda step: 0
    out = t.train_step()
    assert calls == [(8, "seg")]  # 4 target + 4 auxiliary images, one trunk forward
    parts, batches = seen[0]
    assert parts == [0, 1]
    # The target's input is exactly what the target's own stream gave: no auxiliary augmentation.
    assert torch.equal(batches[0]["image"], t.streams["seg"].batch["image"])
    assert set(batches[0]) == {"image", "mask"} and set(batches[1]) == {"image", "label"}
    loss = t.payload.view(out.stats, "loss")
    assert loss[0] > 0 and loss[1] > 0


def test_auxiliary_augmentation_touches_only_its_own_input(demo_root):
    """The auxiliary views are blurred / jittered / rotated crops; the target task's `pre` of the
    same file is what it is without any auxiliary task."""
    from gppf.api.registry import build_task

    tasks = aux_tasks(demo_root)
    seg = build_task("seg", tasks["seg"])
    before = _batch(seg)
    for name in ("rot", "moco", "dense"):
        aux = build_task(name, tasks[name])
        b = _batch(aux)
        plain = _batch(aux)  # deterministic per (seed, file)
        assert torch.equal(b["image"], plain["image"])
        if "key" in b:
            assert not torch.equal(b["image"][:, :, :24, :24], b["key"])  # two different views
    assert all(torch.equal(v, before[k]) for k, v in _batch(seg).items())


def test_composite_errors_name_the_key(demo_root):
    tasks = aux_tasks(demo_root)
    tasks["rot"]["composite_with"] = "nope"
    with pytest.raises(ConfigError, match=r"tasks\.rot\.composite_with: no task named 'nope'"):
        Trainer(_config(tasks), torch.device("cpu"))
    tasks["rot"]["composite_with"] = "seg"
    tasks["rot"]["input_size"] = 48
    with pytest.raises(ConfigError, match="input_size must match"):
        Trainer(_config(tasks), torch.device("cpu"))


def test_auxiliary_tasks_train_on_two_ranks_and_stay_out_of_the_export(demo_root, ray_session, tmp_path):
    """Rotation, MoCo and DenseCL as SIMT tasks and a rotation task attached to the segmentation
    target (composite), on 2 gloo workers; the exported backbone is a plain timm state_dict
    without any of their parts."""
    import json

    import timm

    from gppf.config.job import ScalingConfig, StreamConfig
    from gppf.launch.fit import fit
    from gppf.tools.export import main as export_main

    tasks = aux_tasks(demo_root)
    tasks["rot_attached"] = {**tasks["rot"], "composite_with": "seg"}
    for name in ("moco", "dense"):
        tasks[name]["val_images"] = ["val/images"]
    cfg = _config(tasks, log_every=2, eval_max_batches=1, eval_at_start=False, collective_timeout_s=120)
    cfg.name, cfg.run_dir, cfg.train.steps = "aux", str(tmp_path), 10
    cfg.data = StreamConfig(min_rows_per_pass=16, chunk_rows=16, prefetch_batches=1)
    cfg.scaling = ScalingConfig(num_workers=2, cpus_per_worker=0.5)
    result = fit(cfg)
    run = Path(result["run_dir"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {t: sum(x.get(f"worker_steps/{t}", 0) for x in lines) for t in tasks}
    assert sum(steps[t] for t in ("seg", "rot", "moco", "dense")) == 2 * 10
    assert min(steps.values()) > 0 and steps["rot_attached"] == steps["seg"]  # rides with seg
    final = result["final_eval"]
    assert set(final["rot"]) == {"top1"} and set(final["moco"]) == {"contrast_top1"}

    out = tmp_path / "route.pt"
    export_main([result["checkpoint"], "-o", str(out)])
    exported = torch.load(out)
    timm.create_model("resnet10t", num_classes=0).load_state_dict(exported, strict=True)
    from gppf.io.checkpoint import load_checkpoint

    state = load_checkpoint(result["checkpoint"])["model"]
    assert any(k.startswith("heads.moco.key_trunk.") for k in state)  # saved for exact resume...
    assert any(k.startswith("heads.dense.queue_dense") for k in state)
    assert not any("key_" in k or "queue" in k or "proj" in k for k in exported)  # ...never exported
