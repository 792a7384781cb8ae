"""Task plugins shipped with the platform. Importing this package registers them."""

from task_plugins import classification, depth, detection, multihead, segmentation  # noqa: F401
