"""The dataset layout on disk and its validation (the authors' trainer's layout)::

    <root>/<object_id>/<n>_generation.png   target image (RGB)
    <root>/<object_id>/<n>_caption.txt      its caption
    <root>/<object_id>/<n>_mask.png         the subject's mask (white = subject)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ...core.errors import DreamCacheError
from ..progress import progress_bar

IMAGE_SUFFIX = "_generation.png"
CAPTION_SUFFIX = "_caption.txt"
MASK_SUFFIX = "_mask.png"
_FILE_RE = re.compile(r"^(?P<n>.+?)(?P<kind>_generation\.png|_caption\.txt|_mask\.png)$")
#: Mask pixels at or above this value (0..255) are the subject.
MASK_THRESHOLD = 128
#: How many problems an error message lists before "and N more".
_LISTED = 12


@dataclass(frozen=True)
class Item:
    """One training example: target image, caption and subject mask of ``<object_id>/<n>``."""

    object_id: str
    n: str
    root: str

    @property
    def name(self) -> str:
        return f"{self.object_id}/{self.n}"

    def path(self, suffix: str) -> Path:
        return Path(self.root) / self.object_id / f"{self.n}{suffix}"

    @property
    def image(self) -> Path:
        return self.path(IMAGE_SUFFIX)

    @property
    def caption(self) -> Path:
        return self.path(CAPTION_SUFFIX)

    @property
    def mask(self) -> Path:
        return self.path(MASK_SUFFIX)


@dataclass
class DatasetIndex:
    """The validated dataset: objects in sorted order, each with its items."""

    root: str
    objects: list[tuple[str, list[Item]]]

    @property
    def items(self) -> list[Item]:
        return [it for _, items in self.objects for it in items]

    def __len__(self) -> int:
        return sum(len(items) for _, items in self.objects)

    def describe(self) -> str:
        return f"{len(self.objects)} objects, {len(self)} images in {self.root}"


class DatasetError(DreamCacheError):
    """The dataset has broken items; ``problems`` lists every one as ``"<object>/<n>: what"``."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def scan_dataset(root: str | os.PathLike) -> tuple[list[tuple[str, list[Item]]], list[str]]:
    """The items under ``root`` and the structural problems (missing files, empty objects); reads no image."""
    root = Path(root)
    if not root.is_dir():
        raise DreamCacheError(f"Dataset folder '{root}' does not exist; pass the folder that holds one sub-folder per "
                              "object.")
    problems: list[str] = []
    objects: list[tuple[str, list[Item]]] = []
    for obj in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: _natural_key(p.name)):
        groups: dict[str, set[str]] = {}
        for f in obj.iterdir():
            m = _FILE_RE.match(f.name)
            if m and f.is_file():
                groups.setdefault(m.group("n"), set()).add(m.group("kind"))
        items = []
        for n in sorted(groups, key=_natural_key):
            have = groups[n]
            missing = [f"{n}{k}" for k in (IMAGE_SUFFIX, CAPTION_SUFFIX, MASK_SUFFIX) if k not in have]
            if missing:
                problems.append(f"{obj.name}/{n}: missing {', '.join(missing)}")
            else:
                items.append(Item(obj.name, n, str(root)))
        if not groups:
            problems.append(f"{obj.name}: no '<n>{IMAGE_SUFFIX}' files")
        if items:
            objects.append((obj.name, items))
    return objects, problems


def _open_image(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return ImageOps.exif_transpose(im)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """``(H, W, 3)`` uint8. Transparent pixels are composited on white."""
    im = _open_image(Path(path))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` bool, True = subject (grey value >= 128; an RGBA mask uses its alpha when it has one)."""
    im = _open_image(Path(path))
    if im.mode in ("RGBA", "LA"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            return alpha >= MASK_THRESHOLD
    return np.asarray(im.convert("L")) >= MASK_THRESHOLD


def check_item(item: Item) -> list[str]:
    """Every problem of one item (unreadable or mismatched files, empty mask or caption)."""
    out = []
    size = None
    try:
        with Image.open(item.image) as im:
            im.load()
            size = ImageOps.exif_transpose(im).size
    except Exception as e:
        out.append(f"{item.name}: unreadable image {item.image.name} ({type(e).__name__}: {str(e)[:80]})")
    try:
        mask = load_mask(item.mask)
        if size is not None and (mask.shape[1], mask.shape[0]) != size:
            out.append(f"{item.name}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}")
        elif not mask.any():
            out.append(f"{item.name}: empty mask (no pixel >= {MASK_THRESHOLD})")
    except Exception as e:
        out.append(f"{item.name}: unreadable mask {item.mask.name} ({type(e).__name__}: {str(e)[:80]})")
    try:
        text = item.caption.read_text(encoding="utf-8").strip()
        if not text:
            out.append(f"{item.name}: empty caption")
    except (OSError, UnicodeDecodeError) as e:
        out.append(f"{item.name}: unreadable caption ({type(e).__name__})")
    return out


def validate_dataset(root: str | os.PathLike, check_files: bool = True, progress: bool = False,
                     report: str | None = None) -> DatasetIndex:
    """Scan and (with ``check_files``) open every image, mask and caption; raise one :class:`DatasetError`
    listing every broken item, or return the index. ``report`` (a path) receives the full list of problems."""
    objects, problems = scan_dataset(root)
    if check_files:
        items = [it for _, its in objects for it in its]
        for it in progress_bar(items, progress, "checking dataset"):
            problems.extend(check_item(it))
    if problems:
        if report:
            Path(report).parent.mkdir(parents=True, exist_ok=True)
            Path(report).write_text("\n".join(problems) + "\n", encoding="utf-8")
        more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        shown = "; ".join(problems[:_LISTED]) + more
        where = f" (full list in {report})" if report else ""
        raise DatasetError(
            f"The dataset at '{root}' has {len(problems)} problem(s){where}: {shown}; fix or remove those items "
            f"(each needs <n>{IMAGE_SUFFIX}, <n>{CAPTION_SUFFIX} and a non-empty <n>{MASK_SUFFIX}).", problems)
    if not objects:
        raise DreamCacheError(f"The dataset at '{root}' holds no items; it needs <object_id>/<n>{IMAGE_SUFFIX} with a "
                              "caption and a mask "
                              "(build one with 'python -m dreamcache.data synth').")
    return DatasetIndex(str(root), objects)


def item_done(root: str | os.PathLike, object_id: str, n: int) -> bool:
    d = Path(root) / object_id
    return all((d / f"{n}{s}").is_file() for s in (IMAGE_SUFFIX, CAPTION_SUFFIX, MASK_SUFFIX))
