"""Self-supervised auxiliary tasks (CompL): rotation, MoCo and DenseCL, and their image lists.

The task classes are entry points (pyproject.toml); this package imports nothing."""
