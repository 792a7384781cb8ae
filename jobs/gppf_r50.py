"""GPPF-R50: SIMT multi-task pre-training of a ResNet-50 on the paper's eight datasets.

Submit to a Ray cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/gppf_r50.py --data-root /data/gppf

or run locally with no arguments for the embedded default: a local Ray instance, generated demo
data (classification + segmentation), a small lego ResNet (hard routing) and a shrunken schedule;
it ends with a per-task table of validation metrics at step 0 and at the end, and writes the
selection plots (selection.png, selection_history.png) into the run directory.
`--set backbone.kind=static` trains the static backbone instead.

Settings are GPPF App. D.1: sampling weights 4.0, 2.5, 2.5, 4.0, 4.0, 1.0, 2.0, 1.0 and per-GPU
batch sizes 96, 8, 8, 12, 12, 8, 8, 8 for IN21K, COCO, LVIS, Objects365, Open Images, ADE20K,
COCO-Stuff and Pascal VOC; SGD lr 0.16, momentum 0.9, weight decay 5e-4; 500k iterations,
cosine with 50k warmup; 7 x 8 GPUs. Override anything with --set key=value, pick a subset with
--tasks in21k,ade20k.
"""

from __future__ import annotations

from gppf.launch.cli import main
from gppf.presets.gppf_r50 import demo_config, full_config

if __name__ == "__main__":
    main(__doc__, full_config, demo_config)
