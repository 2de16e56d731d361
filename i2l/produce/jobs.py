"""What to produce: one StyleJob per style, from a validation manifest (references read from the val shards beside
it) or from a folder of user images, checked before any work starts."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # style ids become file names


@dataclass
class StyleJob:
    """One LoRA to make: a style id, the ids of its references (row ids or file names) and their encoded bytes."""

    style_id: str
    ref_ids: list[str]
    images: list[bytes] = field(repr=False)


def jobs_from_manifest(manifest_path: str | os.PathLike, limit: int | None = None) -> list[StyleJob]:
    """One job per style of a validation manifest (its first sample's references), read from the val shards beside
    it (`i2l prepare` output). Manifest ids are looked up in the shards; no path found in data is ever opened."""
    from i2l.data.shards import iter_rows

    path = Path(manifest_path)
    path = path / "val_manifest.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no validation manifest at {path}: run `i2l prepare` first, or pass --images DIR")
    entries: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            style, refs = str(e["style_id"]), [str(r) for r in e["reference_ids"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: not a manifest entry with style_id and reference_ids ({err})") from None
        entries.setdefault(style, refs)
        if limit and len(entries) >= limit:
            break
    wanted = {r for refs in entries.values() for r in refs}
    images = {r["id"]: r["image"] for r in iter_rows(path.parent, "val", columns=("id", "image")) if r["id"] in wanted}
    missing = sorted(wanted - set(images))
    if missing:
        raise ValueError(f"{path} names {len(missing)} reference id(s) missing from the val shards in {path.parent}, "
                         f"e.g. {missing[:3]}: re-run `i2l prepare`")
    return [StyleJob(s, refs, [images[r] for r in refs]) for s, refs in entries.items()]


def jobs_from_images(folder: str | os.PathLike) -> list[StyleJob]:
    """User images: each subfolder of `folder` is one style (its images fused into one LoRA); each image file directly
    in `folder` is a style of its own. Every image is decoded here, so a bad file fails the run before any work."""
    from i2l.data.images import decode

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                      and not p.name.startswith("."))

    groups = [(p.stem, [p]) for p in images_in(root)]
    groups += [(d.name, images_in(d)) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    empty = [name for name, files in groups if not files]
    if empty:
        raise ValueError(f"{len(empty)} style folder(s) without images ({', '.join(IMAGE_SUFFIXES)}): "
                         f"{_listed(empty)}")
    if not groups:
        raise ValueError(f"no reference images in {root}: put one image per style there, or one folder per style")
    data, bad = {}, []
    for _, files in groups:
        for f in files:
            try:  # each file read once: its bytes are decoded here and travel in the job
                data[f] = f.read_bytes()
                decode(data[f], name=str(f))  # raises naming the file: unreadable, truncated, too many pixels
            except (ValueError, OSError) as e:
                bad.append(str(e) if isinstance(e, ValueError) else f"cannot read image {f}: {e}")
    if bad:  # every one at once: a folder of many styles is not fixed one rerun per bad file
        raise ValueError(f"{len(bad)} reference image(s) cannot be used; fix or remove them and run again: "
                         + _listed(bad, "; "))
    return [StyleJob(re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "style", [f.name for f in files],
                     [data[f] for f in files]) for name, files in groups]


def _listed(items: list[str], sep: str = ", ", most: int = 20) -> str:
    more = f"{sep}... and {len(items) - most} more" if len(items) > most else ""
    return sep.join(items[:most]) + more


def check_jobs(jobs: list[StyleJob]) -> None:
    """Refuse, before anything is written, jobs that would not give exactly one LoRA file per style."""
    if not jobs:
        raise ValueError("nothing to produce: no styles given")
    seen = set()
    for j in jobs:
        if not _SAFE_ID.match(j.style_id):
            raise ValueError(f"style id {j.style_id!r} cannot be a file name: use letters, digits, '.', '_', '-'")
        if j.style_id in seen:
            raise ValueError(f"style {j.style_id!r} appears twice: every style gets exactly one LoRA")
        if not j.images or len(j.images) != len(j.ref_ids):
            raise ValueError(f"style {j.style_id!r} has no reference images")
        seen.add(j.style_id)
