"""Batches as the trainer sees them: columns of one shape as tensors, ragged columns as lists.

A plugin's `preprocess` may return a column whose rows differ in shape as an object array of
per-row arrays: evaluation images at their own aspect-kept test size, segmentation labels at
their original resolution, a variable number of boxes per detection image. `collate_numpy` (what
a stream calls on each decoded batch) turns such a column into an object array of tensors (one
per row), and `move` (what `Task.to_device` calls) into a list of tensors on the device. A column
whose rows happen to share a shape in one batch arrives stacked: consumers of a ragged column
accept both (`rows`).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

Column = torch.Tensor | list[torch.Tensor] | np.ndarray


def collate_numpy(batch: dict[str, np.ndarray]) -> dict[str, Column]:
    """Numeric columns -> tensors; object columns of arrays -> object arrays of tensors; other
    object columns (strings) stay as they are."""
    out: dict[str, Column] = {}
    # Arrays from the object store are read-only; torch warns about each, and Ray's own collate
    # silences it the same way: batches are never written in place, and a copy would cost memory.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for key, value in batch.items():
            value = np.asarray(value) if not isinstance(value, np.ndarray) else value
            if value.dtype != object:
                out[key] = torch.as_tensor(value)
            elif len(value) and all(isinstance(v, np.ndarray) for v in value):
                tensors = np.empty(len(value), dtype=object)
                for i, v in enumerate(value):
                    tensors[i] = torch.as_tensor(v)
                out[key] = tensors
            else:
                out[key] = value
    return out


def _is_ragged(value: Any) -> bool:
    return isinstance(value, (list, np.ndarray)) and len(value) > 0 and all(torch.is_tensor(v) for v in value)


def rows(column: torch.Tensor | list[torch.Tensor] | np.ndarray) -> list[torch.Tensor]:
    """A ragged column as one tensor per row, whether it arrived as rows or stacked."""
    return list(column.unbind(0)) if torch.is_tensor(column) else list(column)


def move(value: Any, device: torch.device) -> Any:
    """A column on `device`: a tensor moves; a ragged column becomes a list of tensors there;
    anything else stays."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if _is_ragged(value):
        return [v.to(device, non_blocking=True) for v in value]
    return value


def pad_stack(
    images: list[torch.Tensor], fill: float = 0.0, divisor: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, h_i, w_i] images -> ([N, C, H, W] padded at the bottom and right with `fill`, [N, 2] the
    (h_i, w_i) of each), H and W the largest of the batch rounded up to a multiple of `divisor`
    (MMSeg's and detectron2's batching)."""
    h = -(-max(int(x.shape[-2]) for x in images) // divisor) * divisor
    w = -(-max(int(x.shape[-1]) for x in images) // divisor) * divisor
    out = images[0].new_full((len(images), images[0].shape[0], h, w), fill)
    for i, x in enumerate(images):
        out[i, :, : x.shape[-2], : x.shape[-1]] = x
    sizes = torch.tensor([[x.shape[-2], x.shape[-1]] for x in images], dtype=torch.int64)
    return out, sizes
