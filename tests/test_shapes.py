"""The ``shapes`` data set: determinism, disjoint splits, and labels checked from the pixels.

Every label is re-derived here without the generator's bookkeeping: boxes and shapes from
the semantic map, colours from the rendered RGB (by hue), and every caption, question and
referring expression is parsed by this file's own small grammar and evaluated on the
object centres.
"""

from __future__ import annotations

import colorsys
import hashlib
import re

import gin
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import lgvq_plugins
from lgvq_plugins.config import parse_gin

# The documented label ids (lgvq_plugins/data/shapes.py docstring): written out here on purpose.
SHAPES = ["circle", "square", "triangle", "diamond", "cross"]  # semantic id = index + 1
COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"]  # colour id = index + 1
SIZES = ["small", "large"]
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle",
          "diamonds": "diamond", "crosses": "cross"}
NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
REL = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
OPP = {"left": "right", "right": "left", "above": "below", "below": "above"}

N_SAMPLES = 150  # scenes per split checked in the per-scene tests


def make(split: str = "val", **kwargs) -> Dataset:
    return lgvq_plugins.create_dataset("shapes", split=split, **kwargs)


@pytest.fixture(scope="module")
def val():
    return make("val")


@pytest.fixture(scope="module")
def train():
    return make("train")


# --------------------------------------------------------------------------------------
# An independent reading of the pixels and of the language
# --------------------------------------------------------------------------------------


def colour_of(rgb: np.ndarray) -> str:
    """Name a colour from its RGB in [0, 1] by hue (white: unsaturated and bright)."""
    h, s, v = colorsys.rgb_to_hsv(*map(float, rgb))
    if v < 0.4:  # the background is dark (and may be tinted); every object is bright
        return "background"
    if s < 0.2:
        return "white"
    hue = h * 360
    for name, lo, hi in (("red", -15, 15), ("orange", 20, 45), ("yellow", 48, 70), ("green", 100, 150),
                         ("cyan", 170, 195), ("blue", 215, 240), ("purple", 260, 295)):
        if lo <= hue <= hi or lo <= hue - 360 <= hi:
            return name
    return f"unknown hue {hue:.0f}"


def shape_of(mask: np.ndarray) -> str:
    """Classify one object's pixel mask by its fill ratio and row-width profile."""
    ys, xs = np.nonzero(mask)
    m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill, widths = m.mean(), m.sum(axis=1)
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    if len(set(widths.tolist())) <= 2:  # arms of one width and the full bar
        return "cross"
    if widths.argmax() >= 2 * len(widths) / 3:  # widest row at the bottom
        return "triangle"
    return "diamond"


def margin_of(ds) -> float:
    return ds.size / 16  # the documented default relation margin


