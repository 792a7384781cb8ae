"""Segmentation at MMSegmentation's protocol: mIoU at the labels' original resolution (held to
torchmetrics), the evaluation's ragged batches and padding, sliding windows, and the training
pipeline's geometry (RandomResize, RandomCrop with cat_max_ratio, flip, padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from gppf.api.registry import build_task
from gppf.io.batches import collate_numpy
from task_plugins.segmentation import transforms as T
from task_plugins.segmentation.task import MIoUEvaluator

N_CLASSES, IGNORE = 4, 255
SIZES = [(97, 61), (50, 83), (120, 40)]  # (w, h): non-square, all different


def _label(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Blocks of classes, one-pixel lines (lost by any downsampling) and a void border."""
    lbl = np.zeros((h, w), np.uint8)
    for _ in range(4):
        y, x = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        lbl[y : y + int(rng.integers(6, h // 2)), x : x + int(rng.integers(6, w // 2))] = rng.integers(1, 4)
    lbl[:, 7] = 3
    lbl[h // 2, :] = 2
    lbl[0, :] = IGNORE
    return lbl


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_protocol")
    rng = np.random.default_rng(0)
    labels = {}
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            lbl = _label(rng, w, h)
            img = np.stack([lbl * 60, rng.integers(0, 255, (h, w)), np.full((h, w), 128)], -1)
            Image.fromarray(img.astype(np.uint8)).save(root / split / "images" / f"{i}.png")
            Image.fromarray(lbl).save(root / split / "labels" / f"{i}.png")
            labels[(split, i)] = lbl
    return root, labels


def _task(root, **extra):
    entry = {"type": "segmentation", "data_root": str(root), "num_classes": N_CLASSES, "batch_size": 3}
    entry.update({"input_size": 32, "scale": [64, 32], **extra})
    return build_task("seg", entry)


def _eval_batch(task, root):
    units = task.source("val").units
    raw = {k: np.array([u[k] for u in units]) for k in ("image", "label")}
    return task.to_device(collate_numpy(task.preprocess(raw, False, 0)), torch.device("cpu"))


def _reference_miou(preds: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """torchmetrics' macro IoU (classes in neither labels nor predictions left out, as MMSeg's
    nanmean), as a fraction: it computes in float32, so compare fractions to 1e-6."""
    metric = MulticlassJaccardIndex(num_classes=N_CLASSES, ignore_index=IGNORE, average="macro")
    for p, g in zip(preds, labels):
        metric.update(torch.from_numpy(p).long().flatten(), torch.from_numpy(g).long().flatten())
    return float(metric.compute())


def _perfect_at_input(batch, net_labels):
    """A stand-in network: logits that are exactly the label at network resolution inside each
    image's own region of the padded batch, and confidently class 0 in the padding."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], N_CLASSES, *x.shape[-2:])
        out[:, 0] = 10.0
        for i, lbl in enumerate(net_labels):
            h, w = lbl.shape
            out[i, :, :h, :w] = 10.0 * F.one_hot(lbl.clamp(max=N_CLASSES - 1), N_CLASSES).permute(2, 0, 1)
        return out

    return forward


def test_miou_is_scored_at_the_original_resolution(layout):
    root, labels = layout
    task = _task(root)
    batch = _eval_batch(task, root)
    originals = [labels[("val", i)] for i in range(len(SIZES))]
    # Ragged: each label at its own original size, each image at its keep-ratio test size.
    assert [tuple(m.shape) for m in batch["mask"]] == [(h, w) for w, h in SIZES]
    test_sizes = [T.rescale_size(w, h, (64, 32))[::-1] for w, h in SIZES]
    assert batch["size"].tolist() == [list(s) for s in test_sizes]
    assert tuple(batch["image"].shape[-2:]) == (max(s[0] for s in test_sizes), max(s[1] for s in test_sizes))
    # The label seen at network resolution (what the old square protocol scored against).
    net_labels = [T.resize_label(torch.from_numpy(g).long(), s) for g, s in zip(originals, test_sizes)]
    forward = _perfect_at_input(batch, net_labels)

    ev = task.evaluator()
    ev.update(task.infer(forward, batch), batch)
    got = ev.compute()["mIoU"]

    # Independently: each image's network-resolution one-hot, bilinearly resized to its original
    # size (MMSeg's postprocessing), arg-max, scored by torchmetrics against the original label.
    preds = []
    for lbl, g in zip(net_labels, originals):
        onehot = F.one_hot(lbl.clamp(max=N_CLASSES - 1), N_CLASSES).permute(2, 0, 1)[None].float()
        up = F.interpolate(onehot, size=g.shape, mode="bilinear", align_corners=False)
        preds.append(up[0].argmax(0).numpy())
    assert got / 100 == pytest.approx(_reference_miou(preds, originals), abs=1e-6)
    assert got < 100.0  # perfect at network resolution, not at the original one

    at_input = MIoUEvaluator(N_CLASSES, IGNORE)  # the old protocol: scored on the resized labels
    for lbl in net_labels:
        at_input.update(F.one_hot(lbl.clamp(max=3), 4).permute(2, 0, 1)[None].float(), {"mask": lbl[None]})
    assert at_input.compute()["mIoU"] == pytest.approx(100.0)


def test_evaluator_equals_torchmetrics_on_ragged_predictions():
    rng = np.random.default_rng(1)
    labels = [_label(rng, w, h) for w, h in SIZES]
    logits = [torch.randn(N_CLASSES, h, w) for w, h in SIZES]
    ev = MIoUEvaluator(N_CLASSES, IGNORE)
    for lg, g in zip(logits, labels):  # one image a batch, no padding
        ev.update(lg[None], {"mask": [torch.from_numpy(g).long()]})
    ref = _reference_miou([lg.argmax(0).numpy() for lg in logits], labels)
    assert ev.compute()["mIoU"] / 100 == pytest.approx(ref, abs=1e-6)


def test_sliding_window_inference_averages_overlapping_windows(layout):
    root, _ = layout
    task = _task(root, eval_mode="slide", slide_stride=20)
    batch = _eval_batch(task, root)
    h, w = batch["image"].shape[-2:]
    windows = T.slide_windows(h, w, 32, 20)
    assert all(y1 - y0 == min(32, h) and x1 - x0 == min(32, w) for y0, y1, x0, x1 in windows)
    assert {y1 for _, y1, _, _ in windows} >= {h} and {x1 for _, _, _, x1 in windows} >= {w}
    calls = []

    def forward(x):  # the window's own offset as its logit: the average tells them apart
        calls.append(tuple(x.shape[-2:]))
        return torch.full((x.shape[0], N_CLASSES, *x.shape[-2:]), float(len(calls)))

    out = task.infer(forward, batch)
    count = torch.zeros(h, w)
    total = torch.zeros(h, w)
    for k, (y0, y1, x0, x1) in enumerate(windows):
        count[y0:y1, x0:x1] += 1
        total[y0:y1, x0:x1] += k + 1
    assert len(calls) == len(windows) and out.shape[-2:] == (h, w)
    assert torch.allclose(out[0, 0], total / count)


def test_training_pipeline_geometry_follows_mmseg(layout):
    root, labels = layout
    # RandomResize: the target scale is scale x a ratio drawn from ratio_range (then the
    # keep-ratio resize under it); the ratio is uniform over the range.
    rng = np.random.default_rng(7)
    ratios = []
    for _ in range(200):
        long, short = T.random_scale(rng, (64, 32), (0.5, 2.0))
        assert 16 <= short <= 64 and long in (2 * short, 2 * short + 1)
        ratios.append(short / 32)
    assert min(ratios) < 0.6 and max(ratios) > 1.9
    for w, h in SIZES:
        nw, nh = T.rescale_size(w, h, (128, 48))
        assert (max(nw, nh) <= 128 and min(nw, nh) <= 48) and (max(nw, nh) == 128 or min(nw, nh) == 48)

    # A fixed ratio 0.5 and flip always: the whole resized image is the crop, flipped, then
    # padded to input_size with ignore (label) and the mean colour (image), as MMSeg pads.
    task = _task(root, ratio_range=[0.5, 0.5], flip_prob=1.0, photometric=False, cat_max_ratio=1.0)
    units = task.source("train").units
    raw = {k: np.array([u[k] for u in units]) for k in ("image", "label")}
    out = task.preprocess(raw, True, seed=3)
    assert out["image"].shape == (3, 3, 32, 32) and out["mask"].shape == (3, 32, 32)
    for i, (w, h) in enumerate(SIZES):
        nw, nh = T.rescale_size(w, h, (32, 16))
        expected = np.full((32, 32), IGNORE)
        expected[:nh, :nw] = T.resize_label(torch.from_numpy(labels[("train", i)]), (nh, nw)).flip(-1).numpy()
        assert np.array_equal(out["mask"][i], expected)
        assert (out["image"][i][:, nh:, :] == np.array([124, 116, 104])[:, None, None]).all()

    # With ratio 2 the image is larger than the crop: a 32 x 32 crop of classes the label has.
    task = _task(root, ratio_range=[2.0, 2.0], photometric=False)
    out = task.preprocess(raw, True, seed=3)
    for i in range(len(SIZES)):
        assert (out["mask"][i] != IGNORE).sum() > 0
        assert set(np.unique(out["mask"][i])) <= set(np.unique(labels[("train", i)]))

    # RandomCrop's cat_max_ratio: a crop where one class covers >= 0.75 is drawn again (up to
    # ten times): on a label of class 0 but for a stripe, a plain crop holds > 1/4 stripe with
    # probability 22/69, a crop with redraws 1 - (47/69)^11 = 98.6 %.
    lbl = np.zeros((100, 100), np.int64)
    lbl[:, 70:] = 1
    rng = np.random.default_rng(0)
    boxes = [T.crop_box(rng, lbl, 32, 0.75, IGNORE) for _ in range(200)]
    assert all(y1 - y0 == 32 and x1 - x0 == 32 for y0, y1, x0, x1 in boxes)
    passing = [b for b in boxes if (lbl[b[0] : b[1], b[2] : b[3]] == 1).mean() > 0.25]
    plain = [T.crop_box(rng, lbl, 32, 1.0, IGNORE) for _ in range(200)]  # cat_max_ratio 1: off
    plain_passing = [b for b in plain if (lbl[b[0] : b[1], b[2] : b[3]] == 1).mean() > 0.25]
    assert len(passing) > 180 and len(plain_passing) < 100
    # Ignored pixels do not count as a class: a crop that is class 0 and void is redrawn too.
    void = np.full((100, 100), IGNORE)
    void[:, :50] = 0
    assert T.crop_box(np.random.default_rng(0), void, 32, 0.75, IGNORE)[3] <= 100
    # A side smaller than the crop is taken whole.
    y0, y1, x0, x1 = T.crop_box(np.random.default_rng(0), np.zeros((20, 40), np.int64), 32, 1.0, IGNORE)
    assert (y0, y1) == (0, 20) and x1 - x0 == 32


def test_photometric_distortion_keeps_shape_and_changes_colours():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    outs = [T.photometric_distortion(np.random.default_rng(s), img) for s in range(20)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, img) for o in outs) >= 15  # 1 - 1/16 of draws change something
    # The HSV round trip in OpenCV's 8-bit ranges (hue in 180 steps) loses a few levels at most.
    assert np.abs(T._rgb(T._hsv(img)).astype(int) - img).max() <= 5
