"""Semantic segmentation: the image + PNG task, its transforms and the UperNet head.

The task classes are entry points (pyproject.toml); this package imports nothing."""