def holds(a, b, rel: str, margin: float) -> bool:
    """Clear relation of object a with respect to object b, from the centres."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return {"left": ax < bx - margin, "right": ax > bx + margin,
            "above": ay < by - margin, "below": ay > by + margin}[rel]


_NP = (r"(?:a|an|the) (?:single )?(?:(small|large) )?(?:(" + "|".join(COLOURS) + r") )?("
       + "|".join(SHAPES) + r"|object)")
NP = re.compile(_NP)
REL_CLAUSE = re.compile(_NP + r" (to the left of|to the right of|above|below) " + _NP)
REGION = re.compile(_NP + r" (on the left|on the right|at the top|at the bottom)(?: |$|,)")


def fits(obj, size, colour, shape) -> bool:
    return ((size is None or obj.size == size) and (colour is None or obj.colour == colour)
            and (shape == "object" or obj.shape == shape))


def matching(scene, size, colour, shape) -> list[int]:
    return [k for k, o in enumerate(scene.objects) if fits(o, size, colour, shape)]


def check_caption(caption: str, scene, margin: float) -> None:
    objs, n = scene.objects, len(scene.objects)
    nps = NP.findall(caption)
    assert nps, caption
    for size, colour, shape in nps:
        assert matching(scene, size or None, colour or None, shape), f"{caption!r}: no {size} {colour} {shape}"
    for m in REL_CLAUSE.finditer(caption):
        g = m.groups()
        a, rel, b = g[:3], REL[g[3]], g[4:]
        pairs = [(i, j) for i in matching(scene, *(x or None for x in a)) for j in matching(scene, *(x or None for x in b))
                 if i != j and holds(objs[i], objs[j], rel, margin)]
        assert pairs, f"{caption!r}: relation {m.group(0)!r} does not hold"
    for m in REGION.finditer(caption):
        g = m.groups()
        axis, side = {"on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1), "at the bottom": (1, 1)}[g[3]]
        assert any(side * (objs[k].centre[axis] - scene.size / 2) > margin
                   for k in matching(scene, *(x or None for x in g[:3]))), caption
    if "a single " in caption:
        assert n == 1, caption
    count = re.match(r"(?:there are |there is )?(one|two|three|four|five|six) objects?: ", caption)
    if count:
        assert NUMBER[count.group(1)] == n, caption
    order = re.match(r"from (left to right|top to bottom): ", caption)
    if order or count:
        # a complete listing: every object exactly once
        listed = [matching(scene, s or None, c or None, sh) for s, c, sh in nps]
        assert all(len(k) == 1 for k in listed) and sorted(k[0] for k in listed) == list(range(n)), caption
        if order:
            axis = 0 if order.group(1) == "left to right" else 1
            pos = [objs[k[0]].centre[axis] for k in listed]
            assert all(q - p > margin for p, q in zip(pos, pos[1:])), caption


def the(scene, text: str) -> int:
    """Resolve a definite description ``the [size] [colour] shape|object``: exactly one object."""
    m = re.fullmatch(_NP, text)
    assert m and text.startswith("the "), text
    found = matching(scene, *(x or None for x in m.groups()))
    assert len(found) == 1, f"{text!r} fits {len(found)} objects"
    return found[0]


def resolve_refexp(scene, text: str, margin: float) -> int:
    """The one object a referring expression picks out (asserts that it is exactly one)."""
    objs = scene.objects
    m = re.fullmatch(r"the (leftmost|rightmost|topmost|bottommost) (?:(" + "|".join(COLOURS) + r") )?("
                     + "|".join(SHAPES) + r"|object)", text)
    if m:
        axis, side = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}[m.group(1)]
        cands = matching(scene, None, m.group(2), m.group(3))
        assert len(cands) >= 2, text  # a superlative compares at least two
        best = max(cands, key=lambda k: side * objs[k].centre[axis])
        assert all(side * (objs[best].centre[axis] - objs[k].centre[axis]) > margin for k in cands if k != best), text
        return best
    m = re.fullmatch(r"the (" + "|".join(SHAPES) + r"|object) (to the left of|to the right of|above|below) (the .*)", text)
    if m:
        landmark, rel = the(scene, m.group(3)), REL[m.group(2)]
        cands = [k for k in matching(scene, None, None, m.group(1)) if k != landmark]
        yes = [k for k in cands if holds(objs[k], objs[landmark], rel, margin)]
        assert len(yes) == 1, text
        assert all(holds(objs[k], objs[landmark], OPP[rel], margin) for k in cands if k != yes[0]), text
        return yes[0]
    return the(scene, text)


def answer_of(scene, question: str, margin: float) -> str:
    """Answer a question from the scene alone."""
    objs, names = scene.objects, {v: k for k, v in NUMBER.items()}
    if question == "how many objects are there?":
        return names[len(objs)]
    m = re.fullmatch(r"how many (\w+) objects are there\?", question)
    if m:
        w = m.group(1)
        return names[sum(o.size == w or o.colour == w for o in objs)]
    m = re.fullmatch(r"how many (\w+) are there\?", question)
    if m:
        return names[sum(o.shape == PLURAL[m.group(1)] for o in objs)]
    m = re.fullmatch(r"what (colour|shape|size) is (the .*)\?", question)
    if m:
        obj = objs[the(scene, m.group(2))]
        assert getattr(obj, m.group(1)) not in m.group(2).split(), f"{question!r} names its own answer"
        return getattr(obj, m.group(1))
    m = re.fullmatch(r"is (the .*?) (to the left of|to the right of|above|below) (the .*)\?", question)
    if m:
        a, b, rel = objs[the(scene, m.group(1))], objs[the(scene, m.group(3))], REL[m.group(2)]
        if holds(a, b, rel, margin):
            return "yes"
        assert holds(a, b, OPP[rel], margin), f"{question!r} has no clear answer"
        return "no"
    m = re.fullmatch(r"is there an? (\w+) (\w+)\?", question)
    if m:
        return "yes" if any(o.colour == m.group(1) and o.shape == m.group(2) for o in objs) else "no"
    raise AssertionError(f"question outside the grammar: {question!r}")


def pixel_boxes(sample, scene) -> list[tuple[int, int, int, int]]:
    """Tight box of each object's pixels in the semantic map (same shape and colour id,
    inside the object's own square extent, which keeps look-alikes apart)."""
    sem, col = sample["semantic"].numpy(), sample["colour_map"].numpy()
    out = []
    for o in scene.objects:
        mine = (sem == SHAPES.index(o.shape) + 1) & (col == COLOURS.index(o.colour) + 1)
        yy, xx = np.mgrid[: sem.shape[0], : sem.shape[1]] + 0.5
        near = (np.abs(xx - o.centre[0]) <= o.half_extent + 0.5) & (np.abs(yy - o.centre[1]) <= o.half_extent + 0.5)
        ys, xs = np.nonzero(mine & near)
        out.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return out


