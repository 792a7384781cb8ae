"""Composite Learning (CompL): a dense target task trained with a self-supervised auxiliary task.

Submit to a Ray cluster (from the repository root): semantic segmentation on Pascal VOC 2012
(train_aug) at a label fraction, jointly with DenseCL on all VOC training images (CompL §4.2):

    ray job submit --working-dir . -- python jobs/compl.py --data-root /data \\
        --set tasks.voc.label_fraction=0.1

Each worker step takes 8 labelled target images and 8 auxiliary images in one trunk forward
and minimises L_t + λ L_a (λ = tasks.densecl.loss_weight, 0.2; CompL: 0.2 for MoCo and
DenseCL, 0.05 for rotation: `--set tasks.densecl.type=rotation --set tasks.densecl.loss_weight=0.05`
swaps the auxiliary task). The auxiliary augmentations (Gaussian blur, colour jitter, two views)
touch only the auxiliary images. SGD, momentum 0.9, weight decay 1e-4 as CompL (a cosine
schedule instead of "poly"). Start from pretrained weights with `--set backbone.init_from=FILE`.

With no arguments it runs the embedded demo experiment: the demo segmentation task at a 10 %
label fraction trained alone, then with DenseCL on all its training images (composite mode),
same steps and seeds, and prints both results. `--seeds 0,1` repeats it per seed.
"""

from __future__ import annotations

import copy
import json
import statistics

from gppf.config.base import to_dict
from gppf.launch import cli
from gppf.presets.compl import AUX, demo_config, full_config


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def run(argv: list[str] | None = None) -> dict:
    ap = cli.parser(__doc__)
    ap.add_argument("--seeds", default="", help="demo: comma-separated seeds, each a pair of runs")
    args = ap.parse_args(argv)
    base = cli.load_config(args, full_config, demo_config)
    if args.print_config:
        print(json.dumps(to_dict(base), indent=2))
        return {}
    if args.data_root:  # the full job: one composite run
        return cli.run(base, args.resume)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.train.seed]
    target = base.tasks[AUX]["composite_with"]
    results: dict[str, list[dict]] = {"target alone": [], f"target + {AUX}": []}
    for seed in seeds:
        for name in results:
            cfg = copy.deepcopy(base)
            cfg.train.seed = seed
            if name == "target alone":
                cfg.tasks = {target: cfg.tasks[target]}
                cfg.name = f"{base.name}_alone"
            results[name].append(cli.run(cfg))
    fraction = base.tasks[target].get("label_fraction", 1.0)
    print(f"\n[gppf] {target} at label fraction {fraction:g}, {base.train.steps} steps, seeds {seeds}:")
    for name, runs in results.items():
        final = [r["final_eval"][target] for r in runs]
        shown = [f"{k} {_mean_std([f[k] for f in final])}" for k in final[0]]
        print(f"  {name:20s} {', '.join(shown)}")
    return results[f"target + {AUX}"][-1]


if __name__ == "__main__":
    run()
