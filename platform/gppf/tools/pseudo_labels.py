"""Pseudo-labels: a teacher checkpoint labels a directory of images for one task, in that task's
own on-disk format, so the output directory trains as an extra data root of the task
(`tasks.<name>.extra_train_roots`; VTD §4.3 / App. H.2, the self-training of LV-Adapter §3.2).

    python -m gppf.tools.pseudo_labels RUN/checkpoint_.../ --task seg --images /data/det/train2017 -o OUT

Inference is Ray Data batch inference: the image paths are a dataset, `map_batches` runs them
through a pool of actors that each load the teacher once. The task plugin decides what survives
and how it is written (`Task.pseudo_inputs`, `write_pseudo_labels`, `finish_pseudo_labels`):
segmentation keeps a pixel's class where the softmax is >= `confidence` (else ignore_index) and
writes image + label PNG; detection keeps boxes (and masks) scoring >= `score` and writes the
images and one COCO file. `OUT/pseudo_labels.json` is written last and marks a finished run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gppf.api.task import Task
from gppf.config.cpf import PseudoLabelConfig
from gppf.io.batches import collate_numpy
from gppf.io.images import IMAGE_EXTS, is_image
from gppf.models.model import MultiTaskModel

SUMMARY = "pseudo_labels.json"


def load_teacher(checkpoint: str | Path, task: Task) -> MultiTaskModel:
    """The checkpoint's trunk and shared neck with `task`'s head, weights loaded, in eval mode
    (gppf.models.build.load_model). The architecture comes from the checkpoint's run (config.json);
    the head from `task`, which must be the checkpoint's task of that name (same classes: the load
    is strict)."""
    from gppf.api.registry import build_tasks
    from gppf.models.build import checkpoint_config, load_model

    tasks = [task if t.name == task.name else t for t in build_tasks(checkpoint_config(checkpoint))]
    try:
        return load_model(checkpoint, tasks, heads=[task.name]).model
    except ValueError as e:
        raise ValueError(f"teacher {e}") from None


class Labeller:
    """One actor of the pool: the teacher, and a batch of image paths -> records (files written)."""

    def __init__(self, checkpoint: str, task: Task, out: str, cfg: PseudoLabelConfig):
        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
        self.task, self.out, self.cfg = task, Path(out), cfg
        self.model = load_teacher(checkpoint, task).to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = self.task.pseudo_inputs(batch)
        tensors = self.task.to_device(collate_numpy(inputs), self.device)
        outputs = self.task.infer(lambda x: self.model(x, self.task.name, tensors)[0], tensors)
        records = self.task.write_pseudo_labels(outputs, inputs, self.out, self.cfg)
        return {
            "index": np.asarray(batch["index"]),
            "record": np.asarray([json.dumps(r) for r in records], dtype=object),
        }


def image_files(directory: str | Path) -> list[Path]:
    """The images directly in `directory`, sorted; their stems must be unique (label files are
    named by stem)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"pseudo-label images: {d} is not a directory")
    files = sorted(f for f in d.iterdir() if f.is_file() and is_image(f.name))
    if not files:
        raise FileNotFoundError(f"pseudo-label images: {d} holds no {'/'.join(IMAGE_EXTS)} files")
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise ValueError(f"pseudo-label images: {d} has two images with the stem {dup!r}")
    return files


def label_images(
    checkpoint: str | Path, task: Task, images: str | Path, out: str | Path, cfg: PseudoLabelConfig
) -> dict[str, Any]:
    """Label every image of `images` with the teacher; writes `out` in the task's train layout and
    `out/pseudo_labels.json` (the summary, returned) when done."""
    import ray.data

    from gppf.dist.ray_env import ensure_ray

    files = image_files(images)
    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    t0 = time.time()
    ds = ray.data.from_items([{"path": str(f), "index": i} for i, f in enumerate(files)])
    ds = ds.map_batches(
        Labeller,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "task": task, "out": str(out), "cfg": cfg},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        concurrency=min(cfg.actors, max(1, -(-len(files) // cfg.batch_size))),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    records: dict[int, dict[str, Any]] = {}
    every, shown = max(1, len(files) // 10), 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index, record in zip(batch["index"], batch["record"]):
            records[int(index)] = json.loads(record)
        if len(records) - shown >= every or len(records) == len(files):
            shown = len(records)
            print(f"[gppf] pseudo-labels for {task.name}: {shown}/{len(files)} images", flush=True)
    if len(records) != len(files):
        raise RuntimeError(f"pseudo-labels: {len(records)} of {len(files)} images came back")
    figures = task.finish_pseudo_labels([records[i] for i in range(len(files))], out)
    summary = {
        "task": task.name,
        "teacher": str(checkpoint),
        "image_dir": str(Path(images).expanduser().absolute()),
        "out": str(out),
        "confidence": cfg.confidence,
        "score": cfg.score,
        "seconds": round(time.time() - t0, 1),
        **figures,
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))  # last: marks the labels complete
    return summary


def main(argv: list[str] | None = None) -> None:
    from gppf.api.registry import build_tasks
    from gppf.models.build import checkpoint_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the teacher: a checkpoint directory inside a gppf run directory")
    ap.add_argument("--task", required=True, help="the checkpoint's task whose head labels the images")
    ap.add_argument("--images", required=True, help="a directory of images (.jpg, .jpeg, .png)")
    ap.add_argument("-o", "--out", required=True, help="output directory (the task's data_root layout)")
    defaults = PseudoLabelConfig()
    ap.add_argument("--confidence", type=float, default=defaults.confidence, help="segmentation threshold")
    ap.add_argument("--score", type=float, default=defaults.score, help="detection threshold")
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--actors", type=int, default=defaults.actors, help="inference actors")
    ap.add_argument("--gpu", action="store_true", help="one GPU per actor")
    args = ap.parse_args(argv)
    try:
        cfg = PseudoLabelConfig(
            confidence=args.confidence,
            score=args.score,
            batch_size=args.batch_size,
            actors=args.actors,
            use_gpu=args.gpu,
        )
        tasks = {t.name: t for t in build_tasks(checkpoint_config(args.checkpoint))}
        if args.task not in tasks:
            raise ValueError(f"the checkpoint has no task {args.task!r}; its tasks: {', '.join(tasks)}")
        summary = label_images(args.checkpoint, tasks[args.task], args.images, args.out, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
