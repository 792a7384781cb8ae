"""Task plugins shipped with the platform. Importing this package registers them."""

from task_plugins import (  # noqa: F401
    classification,
    depth,
    detection,
    moco,
    multihead,
    rotation,
    segmentation,
)