# --------------------------------------------------------------------------------------
# Registry, factory, errors
# --------------------------------------------------------------------------------------


def test_registered_and_defaults():
    assert "shapes" in lgvq_plugins.list_datasets()
    assert [len(make(s)) for s in ("train", "val", "test")] == [20000, 1000, 1000]
    ds = make("train", num_samples=7)
    assert isinstance(ds, Dataset) and len(ds) == 7
    assert list(ds.SHAPES) == SHAPES and list(ds.COLOURS) == COLOURS and list(ds.SIZES) == SIZES
    assert list(ds.SEMANTIC_CLASSES) == ["background", *SHAPES]
    assert list(ds.COLOUR_CLASSES) == ["background", *COLOURS]
    with pytest.raises(IndexError):
        ds[7]
    assert ds[-1]["index"] == 6


@pytest.mark.parametrize("kwargs, words", [
    ({"split": "dev"}, "split"), ({"size": 16}, "size"), ({"max_objects": 9}, "max_objects"),
    ({"min_objects": 3, "max_objects": 2}, "min_objects"), ({"captions_per_image": 0}, "captions_per_image"),
])
def test_bad_settings_name_the_setting(kwargs, words):
    with pytest.raises(ValueError, match=words):
        lgvq_plugins.create_dataset("shapes", **{"split": "val", **kwargs})


# --------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("split", ["train", "val"])
def test_deterministic_across_objects_and_access_order(split):
    one, two = make(split), make(split)
    indices = [0, 1, 17, 999, 5, 1]
    forward = [one[i] for i in indices]
    backward = [two[i] for i in reversed(indices)][::-1]
    for i, a, b in zip(indices, forward, backward):
        assert _same(a, b) and a["index"] == i
        assert one.captions(i) == two.captions(i) and one.questions(i) == two.questions(i)
        assert one.refexps(i) == two.refexps(i) and one.scene(i) == two.scene(i)


def test_different_seeds_differ():
    a, b = make("val", seed=0), make("val", seed=1)
    assert all(not torch.equal(a[i]["image"], b[i]["image"]) for i in range(20))
    assert sum(a.captions(i) != b.captions(i) for i in range(20)) >= 18


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def test_splits_disjoint_by_image_and_by_label_map():
    """No image repeats within or across splits; nor does a label map (the layout with
    tint and brightness removed) across splits."""
    images: dict[str, tuple[str, int]] = {}
    layouts: dict[str, str] = {}
    for split, n in (("val", 1000), ("test", 1000), ("train", 1500)):
        ds = make(split)
        for i in range(n):
            s = ds[i]
            key = _digest(s["image"])
            assert key not in images, f"{split}[{i}] repeats {images[key]}"
            images[key] = (split, i)
            layout = _digest(s["semantic"]) + _digest(s["colour_map"])
            assert layouts.setdefault(layout, split) == split, f"{split}[{i}] has the layout of a {layouts[layout]} image"


def test_lone_objects_fall_in_their_splits_share():
    """One-object scenes are placed so that the hash of what their label maps show (shape,
    colour, pixel box) names their split: the same lone-object layout cannot occur in two
    splits. Checked with the box read back from the semantic map."""
    from lgvq_plugins.data.shapes import SPLITS, _lone_object_split

    for split in SPLITS:
        ds, seen = make(split, max_objects=1, num_samples=60), 0
        for i in range(len(ds)):
            s, scene = ds[i], ds.scene(i)
            (o,), (box,) = scene.objects, pixel_boxes(s, scene)
            assert _lone_object_split(SHAPES.index(o.shape), COLOURS.index(o.colour), ds.size, box) == SPLITS[split]
            seen += 1
        assert seen == 60


