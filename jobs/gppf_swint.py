"""GPPF-SwinT: SIMT multi-task pre-training of a lego Swin-T on the paper's eight datasets.

Submit to a Ray cluster (from the repository root):

    ray job submit --working-dir . -- python jobs/gppf_swint.py --data-root /data/gppf

or run locally with no arguments for the embedded default (local Ray, generated demo data, a
narrow Swin-T with 4x4 windows, a shrunken schedule). Settings are those of GPPF-R50 (see
jobs/gppf_r50.py) except, per App. D.1, AdamW with lr 1e-4 and weight decay 0.05 (none on norms,
biases and relative-position tables, as Swin's own recipe), and Cascade R-CNN heads for the four
detection tasks. The Swin-T backbone uses LayerNorm, so cross-task BN has
nothing to do; SIMT and the masked allreduce still do.
"""

from __future__ import annotations

from gppf.launch.cli import main
from gppf.presets.gppf_swint import demo_config, full_config

if __name__ == "__main__":
    main(__doc__, full_config, demo_config)
