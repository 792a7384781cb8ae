"""The depth task (task_plugins/depth.py): Eigen metrics against hand-computed values and summed
across workers, KITTI uint16 PNGs read as metres with no interpolated depth after augmentation,
the SILog loss, check_data's errors, and a short 2-worker run on the demo data whose RMSE falls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import task_plugins  # noqa: F401
from gppf.api.registry import build_task
from gppf.config.job import BackboneConfig, JobConfig, OptimConfig, ScalingConfig, StreamConfig, TrainConfig
from gppf.io.images import BadSampleError
from gppf.launch.fit import fit
from task_plugins.depth import METRICS, DepthEvaluator, silog_loss
from tests.tasks_for_tests import task_entries

# Two 2x3 images. 0 = no measurement; 100 m is above max_depth_eval (80): both are ignored.
GT = np.array(
    [
        [[0.0, 10.0, 20.0], [5.0, 100.0, 40.0]],
        [[2.0, 0.0, 8.0], [16.0, 4.0, 0.0]],
    ]
)
# 90 m is clipped to 80 and 1e-5 m to min_depth_eval (1e-3) before the metrics, as BTS's eval does.
PRED = np.array(
    [
        [[3.0, 12.0, 18.0], [5.0, 50.0, 90.0]],
        [[2.2, 7.0, 9.0], [10.0, 1e-5, 3.0]],
    ]
)


def _expected(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Eigen's metrics by hand, per image, then the mean over images."""
    per_image = []
    for p, g in zip(pred, gt):
        keep = (g > 1e-3) & (g < 80.0)
        p, g = np.clip(p[keep], 1e-3, 80.0), g[keep]
        ratio = np.maximum(g / p, p / g)
        err = np.log(p) - np.log(g)
        per_image.append(
            {
                "d1": np.mean(ratio < 1.25),
                "d2": np.mean(ratio < 1.25**2),
                "d3": np.mean(ratio < 1.25**3),
                "abs_rel": np.mean(np.abs(g - p) / g),
                "sq_rel": np.mean((g - p) ** 2 / g),
                "rmse": np.sqrt(np.mean((g - p) ** 2)),
                "rmse_log": np.sqrt(np.mean(err**2)),
                "log10": np.mean(np.abs(np.log10(g) - np.log10(p))),
                "silog": np.sqrt(np.mean(err**2) - np.mean(err) ** 2) * 100,
            }
        )
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


def _update(ev: DepthEvaluator, idx: list[int]) -> None:
    outputs = torch.tensor(PRED[idx], dtype=torch.float32)[:, None]  # [B, 1, H, W], as the head gives
    ev.update(outputs, {"depth": torch.tensor(GT[idx], dtype=torch.float32)})