def test_epoch_changes_train_captions_only(train, val):
    for ds in (train, val):
        ds.set_epoch(0)
    first = [train[i]["caption"] for i in range(60)]
    val_first = [val[i]["caption"] for i in range(60)]
    train.set_epoch(1)
    val.set_epoch(1)
    second = [train[i]["caption"] for i in range(60)]
    assert [val[i]["caption"] for i in range(60)] == val_first
    assert val_first == [val.captions(i)[0] for i in range(60)]  # val: always the first caption
    assert sum(a != b for a, b in zip(first, second)) >= 30
    assert all(c in train.captions(i) for i, c in enumerate(first))
    assert all(c in train.captions(i) for i, c in enumerate(second))
    train.set_epoch(0)
    assert [train[i]["caption"] for i in range(60)] == first


# --------------------------------------------------------------------------------------
# Labels from the pixels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, max_objects", [(64, 3), (96, 5)])
def test_labels_agree_with_pixels(size, max_objects):
    ds = make("val", size=size, max_objects=max_objects, num_samples=N_SAMPLES)
    counts = set()
    for i in range(N_SAMPLES):
        s, scene = ds[i], ds.scene(i)
        image = (s["image"].numpy() + 1) / 2  # (3, H, W) in [0, 1]
        sem, col = s["semantic"].numpy(), s["colour_map"].numpy()
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, size, size)
        assert s["semantic"].dtype == torch.int64 and sem.shape == (size, size)
        assert image.min() >= 0 and image.max() <= 1
        counts.add(len(scene.objects))

        # the semantic map's classes are the scene's shapes; background is uniform and dark
        assert set(np.unique(sem).tolist()) == {0} | {SHAPES.index(o.shape) + 1 for o in scene.objects}
        assert ((sem == 0) == (col == 0)).all()
        bg = image[:, sem == 0]
        assert np.ptp(bg, axis=1).max() == 0 and colour_of(bg[:, 0]) == "background"

        for o, box in zip(scene.objects, pixel_boxes(s, scene)):
            assert o.box == box  # the scene's box is tight to the object's pixels
            x0, y0, x1, y1 = box
            mask = np.zeros_like(sem, dtype=bool)
            mask[y0:y1, x0:x1] = sem[y0:y1, x0:x1] == SHAPES.index(o.shape) + 1
            assert shape_of(mask) == o.shape
            cx, cy = int(o.centre[0]), int(o.centre[1])
            assert colour_of(image[:, cy, cx]) == o.colour  # the pixel at the centre
            assert {colour_of(image[:, y, x]) for y, x in zip(*np.nonzero(mask))} == {o.colour}
        # size classes are far apart in pixels: every large box is wider than every small one
        widths = {o.size: [] for o in scene.objects}
        for o in scene.objects:
            widths[o.size].append(o.box[2] - o.box[0])
        if len(widths) == 2:
            assert min(widths["large"]) > max(widths["small"])

        # the sample's box is tight to the pixels of the object its refexp names
        target = resolve_refexp(scene, s["refexp"], margin_of(ds))
        assert s["box"].dtype == torch.float32 and s["box"].shape == (4,)
        assert tuple(s["box"].tolist()) == pixel_boxes(s, scene)[target]
    assert counts == set(range(1, max_objects + 1))


# --------------------------------------------------------------------------------------
# Language checked against the scene
# --------------------------------------------------------------------------------------


def _vocab_ok(ds, text: str) -> bool:
    return set(re.findall(r"[a-z]+|[,:?]", text)) <= set(ds.vocabulary())


def test_captions_true_of_the_scene(val):
    for i in range(N_SAMPLES):
        scene, captions = val.scene(i), val.captions(i)
        assert len(captions) == 5 and len(set(captions)) == 5
        for c in captions:
            check_caption(c, scene, margin_of(val))
            assert _vocab_ok(val, c)
        # the first caption (the one val/test use) names every object
        first = [matching(scene, s or None, c or None, sh) for s, c, sh in NP.findall(captions[0])]
        assert {k for f in first for k in f} == set(range(len(scene.objects)))


