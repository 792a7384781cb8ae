"""CPF (VTD §4.3, App. H) on BDD100K: curriculum -> pseudo-labels -> joint -> decoder finetuning.

Submit to a Ray cluster (from the repository root), from ImageNet weights:

    ray job submit --working-dir . -- python jobs/cpf.py --data-root /data \\
        --set backbone.init_from=/models/resnet50_imagenet.pth

The phases, each its own run under <run_dir>/<run_name or name>/, each from the previous one's
final checkpoint:
- *curriculum* (`cpf.curriculum.tasks`, `cpf.curriculum.steps`): detection and semantic
  segmentation first (VTD pre-trains its localisation decoders before joint training);
- *pseudo_labels* (`cpf.pseudo_labels.*`): the curriculum checkpoint (or `cpf.pseudo_labels.teacher`)
  labels the 70k detection images for semantic segmentation, which has labels on 7k images:
  pixels whose softmax is >= 0.3 (`confidence`) keep the class, the rest is ignored (App. H.2);
  the labels become an extra train root of bdd_seg (Ray Data batch inference, an actor pool);
- *joint*: all three tasks (`train.steps`, and every other job key, apply here);
- *decoder_finetune* (`cpf.decoder_finetune.steps` per task, `lr_factor` 0.1): each head on its
  own data with the shared network frozen; the final checkpoint holds all finetuned heads (H.3).

Re-running the same command continues the protocol where it stopped: finished phases are
skipped, an interrupted one continues from its newest checkpoint. `--set cpf.<key>=...` sets the
protocol's keys, every other `--set` the job's. AdamW at 1e-4 with weight decay 0.05 as VTD §5
(cosine instead of the step decays); the epoch counts are VTD's (12, 12, 6 per head), epochs of
BDD100K detection turned into SIMT steps by gppf.epochs.

With no arguments it runs the embedded demo: the demo detection and segmentation tasks as the
curriculum, segmentation pseudo-labels on the demo detection images, the joint phase with the
classification task added, and decoder finetuning of the three heads (static ResNet-18; 13.5
minutes on 2 CPUs shared with other jobs); it prints each phase's table and where the final
checkpoint is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "platform"), str(Path(__file__).resolve().parent)]

from gppf_r50 import demo_config as r50_demo  # noqa: E402

from gppf import cli  # noqa: E402
from gppf.backbone import BackboneConfig  # noqa: E402
from gppf.config import ConfigError, to_dict  # noqa: E402
from gppf.epochs import epochs_to_steps  # noqa: E402
from gppf.job_config import JobConfig, OptimConfig, ScalingConfig, TrainConfig  # noqa: E402
from gppf.protocol import (  # noqa: E402
    CurriculumConfig,
    DecoderFinetuneConfig,
    ProtocolConfig,
    PseudoLabelPhaseConfig,
    apply_protocol_overrides,
    run_protocol,
    summary,
)

WORLD = 8
CURRICULUM = ["bdd_det", "bdd_seg"]


def epochs(n: float, data_root: str, stage_tasks: list[str] = ()) -> int:
    """Steps for n epochs of BDD100K detection (69,863 images) under SIMT over `stage_tasks` (all
    three by default; gppf.epochs), as VTD counts its 12 / 12 / 6 epochs."""
    from task_plugins.bdd100k import TRAIN_IMAGES, bdd100k_tasks

    return epochs_to_steps(
        n, "bdd_det", bdd100k_tasks(data_root), TRAIN_IMAGES, WORLD, stage_tasks=stage_tasks
    )


def full_config(data_root: str) -> JobConfig:
    from task_plugins.bdd100k import bdd100k_tasks

    epoch = epochs(1, data_root)
    return JobConfig(
        name="cpf_bdd100k",
        tasks=bdd100k_tasks(data_root),
        backbone=BackboneConfig(name="resnet50"),  # + backbone.init_from=<ImageNet weights>
        optim=OptimConfig(name="adamw", lr=1e-4, weight_decay=0.05, warmup_steps=500),
        train=TrainConfig(
            steps=epochs(12, data_root), log_every=50, checkpoint_every=epoch, eval_every=4 * epoch
        ),
        scaling=ScalingConfig(num_workers=WORLD, use_gpu=True, cpus_per_worker=8, max_failures=3),
    )


def full_protocol(data_root: str) -> ProtocolConfig:
    return ProtocolConfig(
        curriculum=CurriculumConfig(tasks=CURRICULUM, steps=epochs(12, data_root, CURRICULUM)),
        pseudo_labels=PseudoLabelPhaseConfig(
            task="bdd_seg",
            images=str(Path(data_root) / "bdd100k" / "images" / "100k" / "train"),
            batch_size=16,
            actors=8,
            cpus_per_actor=4,
            use_gpu=True,
        ),
        # each head on its own data, every worker on it: 6 epochs of detection
        decoder_finetune=DecoderFinetuneConfig(steps=epochs(6, data_root, ["bdd_det"])),
    )


def demo_config(demo_root: str) -> JobConfig:
    """The joint phase's job (the other phases derive from it): the three demo tasks on a static
    ResNet-18, as VTD's network is one static network."""
    return JobConfig(
        name="cpf_demo",
        tasks=r50_demo(demo_root).tasks,
        backbone=BackboneConfig(name="resnet18"),
        optim=OptimConfig(name="sgd", lr=0.03, momentum=0.9, weight_decay=5e-4, warmup_steps=30),
        train=TrainConfig(steps=180, log_every=30, checkpoint_every=60),
        scaling=ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
    )


def demo_protocol(demo_root: str) -> ProtocolConfig:
    return ProtocolConfig(
        curriculum=CurriculumConfig(tasks=["demo_det", "demo_seg"], steps=120),
        pseudo_labels=PseudoLabelPhaseConfig(
            task="demo_seg", images=str(Path(demo_root) / "detection" / "train2017"), actors=2
        ),
        decoder_finetune=DecoderFinetuneConfig(steps=30),
    )


def run(argv: list[str] | None = None) -> dict:
    """The protocol; returns the last phase's metrics (the decoder finetuning's)."""
    args = cli.parser(__doc__).parse_args(argv)
    protocol_sets = [s for s in args.overrides if s.startswith("cpf.")]
    args.overrides = [s for s in args.overrides if not s.startswith("cpf.")]
    job = cli.load_config(args, full_config, demo_config)
    try:
        if args.data_root:
            proto = full_protocol(str(Path(args.data_root).absolute()))
        else:
            proto = demo_protocol(str(Path(args.demo_root).expanduser().absolute()))
        proto = apply_protocol_overrides(proto, protocol_sets)
        proto.check(job)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.print_config:
        print(json.dumps({**to_dict(job), "cpf": to_dict(proto)}, indent=2))
        return {}
    directory = args.resume or str(Path(job.run_dir).expanduser() / (job.run_name or job.name))
    results = run_protocol(job, proto, directory)
    print(summary(results))
    return [m for phase, m in results.items() if phase != "pseudo_labels"][-1]


if __name__ == "__main__":
    run()