def test_metrics_match_hand_computed_values_and_sum_across_workers():
    expected = _expected(PRED.astype(np.float32).astype(np.float64), GT)
    # Spot-check the hand computation: image 0's valid (gt, clipped pred) pairs are (10, 12) (20, 18)
    # (5, 5) (40, 80): 3 of 4 within 1.25; image 1's (2, 2.2) (8, 9) (16, 10) (4, 1e-3): 2 of 4.
    assert expected["d1"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert set(expected) == set(METRICS)

    both = DepthEvaluator(1e-3, 80.0)
    _update(both, [0, 1])
    got = both.compute()
    assert DepthEvaluator.primary == "rmse"
    for k in METRICS:
        assert got[k] == pytest.approx(expected[k], rel=1e-6), k

    # Two workers, one image each: the summed states give the single evaluator's result.
    a, b = DepthEvaluator(1e-3, 80.0), DepthEvaluator(1e-3, 80.0)
    _update(a, [0])
    _update(b, [1])
    merged = DepthEvaluator(1e-3, 80.0)
    merged.load_state(a.state() + b.state())
    assert merged.state()[-1].item() == 2  # image count
    for k in METRICS:
        assert merged.compute()[k] == pytest.approx(got[k], rel=1e-12), k

    # An image with no measurement in range does not count; no image at all gives NaN, not an error.
    empty = DepthEvaluator(1e-3, 80.0)
    empty.update(torch.ones(1, 1, 2, 3), {"depth": torch.tensor([[[0.0, 0.0, 90.0], [0.0, 0.0, 0.0]]])})
    assert empty.state()[-1].item() == 0 and np.isnan(empty.compute()["rmse"])


def test_silog_loss():
    gt = torch.tensor([[[0.0, 10.0, 20.0], [5.0, 0.0, 40.0]]])
    valid = gt > 0
    pred = gt.clone().clamp(min=1.0).requires_grad_(True)
    loss = silog_loss(pred, gt, 0.85)
    loss.backward()
    assert loss.item() < 1e-4  # 10 * sqrt(1e-12): the clamp that keeps the gradient finite
    assert torch.isfinite(pred.grad).all()

    # Scale invariance at lambda = 1; at lambda < 1 a scale error costs 10 * sqrt(1 - lambda) * |log c|.
    scaled = gt * 3.0
    assert silog_loss(scaled, gt, 1.0).item() < 1e-4
    assert silog_loss(scaled, gt, 0.85).item() == pytest.approx(10 * np.sqrt(0.15) * np.log(3.0), rel=1e-5)

    # Invalid pixels (gt = 0) do not matter, whatever is predicted there (0 included: no log(0)).
    noisy = torch.tensor([[[7.0, 11.0, 19.0], [6.0, 2.0, 35.0]]])
    other = torch.where(valid, noisy, torch.tensor([0.0, 0.0, 0.0]))
    assert silog_loss(noisy, gt, 0.85).item() == pytest.approx(silog_loss(other, gt, 0.85).item(), rel=1e-6)
    d = torch.log(noisy[valid]) - torch.log(gt[valid])
    by_hand = 10 * torch.sqrt((d**2).mean() - 0.85 * d.mean() ** 2)
    assert silog_loss(noisy, gt, 0.85).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # [B, 1, h, w] predictions at another size are resized to the ground truth.
    assert torch.isfinite(silog_loss(torch.full((1, 1, 4, 6), 9.0), gt, 0.85))

    # No valid pixel: exactly 0, and backward still runs.
    out = torch.full((1, 1, 2, 3), 5.0, requires_grad=True)
    zero = silog_loss(out, torch.zeros(1, 2, 3), 0.85)
    assert zero.item() == 0.0
    zero.backward()
    assert out.grad is not None and (out.grad == 0).all()


def _write_pair(root: Path, split: str, stem: str, depth: np.ndarray, size=None, rgb=None) -> None:
    h, w = depth.shape
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "depth").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem))
    img = rgb if rgb is not None else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).resize(size or (w, h)).save(root / split / "images" / f"{stem}.png")
    Image.fromarray(np.round(depth * 256).astype(np.uint16)).save(root / split / "depth" / f"{stem}.png")


