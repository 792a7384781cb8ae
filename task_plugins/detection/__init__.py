"""Detection: the COCO-format task (Faster / Mask / Cascade R-CNN heads), its readers and evaluators.

The task classes are entry points (pyproject.toml); this package imports nothing."""
