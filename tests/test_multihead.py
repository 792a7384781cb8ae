"""The multihead task (task_plugins/multihead.py): a head without labels in the batch gets no
gradient and no optimizer step, unlabelled samples never reach a head's loss or gradient, image and
labels share one crop and flip, the evaluator counts labelled samples only, and check_data's errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.api.task import FeatureInfo
from gppf.config.base import ConfigError
from gppf.config.job import OptimConfig
from gppf.dist.allreduce import MaskedAllReduce
from gppf.engine.optim import build_optimizer
from gppf.io.images import BadSampleError
from gppf.models.backbone import Backbone
from gppf.models.model import MultiTaskModel
from task_plugins.depth import DepthEvaluator
from task_plugins.segmentation.task import MIoUEvaluator

SIZE = 32
FEATURES = [FeatureInfo(8, 4), FeatureInfo(16, 8), FeatureInfo(32, 16)]


def _task(root: Path | str = "", depth_weight: float = 1.0, **kw):
    heads = {
        "seg": {"type": "segmentation", "num_classes": 4, "head": "simple", "head_channels": 8},
        "depth": {"type": "depth", "head_channels": 8, "max_depth": 24.0, "loss_weight": depth_weight},
    }
    entry = {"type": "multihead", "data_root": str(root), "batch_size": 2, "input_size": SIZE, "heads": heads}
    return build_task("mh", {**entry, **kw})


def _batch(has_seg: list[int], has_depth: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A preprocessed batch: unlabelled entries hold the fill values (255, 0 m), as preprocess writes."""
    g = torch.Generator().manual_seed(seed)
    n = len(has_seg)
    seg = torch.randint(0, 4, (n, SIZE, SIZE), generator=g)
    seg[:, :2] = 255
    depth = torch.rand(n, SIZE, SIZE, generator=g) * 20 + 1
    depth[torch.rand(n, SIZE, SIZE, generator=g) < 0.3] = 0.0
    s, d = torch.tensor(has_seg, dtype=torch.bool), torch.tensor(has_depth, dtype=torch.bool)
    return {
        "image": torch.randn(n, 3, SIZE, SIZE, generator=g),
        "label_seg": torch.where(s[:, None, None], seg, 255),
        "has_seg": s,
        "label_depth": torch.where(d[:, None, None], depth, 0.0),
        "has_depth": d,
    }


def _feats(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, f.channels, SIZE // f.reduction, SIZE // f.reduction, generator=g) for f in FEATURES
    ]


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("missing", ["seg", "depth"])
def test_a_head_without_labels_gets_no_gradient_and_no_step(missing):
    """Step 1 labels both heads (every parameter gets a momentum buffer); step 2 labels only the
    other head: the missing head's parameters have grad None through the masked allreduce and stay
    bit-identical through SGD with momentum and weight decay, while the other head moves."""
    present = "depth" if missing == "seg" else "seg"
    task = _task()
    torch.manual_seed(0)
    model = MultiTaskModel(Backbone("resnet10t"), [task])
    opt = build_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.01, momentum=0.9))
    reducer = MaskedAllReduce([p for p in model.parameters() if p.requires_grad])
    heads = model.heads["mh"].heads

    def step(batch: dict[str, torch.Tensor], extra: torch.Tensor | None = None) -> None:
        out, tie = model(batch["image"], "mh", batch)
        loss = task.loss(out, batch) * task.cfg.loss_weight
        (loss + tie + (0.0 if extra is None else extra)).backward()
        reducer.reduce()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(_batch([1, 1, 1], [1, 1, 1], seed=0))
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())

    batch = _batch([int(missing != "seg")] * 3, [int(missing != "depth")] * 3, seed=1)
    out, tie = model(batch["image"], "mh", batch)
    assert set(out) == {present}
    (task.loss(out, batch) + tie).backward()
    assert all(p.grad is None for p in heads[missing].parameters())
    assert all(p.grad is not None for p in heads[present].parameters())
    opt.zero_grad(set_to_none=True)

    before = _params(heads[missing])
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in heads[missing].parameters()]
    other = _params(heads[present])
    step(batch)
    for name, p in heads[missing].named_parameters():
        assert torch.equal(p, before[name]), name
    for p, m in zip(heads[missing].parameters(), momentum):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert any(not torch.equal(p, other[n]) for n, p in heads[present].named_parameters())

    # The 0/1-mask alternative: the head's loss times 0 gives its parameters zero-valued gradients,
    # and SGD steps them anyway (momentum and weight decay), which is why the head is not run.
    zero = sum(p.sum() for p in heads[missing].parameters()) * 0.0
    step(batch, zero)
    assert any(not torch.equal(p, before[n]) for n, p in heads[missing].named_parameters())