def _sparse_depth(seed: int, h: int = 30, w: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = np.round(rng.uniform(1.0, 79.0, (h, w)) * 256) / 256  # what a uint16 PNG can hold
    depth[rng.random((h, w)) < 0.6] = 0.0
    return depth.astype(np.float32)


def _dataset(root: Path, w: int = 40) -> Path:
    for split in ("train", "val"):
        for i in range(2):
            _write_pair(root, split, f"{i:03d}", _sparse_depth(i, w=w))
    return root


def _task(root: Path, **kw):
    return build_task("depth", {"type": "depth", "data_root": str(root), "batch_size": 2, **kw})


def test_depth_png_reads_as_metres_and_augmentation_never_interpolates(tmp_path):
    root = _dataset(tmp_path / "d", w=30)
    depth = _sparse_depth(0, w=30)
    png = Image.open(root / "train" / "depth" / "000.png")
    assert png.mode.startswith("I") and np.asarray(png).max() > 255  # really 16-bit
    task = _task(root, input_size=30)
    task.check_data()
    units = task.source("train").units
    batch = {k: np.array([u[k] for u in units]) for k in ("image", "depth")}

    # At its own size, evaluation reads the PNG as metres, 0 where nothing was measured.
    out = task.preprocess(batch, train=False, seed=0)
    assert out["depth"].dtype == np.float32 and out["depth"].shape == (2, 30, 30)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (2, 3, 30, 30)
    np.testing.assert_array_equal(out["depth"][0], depth)

    # Train crops and flips, up- and downsampled: only measured values or 0, never a blend of them.
    measured = set(np.unique(depth).tolist())
    for size in (16, 64):
        task = _task(root, input_size=size)
        for seed in range(6):
            d = task.preprocess(batch, train=True, seed=seed)["depth"][0]
            assert set(np.unique(d).tolist()) <= measured, (size, seed)
            assert 0.3 < (d == 0).mean() < 0.9  # still sparse


def test_image_and_depth_get_the_same_crop_and_flip(tmp_path):
    """A depth map equal to the image's red channel (6 px blocks of random values, so bilinear
    resizing leaves block interiors alone) stays aligned with it through crops and flips."""
    root = tmp_path / "d"
    rng = np.random.default_rng(3)
    red = np.kron(rng.integers(1, 80, (5, 7)), np.ones((6, 6)))[:30, :40].astype(np.float32)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0] = red
    for split in ("train", "val"):
        _write_pair(root, split, "000", red, rgb=rgb)
    task = _task(root, input_size=30)
    units = task.source("train").units
    batch = {k: np.array([u[k] for u in units]) for k in ("image", "depth")}
    for seed in range(6):  # about half of them flip
        out = task.preprocess(batch, train=True, seed=seed)
        img_red = out["image"][0, 0].astype(np.float64)  # uint8: normalised on the device
        agree = np.isclose(img_red, out["depth"][0], atol=1.5).mean()
        mirrored = np.isclose(img_red[:, ::-1], out["depth"][0], atol=1.5).mean()
        assert agree > 0.5 and agree > 2 * mirrored, (seed, agree, mirrored)


@pytest.mark.parametrize(
    "case, culprit",
    [
        ("no_depth_dir", "val/depth"),
        ("missing_png", "train/images/001.png"),
        ("eight_bit", "train/depth/000.png"),
        ("rgb", "val/depth/001.png"),
        ("size", "train/depth/001.png"),
        ("list", "train.txt"),
    ],
)
def test_check_data_names_the_file_at_fault(tmp_path, case, culprit):
    root = _dataset(tmp_path / "d")
    kw = {}
    if case == "no_depth_dir":
        for f in (root / "val" / "depth").iterdir():
            f.unlink()
        (root / "val" / "depth").rmdir()
    elif case == "missing_png":
        (root / "train" / "depth" / "001.png").unlink()
    elif case == "eight_bit":
        Image.new("L", (40, 30), 10).save(root / "train" / "depth" / "000.png")
    elif case == "rgb":
        Image.new("RGB", (40, 30)).save(root / "val" / "depth" / "001.png")
    elif case == "size":
        _write_pair(root, "train", "001", _sparse_depth(1), size=(41, 30))
    elif case == "list":
        kw["train_list"] = "train.txt"
    with pytest.raises((FileNotFoundError, BadSampleError)) as err:
        _task(root, **kw).check_data()
    assert culprit in str(err.value), str(err.value)


def test_depth_trains_on_demo_data_and_rmse_falls(demo_root, ray_session, tmp_path):
    """24 steps on 2 workers. The untrained head predicts ~40 m everywhere (sigmoid x 80) where the
    demo's measurements are mostly 2-10 m: step 0's RMSE is ~44 m, 40 steps at 48 px gave ~8 m."""
    entry = {**task_entries(demo_root)["depth"], "batch_size": 8, "input_size": 32}
    cfg = JobConfig(
        name="depth",
        run_dir=str(tmp_path),
        tasks={"depth": entry},
        backbone=BackboneConfig(name="resnet10t"),
        optim=OptimConfig(lr=0.02, warmup_steps=5),
        train=TrainConfig(steps=24, log_every=12, checkpoint_every=0, eval_max_batches=1),
        data=StreamConfig(min_rows_per_pass=32, chunk_rows=32),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=0.5),
    )
    out = fit(cfg)
    before, after = out["initial_eval"]["depth"], out["final_eval"]["depth"]
    assert out["step"] == 24
    assert after["rmse"] < before["rmse"], (before, after)
    assert after["d1"] > before["d1"], (before, after)
