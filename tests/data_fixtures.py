"""Tiny image trees for the real-data readers, built with PIL in a test's tmp_path (no
downloads): images with random content, and every kind of bad file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def save_image(path: Path, size: tuple[int, int] = (48, 40), mode: str = "RGB", seed: int = 0,
               fmt: str | None = None) -> Path:
    """A random-content image of ``size`` (width, height) in PIL ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    image = rgb if mode == "RGB" else rgb.convert(mode)
    image.save(path, format=fmt, quality=95) if (fmt or path.suffix.lower()) in ("JPEG", ".jpg", ".jpeg") \
        else image.save(path, format=fmt)
    return path


def solid_cmyk_jpeg(path: Path, cmyk: tuple[int, int, int, int], size: tuple[int, int] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", size, cmyk).save(path, format="JPEG", quality=100)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all" * 10)
    return path


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_text_tree(root: Path, n: int = 10, layout: str = "jsonl", split_field: bool = True,
                    size: tuple[int, int] = (48, 40)) -> Path:
    """``n`` images under root/imgs with two captions each, in the ``layout`` asked for
    (``jsonl``, ``csv`` or ``txt``). With ``split_field`` the last two images are ``val``."""
    root.mkdir(parents=True, exist_ok=True)
    lines, rows = [], ["image,caption" + (",split" if split_field else "")]
    for i in range(n):
        rel = f"imgs/{i:03d}.jpg"
        save_image(root / rel, size, seed=i)
        caps = [f"a photo number {i}", f"picture {i} of a red bird"]
        split = "train" if i < n - 2 else "val"
        if layout == "jsonl":
            rec = {"image": rel, "captions": caps}
            if split_field:
                rec["split"] = split
            lines.append(json.dumps(rec))
        elif layout == "csv":
            rows += [f"{rel},{c}" + (f",{split}" if split_field else "") for c in caps]
        else:
            (root / rel).with_suffix(".txt").write_text("\n".join(caps) + "\n")
    if layout == "jsonl":
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    elif layout == "csv":
        (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root
