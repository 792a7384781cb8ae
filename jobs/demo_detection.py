"""Single-task Mask R-CNN: the demo shapes by default, COCO with --data-root.

    python jobs/demo_detection.py                      # demo: ResNet-18, 2 CPU workers
    python jobs/demo_detection.py --data-root /data     # COCO 2017 under /data/coco, ResNet-50
    python jobs/demo_detection.py --set tasks.demo_det.head.cascade=true   # Cascade Mask R-CNN

The demo trains a ResNet-18 from scratch to box AP50 >= 50 on the held-out demo split (figures in
docs/benchmarks.md). It is the single-task baseline of the detection plugin: the same task entry
as in jobs/gppf_r50.py's embedded default, alone.
"""

from __future__ import annotations

from gppf.launch.cli import main
from gppf.presets.demo_detection import demo_config, full_config

if __name__ == "__main__":
    main(__doc__, full_config, demo_config)