def test_unlabelled_samples_never_reach_a_heads_loss_or_gradient():
    """Head gradients do not change when an unlabelled sample's label holds garbage (NaN depth,
    random class ids), and equal those of a batch of the labelled samples alone; the loss is the
    weighted sum of each head's loss over its labelled samples."""
    task = _task(depth_weight=0.5)
    torch.manual_seed(0)
    head = task.build_head(FEATURES)
    has_seg, has_depth = [1, 1, 0, 1], [1, 0, 1, 0]

    def run(batch: dict[str, torch.Tensor], feats: list[torch.Tensor]):
        head.zero_grad(set_to_none=True)
        feats = [f.clone().requires_grad_(True) for f in feats]
        loss = task.loss(head(feats, batch), batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        return loss.detach(), grads, [f.grad for f in feats]

    batch, feats = _batch(has_seg, has_depth), _feats(4)
    loss, grads, feat_grads = run(batch, feats)

    garbage = dict(batch)
    garbage["label_depth"] = batch["label_depth"].clone()
    garbage["label_depth"][[1, 3]] = float("nan")
    garbage["label_seg"] = batch["label_seg"].clone()
    garbage["label_seg"][2] = torch.randint(0, 4, (SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    loss2, grads2, _ = run(garbage, feats)
    assert torch.isfinite(loss2) and torch.equal(loss, loss2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    assert set(grads) == {n for n, _ in head.named_parameters()}
    assert all(g.abs().sum() > 0 for f in feat_grads for g in f)  # every sample has some label

    # Only the labelled samples, each head on its own: the same gradients and the same loss.
    expected = torch.zeros(())
    for h, flags in (("seg", has_seg), ("depth", has_depth)):
        keep = torch.tensor(flags).nonzero().flatten()
        sub = {k: v[keep] for k, v in batch.items()}
        sub[f"has_{'depth' if h == 'seg' else 'seg'}"] = torch.zeros(len(keep), dtype=torch.bool)
        sub_loss, sub_grads, _ = run(sub, [f[keep] for f in feats])
        expected = expected + sub_loss
        for name, g in sub_grads.items():
            if name.startswith(f"heads.{h}."):
                torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # and the depth head's loss_weight (0.5) applies
        seg_only = task.subs["seg"].loss(
            head.heads["seg"](_keep(feats, [0, 1, 3])), {"mask": batch["label_seg"][[0, 1, 3]]}
        )
        depth_only = task.subs["depth"].loss(
            head.heads["depth"](_keep(feats, [0, 2])), {"depth": batch["label_depth"][[0, 2]]}
        )
    torch.testing.assert_close(loss, seg_only + 0.5 * depth_only, atol=1e-6, rtol=1e-6)


def _keep(feats: list[torch.Tensor], idx: list[int]) -> list[torch.Tensor]:
    return [f[idx] for f in feats]


def test_evaluator_counts_only_labelled_samples():
    task = _task()
    torch.manual_seed(0)
    head = task.build_head(FEATURES).eval()
    has_seg, has_depth = [1, 0, 1, 1], [0, 1, 1, 0]
    batch, feats = _batch(has_seg, has_depth, seed=2), _feats(4, seed=3)
    # Garbage where there is no label: it would count if the evaluator looked at it.
    batch["label_seg"][1] = 2
    batch["label_depth"][[0, 3]] = 5.0
    with torch.no_grad():
        out = head(feats, batch)
        seg_ref, depth_ref = MIoUEvaluator(4, 255), DepthEvaluator(1e-3, 80.0)
        seg_ref.update(head.heads["seg"](_keep(feats, [0, 2, 3])), {"mask": batch["label_seg"][[0, 2, 3]]})
        depth_ref.update(head.heads["depth"](_keep(feats, [1, 2])), {"depth": batch["label_depth"][[1, 2]]})
    ev = task.evaluator()
    ev.update(out, batch)
    assert ev.primary == "seg/mIoU"
    assert ev.evaluators["seg"].conf.sum().item() == (batch["label_seg"][[0, 2, 3]] != 255).sum().item()
    assert ev.evaluators["depth"].sums[-1].item() == 2  # images counted
    got = ev.compute()
    want = {**{f"seg/{k}": v for k, v in seg_ref.compute().items()}}
    want.update({f"depth/{k}": v for k, v in depth_ref.compute().items()})
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k

    # Two workers with half the batch each: the summed states give the same metrics.
    halves = []
    for idx in ([0, 1], [2, 3]):
        part = {k: v[idx] for k, v in batch.items()}
        e = task.evaluator()
        with torch.no_grad():
            e.update(head(_keep(feats, idx), part), part)
        halves.append(e)
    merged = task.evaluator()
    merged.load_state(halves[0].state() + halves[1].state())
    for k, v in merged.compute().items():
        assert v == pytest.approx(got[k], rel=1e-6), k


def _write(root: Path, split: str, stem: str, rgb: np.ndarray, seg=None, depth=None) -> None:
    for d in ("images", "seg", "depth"):
        (root / split / d).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / split / "images" / f"{stem}.png")
    if seg is not None:
        Image.fromarray(seg.astype(np.uint8)).save(root / split / "seg" / f"{stem}.png")
    if depth is not None:
        Image.fromarray(np.round(depth * 256).astype(np.uint16)).save(root / split / "depth" / f"{stem}.png")


def _aligned(root: Path) -> None:
    """Images whose red channel encodes the labels in 6 px blocks (bilinear resizing leaves block
    interiors alone): class k has red 40 + 60 k and stands at (4 + 6 k) m. "a" has both labels,
    "b" only seg, "c" only depth."""
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for stem, has in (("a", "sd"), ("b", "s"), ("c", "d")):
            cls = np.kron(rng.integers(0, 4, (5, 7)), np.ones((6, 6), int))[:30, :40]
            rgb = np.zeros((30, 40, 3), np.uint8)
            rgb[..., 0] = 40 + 60 * cls
            seg = cls if "s" in has else None
            depth = (4.0 + 6.0 * cls) if "d" in has else None
            _write(root, split, stem, rgb, seg, depth)


def _raw(task, split: str = "train") -> dict[str, np.ndarray]:
    units = task.source(split).units
    return {k: np.array([u[k] for u in units]) for k in units[0]}


def test_image_and_every_label_get_the_same_crop_and_flip(tmp_path):
    root = tmp_path / "mh"
    _aligned(root)
    task = _task(root, input_size=30)
    task.check_data()
    raw = _raw(task)
    assert [Path(p).stem for p in raw["image"]] == ["a", "b", "c"]
    for seed in range(8):
        out = task.preprocess(raw, train=True, seed=seed)
        assert out["has_seg"].tolist() == [True, True, False]
        assert out["has_depth"].tolist() == [True, False, True]
        assert (out["label_seg"][2] == 255).all() and (out["label_depth"][1] == 0).all()
        red = out["image"][:, 0].astype(np.float64)  # uint8: normalised on the device
        cls_from_image = np.round((red - 40) / 60)
        for i in (0, 1):
            agree = (cls_from_image[i] == out["label_seg"][i]).mean()
            mirrored = (cls_from_image[i][:, ::-1] == out["label_seg"][i]).mean()
            assert agree > 0.8 and agree > mirrored + 0.2, (seed, i, agree, mirrored)
        for i in (0, 2):
            depth_from_image = 4.0 + 6.0 * cls_from_image[i]
            agree = np.isclose(depth_from_image, out["label_depth"][i]).mean()
            mirrored = np.isclose(depth_from_image[:, ::-1], out["label_depth"][i]).mean()
            assert agree > 0.8 and agree > mirrored + 0.2, (seed, i, agree, mirrored)
        # Labels are resized with NEAREST: only values of the original maps, never blends.
        assert set(np.unique(out["label_seg"][:2]).tolist()) <= {0, 1, 2, 3}
        assert set(np.unique(out["label_depth"][[0, 2]]).tolist()) <= {4.0, 10.0, 16.0, 22.0}

    # "a"'s augmentation does not depend on which of its labels exist.
    before = task.preprocess(raw, train=True, seed=1)
    (root / "train" / "depth" / "a.png").unlink()
    raw = _raw(task)
    after = task.preprocess(raw, train=True, seed=1)
    assert not after["has_depth"][0] and (after["label_depth"][0] == 0).all()
    np.testing.assert_array_equal(after["label_seg"][0], before["label_seg"][0])
    np.testing.assert_array_equal(after["image"][0], before["image"][0])

    # Evaluation: the whole image resized, no crop and no flip.
    out = task.preprocess(_raw(task, "val"), train=False, seed=0)
    seg = Image.open(root / "val" / "seg" / "a.png").resize((30, 30), Image.NEAREST)
    np.testing.assert_array_equal(out["label_seg"][0], np.asarray(seg))


@pytest.mark.parametrize(
    "case, culprit",
    [
        ("no_images", "holds no images"),
        ("no_head_dir", "val/depth"),
        ("unlabelled", "train/images/b.png"),
        ("head_without_labels", "train/seg"),
        ("eight_bit_depth", "val/depth/c.png"),
        ("bad_crop", "tasks.mh.crop_scale"),
        ("bad_head_config", "tasks.mh.heads.seg.num_classes"),
    ],
)
def test_check_data_names_the_culprit(tmp_path, case, culprit):
    root = tmp_path / "mh"
    _aligned(root)
    kw = {}
    if case == "no_images":
        for f in (root / "val" / "images").iterdir():
            f.unlink()
    elif case == "no_head_dir":
        for f in (root / "val" / "depth").iterdir():
            f.unlink()
        (root / "val" / "depth").rmdir()
    elif case == "unlabelled":
        (root / "train" / "seg" / "b.png").unlink()
    elif case == "head_without_labels":  # every image keeps a depth map
        for f in (root / "train" / "seg").iterdir():
            f.unlink()
        Image.fromarray(np.full((30, 40), 1024, np.uint16)).save(root / "train" / "depth" / "b.png")
    elif case == "eight_bit_depth":
        Image.new("L", (40, 30), 10).save(root / "val" / "depth" / "c.png")
    elif case == "bad_crop":
        kw["crop_scale"] = [0.0, 1.0]
    task = _task(root, **kw)
    if case == "bad_head_config":
        task.subs["seg"].cfg.num_classes = 0
    with pytest.raises((FileNotFoundError, BadSampleError, ValueError)) as err:
        task.check_data()
    assert culprit in str(err.value), str(err.value)
    if case == "unlabelled":
        assert "no label for any head" in str(err.value)


@pytest.mark.parametrize(
    "heads, culprit",
    [
        ({}, "tasks.mh.heads"),
        ({"seg": {"type": "detection"}}, "tasks.mh.heads.seg.type"),
        (
            {"seg": {"type": "segmentation", "num_classes": 4, "input_size": 64}},
            "tasks.mh.heads.seg.input_size",
        ),
        (
            {"seg": {"type": "segmentation", "num_classes": 4, "train_labels": "x"}},
            "tasks.mh.heads.seg.train_labels",
        ),
        (
            {"seg": {"type": "segmentation", "num_classes": 4, "head_chanels": 8}},
            "tasks.mh.heads.seg.head_chanels",
        ),
        ({"images": {"type": "depth"}}, "tasks.mh.heads.images"),
        ({"a/b": {"type": "depth"}}, "tasks.mh.heads.a/b"),
    ],
)
def test_config_errors_name_the_dotted_key(heads, culprit):
    with pytest.raises(ConfigError) as err:
        build_task("mh", {"type": "multihead", "heads": heads})
    assert culprit in str(err.value), str(err.value)


def test_head_config_reaches_the_sub_tasks():
    task = _task("/data", depth_weight=0.5, batch_size=6, input_size=48)
    seg, depth = task.subs["seg"], task.subs["depth"]
    assert (seg.cfg.num_classes, seg.cfg.head, seg.cfg.input_size, seg.cfg.batch_size) == (4, "simple", 48, 6)
    assert (depth.cfg.max_depth, depth.cfg.loss_weight, depth.cfg.data_root) == (24.0, 0.5, "/data")
    assert task.class_names() == [f"class {i}" for i in range(4)]  # the depth head has no classes
