"""Data path: a task's training stream (gppf.data.stream.TaskStream) against a torch DataLoader
running the same `task.preprocess` on the same files with the same number of decode CPUs.

    python -m benchmarks.data_path [--cpus 1 2] [--rounds 2] [--only cls|det] [--json out.json]

Two workloads: classification at 224 px (ImageNet-like 500x375 JPEGs, the plugin's RandomResizedCrop
and flip, batch 64) and detection at 1024 px (640x480 JPEGs with 4-8 polygon objects each, LSJ and
copy-paste with masks, batch 8). For each number of decode CPUs k:

- DataLoader: `num_workers=k`, one item = one batch (`preprocess` of 64 rows, as the stream calls
  it), tensors back through shared memory.
- stream: `data.cpus_per_task=1` on a local Ray with `num_cpus=k` and nothing else on it, so at
  most k decode tasks run at once.

Both are timed over the same window (after a warm-up that starts the workers), consuming batches
as fast as they come. Images/s is the window's images over its wall time; CPU efficiency is the
window's images over the CPU seconds the whole machine spent in it (/proc/stat: decode workers,
Ray's daemons and the consumer alike), so Ray's own overheads count against the stream. The
ratios printed are DataLoader ÷ stream, so > 1 means the stream is slower: the median over rounds
of each round's ratio (the two variants alternate, seconds apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DATA = Path(os.environ.get("GPPF_BENCH_DATA", "/tmp/gppf_bench_data"))
WORKLOADS = {
    # name: (images, batch size, warm-up batches, timed batches)
    "cls": (2560, 64, 6, 32),
    "det": (320, 8, 4, 32),
}


# -- data ----------------------------------------------------------------------------------------
def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random image with noise: JPEG sizes and decode times like a photo's (~60 KB)."""
    small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def classification_data(n: int) -> Path:
    root = DATA / f"cls_{n}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 10)):
        for i in range(count):
            d = root / split / f"class{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            _photo(rng, 500, 375).save(d / f"{i:05d}.jpg", quality=90)
    (root / "done").touch()
    return root


def detection_data(n: int) -> Path:
    from pycocotools import mask as mask_utils

    from gppf.data.demo import DET_CATEGORIES, shape_polygon

    root = DATA / f"det_{n}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(1)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count in (("train2017", n), ("val2017", 4)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(count):
            w, h = 640, 480
            img = _photo(rng, w, h)
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(4, 9))):
                s = int(rng.integers(40, 200))
                x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
                k = int(rng.integers(0, len(DET_CATEGORIES)))
                cat, shape = DET_CATEGORIES[k]
                poly = shape_polygon(shape, (x0, y0, x0 + s, y0 + s))
                draw.polygon(
                    list(zip(poly[::2], poly[1::2])), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
                )
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
                x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": i + 1,
                        "category_id": cat,
                        "segmentation": [poly],
                        "area": float(mask_utils.area(rle)),
                        "bbox": [x, y, bw, bh],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
            name = f"{i + 1:012d}.jpg"
            img.save(root / split / name, quality=90)
            images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        cats = [{"id": c, "name": n, "supercategory": "shape"} for c, n in DET_CATEGORIES]
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    (root / "done").touch()
    return root


def build(workload: str):
    import task_plugins  # noqa: F401  (registers the bundled plugins)
    from gppf.api.registry import build_task

    n, bs, _, _ = WORKLOADS[workload]
    if workload == "cls":
        entry = {"type": "classification", "data_root": str(classification_data(n)), "input_size": 224}
    else:
        entry = {"type": "detection", "data_root": str(detection_data(n)), "input_size": 1024}
    task = build_task(workload, {**entry, "batch_size": bs})
    task.check_data()
    return task


# -- measuring -----------------------------------------------------------------------------------
def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _timed(next_batch, warmup: int, timed: int, bs: int) -> dict[str, float]:
    for _ in range(warmup):
        next_batch()
    t0, c0 = time.perf_counter(), _busy_seconds()
    for _ in range(timed):
        next_batch()
    wall, cpu = time.perf_counter() - t0, _busy_seconds() - c0
    return {"images_s": timed * bs / wall, "images_per_cpu_s": timed * bs / max(cpu, 1e-9)}


