"""Paths that are local or URIs of any `pyarrow.fs` filesystem (s3://, gs://, hdfs://, file://).

Data roots and `run_dir` may live in object storage, as cloud clusters keep them (cluster.yaml's
nodes come and go; their disks do not hold the data or the checkpoints). `path(p)` returns a
`pathlib.Path` for a local path and a `UriPath` for a URI; `UriPath` has the part of Path's
interface that task plugins use (`/`, `name`, `stem`, `suffix`, `parent`, `exists`, `is_dir`,
`is_file`, `iterdir`, `glob`, `read_text`, `read_bytes`, `open`, ...), so a plugin that builds its
paths with `storage.path(cfg.data_root)` and opens files with `open_input` reads either.

A URI is whatever `pyarrow.fs.FileSystem.from_uri` accepts, its options included, e.g.
`s3://bucket/prefix` (credentials from the usual AWS chain: environment, instance profile) or
`s3://KEY:SECRET@bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http` (MinIO, moto).
Ray Train writes checkpoints through the same filesystem object (`storage_filesystem`).
"""

from __future__ import annotations

import fnmatch
import functools
import io
import posixpath
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs


def is_uri(p: Any) -> bool:
    return isinstance(p, UriPath) or (isinstance(p, str) and "://" in p)


def path(p: str | Path | UriPath) -> Path | UriPath:
    """A UriPath for a URI, else the local Path (with `~` expanded)."""
    if isinstance(p, UriPath):
        return p
    return UriPath(p) if is_uri(p) else Path(p).expanduser()


def absolute(p: str | Path | UriPath) -> str:
    """What workers on other nodes can use: a URI as given, a local path made absolute."""
    q = path(p)
    return str(q if isinstance(q, UriPath) else q.absolute())


def display(p: str | Path | UriPath) -> str:
    """For terminals and logs: a URI without the secret of its `user:secret@` part."""
    s = str(p)
    if not is_uri(s):
        return s
    u = urlsplit(s)
    if "@" not in u.netloc:
        return s
    user, host = u.netloc.rsplit("@", 1)
    return urlunsplit((u.scheme, f"{user.split(':')[0]}:***@{host}", u.path, u.query, u.fragment))


