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
BDD100K detection turned into SIMT steps by gppf.engine.epochs.

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

from gppf.config.base import ConfigError, to_dict
from gppf.launch import cli
from gppf.launch.cpf import apply_protocol_overrides, run_protocol, summary
from gppf.presets.cpf import demo_config, demo_protocol, full_config, full_protocol


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