class _Batches:
    """The DataLoader's dataset: item i is `preprocess` of the i-th batch of the train units."""

    def __init__(self, task, bs: int):
        from gppf.data.subsets import train_source

        units = train_source(task).units
        self.task, self.batches = task, [units[i : i + bs] for i in range(0, len(units) - bs + 1, bs)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        from gppf.data.stream import item_rows
        from gppf.io.batches import collate_numpy

        return collate_numpy(self.task.preprocess(item_rows(self.batches[i]), train=True, seed=i))


def dataloader(task, cpus: int, workload: str) -> dict[str, float]:
    import torch

    _, bs, warmup, timed = WORKLOADS[workload]
    # forkserver: Ray runs in this process, and its threads do not survive a fork
    loader = torch.utils.data.DataLoader(
        _Batches(task, bs),
        batch_size=None,
        num_workers=cpus,
        prefetch_factor=2,
        multiprocessing_context="forkserver",
    )
    it = iter(loader)
    return _timed(lambda: next(it), warmup, timed, bs)


def stream(task, cpus: int, workload: str) -> dict[str, float]:
    from gppf.config.job import StreamConfig
    from gppf.data.stream import TaskStream

    _, bs, warmup, timed = WORKLOADS[workload]
    s = TaskStream(task, seed=0, rank=0, world=1, cfg=StreamConfig(cpus_per_task=1.0))
    try:
        return _timed(lambda: s.next(), warmup, timed, bs)
    finally:
        s.close()


def compare(task, workload: str, cpus: int, rounds: int) -> dict[str, dict[str, float]]:
    """Both variants, alternating, `rounds` times, on one local Ray with `cpus` CPUs (idle while
    the DataLoader runs, as it would be beside one); medians, and the medians of each round's
    DataLoader ÷ stream ratios (pairs measured seconds apart see the same machine)."""
    import ray

    from gppf.dist.ray_env import local_system_config

    ray.init(
        num_cpus=cpus, include_dashboard=False, configure_logging=False, _system_config=local_system_config()
    )
    runs: dict[str, list[dict[str, float]]] = {"dataloader": [], "stream": []}
    try:
        for r in range(rounds):
            for name, fn in (("dataloader", dataloader), ("stream", stream)):
                runs[name].append(fn(task, cpus, workload))
                time.sleep(1.0)  # cancelled decode tasks wind down
            shown = "  ".join(f"{n} {v[-1]['images_s']:.1f} img/s" for n, v in runs.items())
            print(f"[{workload} k={cpus} round {r}] {shown}", flush=True)
    finally:
        ray.shutdown()
    med = {n: {m: statistics.median(x[m] for x in v) for m in v[0]} for n, v in runs.items()}
    med["ratio"] = {
        m: statistics.median(d[m] / s[m] for d, s in zip(runs["dataloader"], runs["stream"]))
        for m in runs["stream"][0]
    }
    return med


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=list(WORKLOADS), nargs="+", default=list(WORKLOADS))
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    results: dict = {}
    for workload in args.only:
        task = build(workload)
        for k in args.cpus:
            results[f"{workload}/{k}"] = compare(task, workload, k, args.rounds)
    print()
    print("| workload | decode CPUs | img/s DataLoader / stream | ratio | img/CPU-s DL / stream | ratio |")
    print("|---|---|---|---|---|---|")
    for key, med in results.items():
        workload, k = key.split("/")
        dl, st, r = med["dataloader"], med["stream"], med["ratio"]
        print(
            f"| {workload} | {k} | {dl['images_s']:.1f} / {st['images_s']:.1f} | {r['images_s']:.3f} "
            f"| {dl['images_per_cpu_s']:.1f} / {st['images_per_cpu_s']:.1f} | {r['images_per_cpu_s']:.3f} |"
        )
    for workload in args.only:
        if f"{workload}/1" in results and f"{workload}/2" in results:
            s1, s2 = (results[f"{workload}/{k}"]["stream"]["images_s"] for k in (1, 2))
            print(f"{workload}: stream at 2 CPUs ÷ at 1 CPU = {s2 / s1:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
