"""Task plugins shipped with the platform. Importing this package registers them."""

from task_plugins import classification, depth, detection, moco, rotation, segmentation  # noqa: F401