@functools.lru_cache(maxsize=64)
def _filesystem(scheme: str, netloc: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem object per endpoint (S3 clients are costly to build) and the prefix its
    paths take (the bucket for S3 and GCS, nothing for file:// or HDFS)."""
    fs, root = pafs.FileSystem.from_uri(urlunsplit((scheme, netloc, "/", query, "")))
    return fs, root.rstrip("/")


class UriPath:
    """A file or directory in a pyarrow filesystem, addressed by URI (see the module docstring)."""

    def __init__(self, uri: str):
        u = urlsplit(uri)
        if not u.scheme or not u.netloc and u.scheme != "file":
            raise ValueError(f"{uri!r} is not a URI (scheme://location/path)")
        self._scheme, self._netloc, self._query = u.scheme, u.netloc, u.query
        self._path = posixpath.normpath(u.path or "/") if u.path not in ("", "/") else "/"

    # -- names -------------------------------------------------------------------------------
    def __str__(self) -> str:
        return urlunsplit((self._scheme, self._netloc, self._path, self._query, ""))

    def __repr__(self) -> str:
        return f"UriPath({display(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: UriPath) -> bool:
        return str(self) < str(other)

    def __truediv__(self, part: str | PurePosixPath) -> UriPath:
        return self._with_path(posixpath.join(self._path, str(part)))

    def _with_path(self, p: str) -> UriPath:
        return UriPath(urlunsplit((self._scheme, self._netloc, posixpath.normpath(p), self._query, "")))

    @property
    def name(self) -> str:
        return PurePosixPath(self._path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self._path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self._path).suffix

    @property
    def parent(self) -> UriPath:
        return self._with_path(posixpath.dirname(self._path) or "/")

    def relative_to(self, other: UriPath) -> PurePosixPath:
        return PurePosixPath(self._path).relative_to(other._path)

    def expanduser(self) -> UriPath:
        return self

    def absolute(self) -> UriPath:
        return self

    # -- the filesystem ----------------------------------------------------------------------
    @property
    def filesystem(self) -> pafs.FileSystem:
        return _filesystem(self._scheme, self._netloc, self._query)[0]

    @property
    def fs_path(self) -> str:
        """This path as `filesystem` names it (for pyarrow, Ray Data and Ray Train calls)."""
        prefix = _filesystem(self._scheme, self._netloc, self._query)[1]
        return prefix + self._path if self._path != "/" else prefix or "/"

    def _info(self) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.fs_path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def infos(self, recursive: bool = False) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        return sorted(self.filesystem.get_file_info(sel), key=lambda i: i.path)

    def iterdir(self) -> list[UriPath]:
        return [self / i.base_name for i in self.infos()]

    def files(self, recursive: bool = False) -> list[UriPath]:
        """The files under this directory (all levels when `recursive`), sorted: one listing."""
        prefix = self.fs_path.rstrip("/") + "/"
        return [
            self / i.path[len(prefix) :] for i in self.infos(recursive) if i.type == pafs.FileType.File
        ]

    def glob(self, pattern: str) -> list[UriPath]:
        """One level, fnmatch patterns (`*.parquet`): what plugins ask of a split directory."""
        return [p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern)]

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.filesystem.create_dir(self.fs_path, recursive=True)

    def open(self, mode: str = "rb") -> IO[bytes]:
        if mode in ("r", "rb"):
            return self.filesystem.open_input_file(self.fs_path)
        if mode in ("w", "wb"):
            return self.filesystem.open_output_stream(self.fs_path)
        raise ValueError(f"UriPath.open: mode {mode!r} (binary read or write only)")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.open("wb") as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.exists():
            return
        self.filesystem.delete_file(self.fs_path)


def subdirs(root: Path | UriPath) -> list[str]:
    """Names of the directories in `root`, sorted (one listing, also in object storage)."""
    if isinstance(root, UriPath):
        return [i.base_name for i in root.infos() if i.type == pafs.FileType.Directory]
    return sorted(d.name for d in root.iterdir() if d.is_dir())


def files(d: Path | UriPath, recursive: bool = False) -> list[Path | UriPath]:
    """The files in directory `d` (and below it when `recursive`), sorted; one listing on object
    storage (a request per file would not do for 10^5 images)."""
    if isinstance(d, UriPath):
        return d.files(recursive)
    return sorted(p for p in (d.rglob("*") if recursive else d.iterdir()) if p.is_file())


def missing(paths: list[str]) -> list[str]:
    """The paths that are not files. URIs are checked by listing each parent directory once, not
    by a request per file (a split of an object store holds 10^5 to 10^6 images)."""
    local = [p for p in paths if not is_uri(p)]
    out = {p for p in local if not Path(p).is_file()}
    listed: dict[str, set[str]] = {}
    for p in paths:
        if is_uri(p):
            u = UriPath(p)
            parent = str(u.parent)
            if parent not in listed:
                listed[parent] = {i.base_name for i in u.parent.infos() if i.type == pafs.FileType.File}
            if u.name not in listed[parent]:
                out.add(p)
    return [p for p in paths if p in out]


def read_parquet(paths: list[str], **kw: Any):
    """`ray.data.read_parquet` of local paths or URIs (one filesystem: the first path's)."""
    import ray.data

    if paths and is_uri(paths[0]):
        fs = UriPath(paths[0]).filesystem
        return ray.data.read_parquet([UriPath(p).fs_path for p in paths], filesystem=fs, **kw)
    return ray.data.read_parquet(paths, **kw)


def parquet_rows(paths: list[str], columns: list[str]) -> dict[str, Any]:
    """The rows of Parquet files (local paths or URIs) as numpy columns, in file order, read in
    this process with pyarrow (binary columns as object arrays of bytes, as Ray Data gives them)."""
    import numpy as np
    import pyarrow as pa

    tables = [parquet_file(f).read(columns=columns) for f in paths]
    table = pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})
    return {c: np.asarray(table.column(c).to_numpy(zero_copy_only=False)) for c in columns}


def parquet_file(p: str | Path | UriPath):
    """`pyarrow.parquet.ParquetFile` of a local path or a URI (reads the footer, not the data)."""
    import pyarrow.parquet as pq

    q = path(p)
    return pq.ParquetFile(q.open() if isinstance(q, UriPath) else q)


def open_input(p: str | Path | UriPath) -> IO[bytes] | str:
    """What PIL's `Image.open` takes: a local path as is, a URI's file as a buffer (read whole:
    one request instead of one per seek)."""
    if not is_uri(p):
        return str(p)
    return io.BytesIO(path(p).read_bytes())


def copy_tree(
    src: str | Path | UriPath, dst: str | Path | UriPath, only: tuple[str, ...] | None = None
) -> None:
    """Copy the directory `src` to `dst` (either side local or a URI), recursively and with
    parallel transfers; with `only`, just those top-level entries of it that exist."""
    s, d = path(src), path(dst)
    for name in only if only is not None else ("",):
        a, b = (s / name, d / name) if name else (s, d)
        if name and not a.exists():
            continue
        if isinstance(b, Path):
            (b if a.is_dir() else b.parent).mkdir(parents=True, exist_ok=True)
        sfs, sp = _fs(a)
        dfs, dp = _fs(b)
        pafs.copy_files(sp, dp, source_filesystem=sfs, destination_filesystem=dfs, use_threads=True)


def _fs(p: Path | UriPath) -> tuple[pafs.FileSystem, str]:
    if isinstance(p, UriPath):
        return p.filesystem, p.fs_path
    return pafs.LocalFileSystem(), str(p.absolute())


def local_mirror(name: str) -> Path:
    """A fresh local directory for the log files of a run whose run_dir is a URI."""
    return Path(tempfile.mkdtemp(prefix=f"gppf-{name}-"))
