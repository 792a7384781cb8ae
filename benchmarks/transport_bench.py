"""Object-store bytes per image of each demo task's preprocessed batches (README command 1's tasks).

    python benchmarks/transport_bench.py [--demo-root DIR] [--images 64]

Each task's train split goes through its own read + `pre` in Ray Data and is materialised: the
blocks' size (`Dataset.size_bytes()`) is what the object store holds. The same blocks with the
images cast to float32 and segmentation masks to int64 (what `pre` shipped before) are
materialised beside them, so the ratio is measured, not computed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _as_float32(batch: dict, keys: tuple[str, ...]) -> dict:
    import numpy as np
    import torch

    from gppf.io.images import normalize_images

    for k in keys:
        if k in batch and batch[k].dtype == np.uint8:
            batch[k] = normalize_images(torch.from_numpy(batch[k])).numpy()
    if "mask" in batch:  # segmentation's label maps were int64 too
        batch["mask"] = batch["mask"].astype(np.int64)
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-root", default=str(Path.home() / ".cache" / "gppf" / "demo_data"))
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()

    import ray

    import task_plugins  # noqa: F401
    from gppf.api.registry import build_task
    from gppf.config.job import StreamConfig
    from gppf.data.demo import generate
    from gppf.data.stream import build_dataset, configure_data_context
    from gppf.launch.fit import resolve
    from gppf.presets.gppf_r50 import demo_config

    if not Path(args.demo_root, "classification").is_dir():
        generate(args.demo_root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    configure_data_context(StreamConfig())
    cfg = resolve(demo_config(args.demo_root))  # num_classes etc. from the data
    print(f"object-store bytes per image, {args.images} training images per task")
    print(f"  {'task':<10} {'input':>9} {'uint8 (now)':>14} {'float32 (before)':>17} {'ratio':>7}")
    for name, entry in cfg.tasks.items():
        task = build_task(name, entry)
        src = task.source("train")
        units = src.units[: math.ceil(args.images / max(src.rows_per_unit, 1))]
        ds = build_dataset(task, src.read, units, True, 0, StreamConfig()).materialize()
        before = ds.map_batches(_as_float32, fn_kwargs={"keys": task.image_keys()}, batch_format="numpy")
        n = ds.count()
        now, old = ds.size_bytes() / n, before.materialize().size_bytes() / n
        size = task.cfg.input_size
        print(f"  {name:<10} {size:>6} px {now / 1024:>11.1f} KB {old / 1024:>14.1f} KB {old / now:>7.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
