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


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields plus mild noise: compresses and downsamples like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


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


# -- the paper's data sets, in their distributed layouts ----------------------------------

def cub_tree(root: Path, n: int = 6, text_dir: str = "text") -> Path:
    """CUB-200-2011 + captions: n images over two classes, the first half train."""
    cub = root / "CUB_200_2011"
    listing, split = [], []
    for i in range(n):
        cls = "001.Black_footed_Albatross" if i % 2 == 0 else "002.Laysan_Albatross"
        rel = f"{cls}/{cls.split('.')[1]}_{i:04d}_{i}.jpg"
        save_image(cub / "images" / rel, (50, 40), seed=i)
        txt = (root / text_dir / rel).with_suffix(".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(f"bird {i} caption {k}" for k in range(10)) + "\n")
        listing.append(f"{i + 1} {rel}")
        split.append(f"{i + 1} {1 if i < n // 2 else 0}")
    (cub / "images.txt").write_text("\n".join(listing) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


def coco_tree(root: Path, year: int = 2014, n: int = 4) -> Path:
    """COCO captions: n train + 2 val images, 2 captions each."""
    for part, count in (("train", n), ("val", 2)):
        images, anns = [], []
        for i in range(count):
            image_id = 1000 * (part == "val") + 9 + i
            name = f"COCO_{part}{year}_{image_id:012d}.jpg" if year == 2014 else f"{image_id:012d}.jpg"
            save_image(root / f"{part}{year}" / name, (44, 36), seed=image_id)
            images.append({"id": image_id, "file_name": name, "width": 44, "height": 36})
            anns += [{"id": 10 * image_id + k, "image_id": image_id, "caption": f"{part} image {i} caption {k}"}
                     for k in range(2)]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{part}{year}.json").write_text(
            json.dumps({"images": images, "annotations": anns}))
    return root


def coco_qa_tree(root: Path) -> Path:
    coco_tree(root, 2014, n=3)
    for part, ids in (("train", [9, 10, 11, 9]), ("test", [1009, 1010])):
        d = root / "cocoqa" / part
        d.mkdir(parents=True, exist_ok=True)
        (d / "img_ids.txt").write_text("\n".join(map(str, ids)) + "\n")
        (d / "questions.txt").write_text("\n".join(f"what is in picture {i} ?" for i in ids) + "\n")
        (d / "answers.txt").write_text("\n".join(f"thing{i}" for i in ids) + "\n")
        (d / "types.txt").write_text("\n".join(str(k % 4) for k in range(len(ids))) + "\n")
    return root


def celeba_tree(root: Path, ids=(0, 1, 2, 24000, 24001), masks: bool = True) -> Path:
    for i in ids:
        save_image(root / "CelebA-HQ-img" / f"{i}.jpg", (64, 64), seed=i)
        (root / "celeba-caption").mkdir(parents=True, exist_ok=True)
        (root / "celeba-caption" / f"{i}.txt").write_text(
            "\n".join(f"the woman {i} has black hair, caption {k}" for k in range(10)) + "\n")
        if masks:
            (root / "CelebAMask-HQ-mask").mkdir(parents=True, exist_ok=True)
            labels = np.zeros((32, 32), dtype=np.uint8)
            labels[:, :16] = 1  # left half class 1 (mask at half the image resolution)
            labels[0, 0] = 18
            Image.fromarray(labels, "L").save(root / "CelebAMask-HQ-mask" / f"{i}.png")
    return root


def textcaps_tree(root: Path) -> Path:
    for part, ids in (("train", ["aa01", "aa02", "aa03"]), ("val", ["bb01"])):
        data = []
        for j, image_id in enumerate(ids):
            save_image(root / "train_images" / f"{image_id}.jpg", (40, 48), seed=j)
            data += [{"image_id": image_id, "image_path": f"train/{image_id}.jpg",
                      "caption_str": f"a sign that says {image_id} number {k}"} for k in range(3)]
        (root / f"TextCaps_0.1_{part}.json").write_text(json.dumps({"dataset_name": "textcaps", "data": data}))
    return root


def refcoco_tree(root: Path) -> Path:
    """RefCOCO: 2 COCO images, 3 refs (train, val, testA) in refs(unc).p (protocol 2, as the
    Python 2 original) + instances.json."""
    import pickle

    images, anns, refs = [], [], []
    for i, image_id in enumerate((581857, 9)):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        save_image(root / "train2014" / name, (80, 40), seed=i)  # wide: crops move boxes
        images.append({"id": image_id, "file_name": name, "width": 80, "height": 40})
    anns = [{"id": 1, "image_id": 581857, "bbox": [10.0, 5.0, 20.0, 10.0]},
            {"id": 2, "image_id": 9, "bbox": [40.0, 0.0, 40.0, 40.0]},
            {"id": 3, "image_id": 9, "bbox": [0.0, 10.0, 8.0, 8.0]}]
    for ref_id, (ann, image_id, split) in enumerate([(1, 581857, "train"), (2, 9, "val"), (3, 9, "testA")]):
        refs.append({"ref_id": ref_id, "ann_id": ann, "image_id": image_id, "split": split,
                     "category_id": 1, "file_name": f"COCO_train2014_{image_id:012d}_{ann}.jpg",
                     "sentences": [{"sent": f"the thing {ref_id}", "tokens": ["the", "thing"]},
                                   {"sent": f"object number {ref_id}", "tokens": ["object"]}]})
    (root / "refcoco").mkdir(parents=True, exist_ok=True)
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "refcoco" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def write_shards(folder: Path, shards: int = 8, per_shard: int = 5, bad: dict | None = None) -> list[Path]:
    """WebDataset tar shards of ``per_shard`` samples each (key ``s{shard}_{i}``: .jpg + .txt).
    ``bad`` maps a key to what is wrong with it: ``corrupt``, ``no_caption``, ``no_image``."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    paths = []
    for s in range(shards):
        path = folder / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"s{s}_{i}"
                members = {"jpg": jpeg_bytes(seed=s * 100 + i), "txt": f"caption of {key}\nsecond {key}\n".encode()}
                if bad.get(key) == "corrupt":
                    members["jpg"] = b"garbage" * 20
                elif bad.get(key) == "no_caption":
                    del members["txt"]
                elif bad.get(key) == "no_image":
                    del members["jpg"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
