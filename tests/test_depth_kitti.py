"""KITTI depth as BTS evaluates the Eigen split: BTS's split files, the benchmark crop, training
crops at the original resolution, and evaluation at the ground truth's original size inside
Garg's crop, against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gppf.api.registry import build_task
from gppf.io.batches import collate_numpy
from task_plugins.depth import eval_crop_mask

FRAMES = {"0000000005": (60, 200), "0000000010": (58, 190)}  # (h, w): non-square, different
KB = (48, 192)


def test_garg_and_eigen_crops_are_bts_fractions_of_a_kitti_frame():
    garg = eval_crop_mask(375, 1242, "garg")
    rows, cols = garg.any(1).nonzero().flatten(), garg.any(0).nonzero().flatten()
    # int(0.40810811 * 375) = 153 .. int(0.99189189 * 375) = 371, int(0.03594771 * 1242) = 44 .. 1197
    assert (rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1) == (
        153,
        371,
        44,
        1197,
    )
    eigen = eval_crop_mask(375, 1242, "eigen")
    assert eigen.any(1).nonzero().min().item() == 124 and eigen.any(1).nonzero().max().item() + 1 == 342
    assert eval_crop_mask(4, 5, "").all()


def _layout(root):
    rng = np.random.default_rng(0)
    gts = {}
    for split in ("train", "val"):
        lines = []
        for stem, (h, w) in FRAMES.items():
            img_rel = f"2011_09_26/drive_{split}_sync/image_02/data/{stem}.png"
            gt_rel = f"drive_{split}_sync/proj_depth/groundtruth/image_02/{stem}.png"
            (root / "raw" / img_rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "gt" / gt_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(root / "raw" / img_rel)
            depth = rng.uniform(2.0, 60.0, (h, w)).astype(np.float32)
            depth[rng.random((h, w)) < 0.5] = 0.0  # sparse, like projected LiDAR
            png = np.round(depth * 256).astype(np.uint16)
            Image.fromarray(png).save(root / "gt" / gt_rel)
            gts[(split, stem)] = png.astype(np.float32) / 256
            lines.append(f"{img_rel} {gt_rel} 721.5377")
        lines.append("2011_09_26/drive_0001_sync/image_02/data/0000000099.png None 721.5377")
        (root / f"eigen_{split}_files.txt").write_text("\n".join(lines) + "\n")
    return gts


def _task(root, **extra):
    entry = {
        "type": "depth",
        "data_root": str(root),
        "batch_size": 2,
        "train_images": "raw",
        "val_images": "raw",
        "train_depth": "gt",
        "val_depth": "gt",
        "train_list": "eigen_train_files.txt",
        "val_list": "eigen_val_files.txt",
        "list_format": "bts",
        "crop_size": [32, 96],
        "kb_crop": list(KB),
        "eval_crop": "garg",
    }
    return build_task("kitti", {**entry, **extra})


def _hand_metrics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """abs_rel, sq_rel, rmse, d1 per image over its valid pixels, averaged over images."""
    per = []
    for pred, gt in pairs:
        per.append(
            {
                "abs_rel": np.mean(np.abs(gt - pred) / gt),
                "sq_rel": np.mean((gt - pred) ** 2 / gt),
                "rmse": np.sqrt(np.mean((gt - pred) ** 2)),
                "d1": np.mean(np.maximum(gt / pred, pred / gt) < 1.25),
            }
        )
    return {k: float(np.mean([p[k] for p in per])) for k in per[0]}


def test_evaluation_at_the_original_resolution_inside_garg_crop(tmp_path):
    gts = _layout(tmp_path)
    task = _task(tmp_path)
    task.check_data()
    units = task.source("val").units
    assert len(units) == 2  # the "None" line is left out, as bts_eval.py does
    raw = {k: np.array([u[k] for u in units]) for k in ("image", "depth")}
    batch = task.to_device(collate_numpy(task.preprocess(raw, train=False, seed=0)), torch.device("cpu"))
    originals = [gts[("val", stem)] for stem in FRAMES]
    # Ground truth at its original size; the network input is each frame's benchmark crop, padded.
    assert [tuple(d.shape) for d in batch["depth"]] == [tuple(g.shape) for g in originals]
    crops = [(min(KB[0], h), min(KB[1], w)) for h, w in FRAMES.values()]
    assert batch["size"].tolist() == [list(c) for c in crops] and batch["image"].shape[-2:] == (64, 192)
    offsets = [(h - ch, (w - cw) // 2 if w > cw else 0) for (h, w), (ch, cw) in zip(FRAMES.values(), crops)]
    assert batch["offset"].tolist() == [list(o) for o in offsets]

    # A stand-in network: 1.1 x the true depth over each frame's own crop (5 m where there is no
    # measurement), nonsense (500 m) in the padding.
    pred = torch.full((2, 1, *batch["image"].shape[-2:]), 500.0)
    for i, (g, (ch, cw), (top, left)) in enumerate(zip(originals, crops, offsets)):
        region = torch.from_numpy(g[top : top + ch, left : left + cw])
        pred[i, 0, :ch, :cw] = torch.where(region > 0, 1.1 * region, torch.tensor(5.0))
    ev = task.evaluator()
    ev.update(pred, batch)
    got = ev.compute()

    # By hand: each prediction back in a zero frame of the ground truth's size (then clipped to
    # 1e-3), kept where 1e-3 < gt < 80 inside Garg's crop.
    pairs = []
    for i, (g, (ch, cw), (top, left)) in enumerate(zip(originals, crops, offsets)):
        frame = np.zeros_like(g, dtype=np.float64)
        frame[top : top + ch, left : left + cw] = pred[i, 0, :ch, :cw].numpy()
        frame = np.clip(frame, 1e-3, 80.0)
        h, w = g.shape
        keep = np.zeros_like(g, dtype=bool)
        keep[int(0.40810811 * h) : int(0.99189189 * h), int(0.03594771 * w) : int(0.96405229 * w)] = True
        keep &= (g > 1e-3) & (g < 80.0)
        pairs.append((frame[keep], g[keep].astype(np.float64)))
    expected = _hand_metrics(pairs)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
    assert got["abs_rel"] == pytest.approx(0.1, rel=1e-5) and got["d1"] == 1.0

    everywhere = _task(tmp_path, eval_crop="").evaluator()  # no crop: the rows above the
    everywhere.update(pred, batch)  # benchmark crop (predicted 0 -> 1e-3) count too
    assert everywhere.compute()["abs_rel"] > 2 * got["abs_rel"]


def test_training_crops_keep_the_original_resolution_and_never_interpolate_depth(tmp_path):
    gts = _layout(tmp_path)
    task = _task(tmp_path, rotate_degree=0.0)
    units = task.source("train").units
    raw = {k: np.array([u[k] for u in units]) for k in ("image", "depth")}
    out = task.preprocess(raw, train=True, seed=1)
    assert out["image"].shape == (2, 3, 32, 96) and out["depth"].shape == (2, 32, 96)  # non-square
    for i, stem in enumerate(FRAMES):
        values = set(np.unique(gts[("train", stem)]).tolist())
        assert set(np.unique(out["depth"][i]).tolist()) <= values  # real measurements or 0
        assert (out["depth"][i] > 0).mean() > 0.3
    rotated = _task(tmp_path, rotate_degree=1.0).preprocess(raw, train=True, seed=1)
    for i, stem in enumerate(FRAMES):  # NEAREST rotation: still only measured values (or 0)
        assert set(np.unique(rotated["depth"][i]).tolist()) <= set(
            np.unique(gts[("train", stem)]).tolist()
        ) | {0.0}


def test_bad_geometry_is_named(tmp_path):
    _layout(tmp_path)
    with pytest.raises(ValueError, match=r"tasks\.kitti\.eval_crop must be garg, eigen or empty"):
        _task(tmp_path, eval_crop="kitti").check_config()
    with pytest.raises(ValueError, match=r"kb_crop is KITTI's geometry: set crop_size too"):
        _task(tmp_path, crop_size=[]).check_config()
