"""`Task.check_data` once per data root and file list, not once per run.

The driver checks every task's data before any worker starts (clear errors early). A check of a
large dataset lists or stats every image; a sweep that starts a hundred trials on the same data
should pay for it once. A passed check is remembered (in memory and under
`$GPPF_CACHE_DIR/data_checks`, default `~/.cache/gppf`) by a key of:

- the task type, its plugin's source file and its config, less the fields that do not touch the
  data (sampling_weight, loss_weight: what sweeps vary);
- a fingerprint of the files: mtime of the data root and of every directory one and two levels
  below it, mtime and size of every non-image file down to two levels (annotation JSONs, split
  lists, Parquet shards). Adding, removing or renaming an image changes its directory's mtime.
  In object storage (a URI data root), whose directories have no mtime, the number of entries of
  each directory down to two levels stands in for it.

An image changed in place under the same name, or a change three or more levels down, is not
seen: delete the cache directory after such edits.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from gppf.api.task import Task
from gppf.config.base import from_dict, to_dict
from gppf.io import storage
from gppf.io.images import is_image
from gppf.io.storage import UriPath

NOT_DATA = ("sampling_weight", "loss_weight")  # what a sweep varies without touching the data
_memory: dict[str, dict[str, Any]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("GPPF_CACHE_DIR", "~/.cache/gppf")).expanduser() / "data_checks"


def fingerprint(root: Path | UriPath, depth: int = 2) -> list[tuple]:
    if isinstance(root, UriPath):
        return _uri_fingerprint(root, depth)
    out: list[tuple] = []

    def visit(d: Path, level: int) -> None:
        out.append((str(d.relative_to(root)), d.stat().st_mtime_ns))
        if level == depth:
            return
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_dir():
                    visit(Path(e.path), level + 1)
                elif not is_image(e.name):
                    st = e.stat()
                    out.append((str(Path(e.path).relative_to(root)), st.st_mtime_ns, st.st_size))

    visit(root, 0)
    return out


def _uri_fingerprint(root: UriPath, depth: int) -> list[tuple]:
    out: list[tuple] = []

    def visit(d: UriPath, level: int) -> None:
        infos = d.infos()
        out.append((str(d.relative_to(root)), len(infos)))
        for i in infos:
            if i.type == pafs.FileType.Directory:
                if level < depth:
                    visit(d / i.base_name, level + 1)
            elif not is_image(i.base_name):
                out.append((str((d / i.base_name).relative_to(root)), i.mtime_ns, i.size))

    visit(root, 0)
    return out


def _key(task: Task, entry_type: str) -> str:
    try:
        source = hashlib.sha256(Path(inspect.getsourcefile(type(task)) or "").read_bytes()).hexdigest()
    except (OSError, TypeError):
        source = ""
    cfg = {k: v for k, v in to_dict(task.cfg).items() if k not in NOT_DATA}
    # A plugin whose data comes with it (no data_root) is keyed by its code and config alone.
    files = fingerprint(storage.path(task.cfg.data_root)) if task.cfg.data_root else []
    doc = {"type": entry_type, "plugin": source, "cfg": cfg, "files": files}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def check(task: Task, entry_type: str) -> bool:
    """Run `task.check_data()` unless the same check passed on the same files; the fields the check
    derived (num_classes, ...) are restored from the cache. Returns True when it really ran."""
    key = _key(task, entry_type)
    derived = _memory.get(key)
    path = cache_dir() / f"{key}.json"
    if derived is None and path.is_file():
        try:
            derived = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            derived = None
    if derived is not None:
        task.cfg = from_dict(type(task.cfg), {**to_dict(task.cfg), **derived}, where=f"tasks.{task.name}")
        _memory[key] = derived
        return False
    before = to_dict(task.cfg)
    task.check_data()
    after = to_dict(task.cfg)
    # What the check filled in (json-compared: NaN != NaN); never what a sweep varies.
    derived = {
        k: v for k, v in after.items() if k not in NOT_DATA and json.dumps(before.get(k)) != json.dumps(v)
    }
    # Remembered under the key of the config as given and as resolved (a resolved config that is
    # resolved again, as a restarted sweep does, finds it too).
    for k in {key, _key(task, entry_type)}:
        _remember(k, derived)
    return True


def _remember(key: str, derived: dict[str, Any]) -> None:
    _memory[key] = derived
    path = cache_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(derived))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the in-memory cache still serves this process
        pass
