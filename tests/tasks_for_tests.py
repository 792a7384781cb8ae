"""Demo configurations of every bundled task type, used by the parametrized task tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


# A new task type must add an entry here: test_every_registered_task_has_a_test_config checks it.
def task_entries(root: Path) -> dict[str, dict[str, Any]]:
    return {
        "cls_folder": {
            "type": "classification",
            "data_root": str(root / "classification"),
            "batch_size": 8,
            "input_size": 32,
        },
        "cls_parquet": {
            "type": "classification",
            "data_root": str(root / "classification_parquet"),
            "batch_size": 8,
            "input_size": 32,
        },
        "seg": {
            "type": "segmentation",
            "data_root": str(root / "segmentation"),
            "num_classes": 4,
            "batch_size": 4,
            "input_size": 32,
        },
    }
