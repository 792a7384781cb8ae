"""Checkpoint files: atomic writes, weights-only reads, and loading weights into a model.

A checkpoint directory holds `state.pt`: {step, model, optimizer, scheduler, scaler, streams,
world_size, initial_eval}. `read_weights` also accepts a bare state_dict file (an exported route,
`python -m gppf.tools.export`), which is what `backbone.init_from` / `model.init_from` load.
"""

from __future__ import annotations

import fnmatch
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gppf.io import storage

CKPT_FILE = "state.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> None:
    """Write state.pt atomically: into a temporary file, flushed to disk, then renamed over the old
    one. A crash at any point leaves the previous state.pt (or none), never a torn one. (Ray Train
    then copies the directory to storage and registers it only once the copy is complete.)"""
    path = Path(directory) / CKPT_FILE
    tmp = path.with_name(CKPT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """state.pt of a checkpoint directory, local or a URI (gppf.io.storage)."""
    return _load(storage.path(directory) / CKPT_FILE, map_location)


def _load(p: Path | storage.UriPath, map_location: str | torch.device = "cpu") -> Any:
    src = p if isinstance(p, Path) else io.BytesIO(p.read_bytes())
    return torch.load(src, map_location=map_location, weights_only=True)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, kind) from a file or checkpoint directory: kind "checkpoint" for a gppf
    checkpoint (the whole multi-task model, in the platform's own keys) or "plain" for anything
    else that holds a state_dict (an exported route, timm, torchvision, MoCo, DenseCL: see
    gppf.models.weight_formats), unwrapped from a "state_dict" or "model" entry if it has one."""
    p = storage.path(path)
    if p.is_dir():
        p = p / CKPT_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"init_from: {storage.display(p)} does not exist (a checkpoint directory or a .pt file)"
        )
    obj = _load(p)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "step" in obj and "optimizer" in obj:
        return obj["model"], "checkpoint"
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj, "plain"
    raise ValueError(f"init_from: {p} is neither a gppf checkpoint nor a state_dict of tensors")


@dataclass
class LoadReport:
    """What a weights-only load did: loaded keys, keys that stay as initialised, ignored keys."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    fmt: str = ""  # the format the file was read as (gppf.models.weight_formats)
    dropped: list[str] = field(default_factory=list)  # keys of the file deliberately left out
    renamed: dict[str, str] = field(default_factory=dict)  # file key -> model key (model.init_map)
    key_map: dict[str, str] = field(default_factory=dict)  # the model.init_map that renamed them
    skipped: list[str] = field(default_factory=list)  # model keys left out by model.init_skip

    def summary(self) -> str:
        fmt = f" ({self.fmt})" if self.fmt else ""
        lines = [f"[gppf] init_from {self.source}{fmt}: loaded {len(self.loaded)} tensors"]
        if self.renamed:
            shown = ", ".join(f"{a} -> {b}" for a, b in self.key_map.items())
            lines.append(f"  loaded under other names ({len(self.renamed)}): {shown}")
        if self.skipped:
            lines.append(
                f"  left out by model.init_skip ({len(self.skipped)}): {_grouped(self.skipped, depth=5)}"
            )
        if self.dropped:
            lines.append(f"  left out, not backbone ({len(self.dropped)}): {_grouped(self.dropped)}")
        if self.missing:
            lines.append(f"  stay as initialised ({len(self.missing)}): {_grouped(self.missing)}")
        if self.unexpected:
            lines.append(f"  ignored, not in the model ({len(self.unexpected)}): {_grouped(self.unexpected)}")
        return "\n".join(lines)


def _grouped(keys: list[str], depth: int = 3, show: int = 8) -> str:
    """`heads.det.rpn.*` (24) instead of 24 keys: short enough for a terminal."""
    groups: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        g = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g} ({n})" if n > 1 else g for g, n in groups.items()]
    return ", ".join(items[:show]) + (f", ... {len(items) - show} more groups" if len(items) > show else "")


def _prefix(key: str) -> str:
    return key.split("*")[0]


def remap(
    state: dict[str, torch.Tensor], key_map: dict[str, str], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`state` with the keys under each `key_map` prefix pattern also under its target, e.g.
    {"heads.objects365.*": "heads.voc.*"} (UODB's heads initialised from Objects365's); a mapped
    key replaces a same-named one. Returns (state, {file key: model key}). A pattern must end in
    one `*` and match some key."""
    out, renamed = dict(state), {}
    for src, dst in key_map.items():
        if src.count("*") != 1 or not src.endswith("*") or dst.count("*") != 1 or not dst.endswith("*"):
            raise ValueError(f"model.init_map {src!r}: {dst!r}: both must be prefixes ending in '*'")
        hits = [k for k in state if k.startswith(_prefix(src))]
        if not hits:
            raise ValueError(f"model.init_map: {src!r} matches no key of {source}")
        for k in hits:
            new = _prefix(dst) + k[len(_prefix(src)) :]
            out[new] = state[k]
            renamed[k] = new
    return out, renamed


def load_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    key_map: dict[str, str] | None = None,
    skip: list[str] | tuple[str, ...] = (),
) -> LoadReport:
    """Copy the tensors of `state` whose keys `module` has; a shape mismatch is an error naming the
    key. Missing keys keep their initial values, unexpected keys are ignored; both are reported.
    `key_map` loads keys under other names first (`remap`); `skip` (fnmatch patterns over the
    model's keys) leaves those as initialised, e.g. a detection head's final predictor."""
    own = module.state_dict()
    report = LoadReport(source)
    if key_map:
        state, report.renamed = remap(state, key_map, source)
        report.key_map = dict(key_map)
    if skip:
        unmatched = [p for p in skip if not fnmatch.filter(own, p)]
        if unmatched:
            raise ValueError(f"model.init_skip: {unmatched[0]!r} matches no parameter of the model")
        report.skipped = [k for k in own if any(fnmatch.fnmatch(k, p) for p in skip) and k in state]
        state = {k: v for k, v in state.items() if k not in set(report.skipped)}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        if own[key].shape != value.shape:
            raise ValueError(
                f"init_from {source}: {key} has shape {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in the model (a head with another number of classes? "
                "load the backbone only with backbone.init_from)"
            )
        report.loaded.append(key)
    report.missing = [k for k in own if k not in state and k not in report.skipped]
    module.load_state_dict({k: state[k] for k in report.loaded}, strict=False)
    return report
