"""Pretrain-adapt-finetune (LV-Adapter §4) on BDD100K: detection, semantic segmentation, drivable area.

Submit to a Ray cluster (from the repository root), starting from any pretrained backbone:

    ray job submit --working-dir . -- python jobs/adapt_finetune.py --data-root /data \\
        --set backbone.init_from=/models/moco_v2_800ep_pretrain.pth.tar \\
        --set model.adapter=pre_scalar --set model.language.variant=lv_adapter

Two stages of one run share a neck (an FPN producing P2-P5 at 256 channels) between the
backbone and the three heads:
- *adapt*: the backbone and the randomly initialised heads are frozen (no gradient, no optimizer
  state, BN on its running statistics); only the neck ("the adapter", plus the LV-Adapter's
  prompts, projection and decoder) trains on the multi-task loss, at lr 2.5e-4;
- *finetune*: everything but the text encoder trains at lr 2.5e-5 (AdamW, weight decay 1e-4,
  1000 warmup iterations from lr x 0.01).
The paper's 36 epochs are 1 adapt + 35 finetune here (`stages[0].steps`, `stages[1].steps`),
epochs of BDD100K detection turned into SIMT steps by gppf.engine.epochs.
`model.adapter` picks the design (fpn, pre, post, pre_scalar, pre_vector); `model.language.variant`
the language adapter (lv_adapter, or the baselines naive, template, ensemble); per-task loss
weights α are `tasks.<task>.loss_weight`. BDD100K's detection labels must first be converted to
COCO JSON (`python -m gppf.tools.bdd100k_to_coco`, see docs/datasets.md).

With no arguments it runs the embedded demo experiment: a backbone pre-trained on the demo
classification task only (a deliberately mismatched initialisation) is transferred to the demo
segmentation and detection tasks twice with the same budget, by pretrain-finetune and by
pretrain-adapt-finetune, and the two results are printed side by side. `--set` overrides apply
to both transfers (not to the pretraining).
"""

from __future__ import annotations

from gppf.launch import cli
from gppf.presets.adapt_finetune import ADAPT_FRACTION, demo_config, full_config, pretrain_config, stages


def _from(start: dict[str, float], key: str) -> str:
    return f"{start[key]:.2f} -> " if key in start else ""  # no step-0 evaluation: the end only


def run(argv: list[str] | None = None) -> dict:
    args = cli.parser(__doc__).parse_args(argv)
    cfg = cli.load_config(args, full_config, demo_config)
    if args.data_root or args.print_config or args.plan:
        return cli.main(__doc__, full_config, demo_config, argv)
    init = cfg.backbone.init_from  # the demo with a backbone of your own: no pretraining
    if not init:
        transfer_sets = args.overrides
        # The pretraining takes the run-wide settings only, not the transfer's model or tasks.
        args.overrides = [s for s in transfer_sets if not s.startswith(("model.", "tasks.", "backbone."))]
        init = cli.run(cli.load_config(args, full_config, pretrain_config))["checkpoint"]
        args.overrides = transfer_sets
    results = {}
    for name, adapt in (("pretrain-finetune", 0.0), ("pretrain-adapt-finetune", ADAPT_FRACTION)):
        cfg = cli.load_config(args, full_config, demo_config)
        total = cfg.train.steps
        adapt_steps = max(1, round(total * adapt)) if adapt and total > 1 else 0
        cfg.stages = stages(adapt_steps, total - adapt_steps, max(1, total // 12))
        cfg.name = "adapt_finetune_demo" if adapt_steps else "finetune_demo_baseline"
        cfg.backbone.init_from = init
        results[name] = cli.run(cfg)
    print(f"\n[gppf] transfer from {init}, {total} steps each:")
    for name, m in results.items():
        shown = []
        for task in ("demo_seg", "demo_det"):
            start, final = (m.get("initial_eval") or {}).get(task, {}), m["final_eval"][task]
            shown += [
                f"{task} {k} {_from(start, k)}{final[k]:.2f}" for k in final if k in ("mIoU", "box_AP50")
            ]
        print(f"  {name:24s} {', '.join(shown)}")
    return results["pretrain-adapt-finetune"]


if __name__ == "__main__":
    run()