def test_caption_checker_rejects_false_captions(val):
    """The checker above can fail: wrong colour, wrong relation, wrong count."""
    i = next(k for k in range(50) if len(val.scene(k).objects) == 2)
    scene, m = val.scene(i), margin_of(val)
    a, b = scene.objects
    rel = "to the left of" if holds(a, b, "right", m) else "to the right of" if holds(a, b, "left", m) else None
    wrong_colour = next(c for c in COLOURS if c not in (a.colour, b.colour))
    bad = [f"a {wrong_colour} {a.shape}", f"three objects: a {a.colour} {a.shape}, a {b.colour} {b.shape} and a {a.colour} {a.shape}"]
    if rel:
        bad.append(f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}")
    for caption in bad:
        with pytest.raises(AssertionError):
            check_caption(caption, scene, m)


def test_answers_agree_with_the_scene(val):
    kinds = {}
    for i in range(N_SAMPLES):
        scene = val.scene(i)
        qas = val.questions(i)
        for q in qas:
            assert answer_of(scene, q.question, margin_of(val)) == q.answer, q
            assert q.answer in val.ANSWERS and _vocab_ok(val, q.question)
            kinds.setdefault(q.kind, []).append(q.answer)
        s = val[i]
        assert (s["question"], s["answer"]) in {(q.question, q.answer) for q in qas}
        assert answer_of(scene, s["question"], margin_of(val)) == s["answer"]
    assert set(kinds) == {"count", "colour", "shape", "size", "relation", "exist"}
    for kind in ("relation", "exist"):  # yes/no questions are balanced
        assert kinds[kind].count("yes") == kinds[kind].count("no")


def test_refexps_pick_out_exactly_one_object(val):
    styles = set()
    for i in range(N_SAMPLES):
        s, scene = val[i], val.scene(i)
        boxes = pixel_boxes(s, scene)
        refs = val.refexps(i)
        for text, box in refs:
            target = resolve_refexp(scene, text, margin_of(val))
            assert box == boxes[target], text
            assert _vocab_ok(val, text)
            styles.add("superlative" if "most " in text else "relation" if text.count("the ") == 2 else "attributes")
        assert (s["refexp"], tuple(s["box"].tolist())) in refs
        # every object can be referred to
        assert {resolve_refexp(scene, t, margin_of(val)) for t, _ in refs} == set(range(len(scene.objects)))
    assert styles == {"attributes", "relation", "superlative"}


def test_training_choices_cover_kinds_and_objects(train):
    """Training samples rotate through question kinds and refer to every object slot."""
    train.set_epoch(0)
    samples = [train[i] for i in range(200)]
    kinds = {q.kind for i, s in enumerate(samples) for q in train.questions(i) if q.question == s["question"]}
    assert kinds == {"count", "colour", "shape", "size", "relation", "exist"}
    answers = [s["answer"] for s in samples]
    assert 0.05 < answers.count("yes") / len(answers) < 0.4
    targets = [resolve_refexp(train.scene(i), s["refexp"], margin_of(train)) for i, s in enumerate(samples)]
    assert set(targets) == {0, 1, 2}
    three = [t for i, t in enumerate(targets) if len(train.scene(i).objects) == 3]
    assert min(three.count(k) for k in range(3)) > len(three) / 6  # roughly uniform over objects


# --------------------------------------------------------------------------------------
# Batching and configuration
# --------------------------------------------------------------------------------------


def test_default_collate_dataloader():
    ds = make("train", num_samples=16)
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=0)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["semantic"].shape == (8, 64, 64) and batch["semantic"].dtype == torch.int64
    assert batch["colour_map"].shape == (8, 64, 64)
    assert batch["box"].shape == (8, 4) and batch["box"].dtype == torch.float32
    assert batch["index"].tolist() == list(range(8))
    for key in ("caption", "question", "answer", "refexp"):
        assert isinstance(batch[key], list) and len(batch[key]) == 8 and all(isinstance(t, str) for t in batch[key])


def test_gin_file_binds_the_dataset():
    gin.clear_config()
    try:
        parse_gin(["gin/data/shapes.gin"], ["IMAGE_SIZE = 48", "lgvq.dataset.shapes.max_objects = 2"])
        ds = lgvq_plugins.create_dataset("shapes", split="val")
        assert ds.size == 48 and ds.max_objects == 2 and ds.captions_per_image == 5
        assert ds[0]["image"].shape == (3, 48, 48)
        assert max(len(ds.scene(i).objects) for i in range(40)) == 2
    finally:
        gin.clear_config()
