"""What the bundled plugins share: listing a split's images and pairing each with its label file,
through the storage layer (gppf.io.storage), so that every plugin reads a local directory and an
object-store prefix (s3://..., gs://...) alike."""

from __future__ import annotations

from pathlib import Path

from gppf.io import storage
from gppf.io.images import IMAGE_EXTS, is_image
from gppf.io.storage import UriPath

__all__ = ["IMAGE_EXTS", "is_image", "image_files", "paired_files", "root_path"]


def root_path(data_root: str, *parts: str) -> Path | UriPath:
    """`data_root`/parts..., a local path or a URI path."""
    p = storage.path(data_root)
    for part in parts:
        p = p / part
    return p


def image_files(d: Path | UriPath, recursive: bool = False) -> list[Path | UriPath]:
    """The images in directory `d` (below it too when `recursive`), sorted; [] when it is missing."""
    if not d.is_dir():
        return []
    return [f for f in storage.files(d, recursive) if is_image(f.name)]


def paired_files(
    task: str, data_root: str, img_dir: Path | UriPath, other_dir: Path | UriPath, listing: str, key: str
) -> list[dict]:
    """One split's items `{"image": <image>, key: other_dir/<stem>.png}`: every image of `img_dir`,
    or the stems a list file names (`listing`, relative to `data_root`; VOC's lists hold one stem
    per line, SBD-style lists "image label" path pairs). Segmentation labels and depth maps alike.
    A stem with several image files takes the first suffix of IMAGE_EXTS."""
    images = image_files(img_dir)
    if listing and img_dir.is_dir():
        path = root_path(data_root, listing)
        if not path.is_file():
            raise FileNotFoundError(f"task {task!r}: image list {storage.display(path)} does not exist")
        rank = {ext: i for i, ext in enumerate(IMAGE_EXTS)}
        by_stem: dict[str, Path | UriPath] = {}
        for f in sorted(images, key=lambda f: rank[f.suffix.lower()]):
            by_stem.setdefault(f.stem, f)
        stems = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
        for stem in stems:
            if stem not in by_stem:
                where = storage.display(img_dir)
                raise FileNotFoundError(
                    f"task {task!r}: {listing} names {stem!r}, but {where} has no such image"
                )
        images = [by_stem[s] for s in stems]
    return [{"image": str(f), key: str(other_dir / f"{f.stem}.png")} for f in images]
