"""The ``shapes`` data set: procedural scenes with captions, questions and referring
expressions, generated deterministically from a seed (no files, no downloads).

Registered as the dataset ``shapes``; gin module ``lgvq.dataset.shapes``::

    data = lgvq_plugins.create_dataset("shapes", split="train", size=64)
    sample = data[0]   # image, caption, question, answer, refexp, box, semantic, ...

Every sample is drawn from its own random stream ``numpy.random.default_rng([seed, salt,
split_id, index])``, so random access is O(1), two dataset objects with the same settings
hold identical samples, and the three splits come from disjoint streams. Images carry a
continuous background tint and brightness jitter, so in practice no image repeats within
or across splits. Layouts (the label maps, tint aside) cannot repeat across splits either:
a lone object, whose renderings are few enough to recur, is placed so that a hash of its
label maps names its split (90 / 5 / 5 %); scenes with more objects are too many to recur.
The tests hash every val/test image and label map against a slice of train.

Colours: red, orange, yellow, green, cyan, blue, purple, white (``COLOURS``); shapes:
circle, square, triangle, diamond, cross (``SHAPES``); sizes: small, large. No two objects
of a scene share size, colour *and* shape, so every object can be referred to. Spatial
relations are read from object centres and stated only beyond ``relation_margin``.

Sample keys (all default-collatable):

* ``image`` float32 (3, H, W) in [-1, 1];
* ``caption`` str — train: one of the image's captions, chosen by a hash of (seed, index,
  epoch) (call :meth:`ShapesDataset.set_epoch` each epoch); val/test: always the first,
  which mentions every object;
* ``question``/``answer`` str — question kind drawn uniformly, then a question of it;
* ``refexp`` str and ``box`` float32 (4,) ``(x0, y0, x1, y1)`` in pixels, tight to the
  referred object's pixels, ``x1``/``y1`` exclusive (width = x1 - x0);
* ``semantic`` int64 (H, W): 0 background, 1 circle, 2 square, 3 triangle, 4 diamond,
  5 cross (``SEMANTIC_CLASSES``);
* ``colour_map`` int64 (H, W): 0 background, 1 + index in ``COLOURS`` (``COLOUR_CLASSES``);
* ``index`` int.

Variable-length things stay off the sample: :meth:`~ShapesDataset.captions`,
:meth:`~ShapesDataset.questions`, :meth:`~ShapesDataset.refexps` and
:meth:`~ShapesDataset.scene` return them per index.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lgvq_plugins.data import shapes_scene as scene_mod
from lgvq_plugins.data import shapes_text as text_mod
from lgvq_plugins.data.shapes_scene import COLOUR_NAMES, SHAPES, SIZES, Scene
from lgvq_plugins.data.shapes_text import ANSWERS, QA, QUESTION_KINDS, Facts, RefExp
from lgvq_plugins.data.transforms import mix as _mix
from lgvq_plugins.hookspecs import hookimpl

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_SAMPLES: dict[str, int] = {"train": 20000, "val": 1000, "test": 1000}
SEMANTIC_CLASSES: tuple[str, ...] = ("background", *SHAPES)
COLOUR_CLASSES: tuple[str, ...] = ("background", *COLOUR_NAMES)
MAX_OBJECTS = len(text_mod.NUMBERS) - 1  # count answers are spelled out up to "six"

# Keeps this data set's random streams apart from any other use of default_rng([seed, ...]).
_STREAM_SALT = 0x5AA9E5




def _lone_object_split(shape: int, colour: int, size: int, box: Sequence[int]) -> int:
    """The split a one-object scene may appear in: a hash of what its label maps show
    (shape, colour, pixel box), cut 90 / 5 / 5 %. Identical label maps always land in the
    same split."""
    bucket = _mix(shape, colour, size, *box) % 100
    return 0 if bucket < 90 else 1 if bucket < 95 else 2


def _move_into_split(rng: np.random.Generator, layout: scene_mod.Layout, size: int,
                     split_id: int) -> scene_mod.Layout:
    """Keep a one-object layout if its label maps belong to ``split_id``, else move the
    object to a random position that does.

    A lone object has only ~10^6 distinct renderings, so independent random streams would
    put the same layout (up to tint) into two splits a few times per 20000 images; this
    makes it impossible. Scenes with two or more objects have far too many renderings to
    repeat and are not filtered. The object keeps its shape, colour and size, and positions
    are drawn uniformly within the split's share, so the splits stay identically distributed.
    """
    shape, colour, half = int(layout.shape[0]), int(layout.colour[0]), float(layout.half[0])
    box = scene_mod.lone_object_boxes(shape, layout.centre, half, size)[0].tolist()
    if _lone_object_split(shape, colour, size, box) == split_id:
        return layout
    while True:  # val/test accept 1 position in 20: try a batch of 32 at once
        centres = scene_mod.random_centres(rng, half, size, 32)
        for centre, box in zip(centres, scene_mod.lone_object_boxes(shape, centres, half, size).tolist()):
            if _lone_object_split(shape, colour, size, box) == split_id:
                return layout._replace(centre=centre[None, :])


class ShapesDataset(Dataset):
    """Procedural scenes of 1–``max_objects`` coloured shapes with matching language.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``; each draws from its own random streams.
        size: image side in pixels (>= 32).
        num_samples: length of the split; ``None`` uses 20000 / 1000 / 1000.
        seed: base seed; another seed gives another data set.
        captions_per_image: captions kept per image (the first one mentions every object).
        max_objects: most objects per scene (1–6).
        min_objects: fewest objects per scene.
        relation_margin: pixels by which centres must differ before a spatial relation is
            stated; ``None`` uses ``size / 16``.
    """

    SHAPES = SHAPES
    COLOURS = COLOUR_NAMES
    SIZES = SIZES
    ANSWERS = ANSWERS
    QUESTION_KINDS = QUESTION_KINDS
    SEMANTIC_CLASSES = SEMANTIC_CLASSES
    COLOUR_CLASSES = COLOUR_CLASSES

    def __init__(self, split: str = "train", size: int = 64, num_samples: int | None = None,
                 seed: int = 0, captions_per_image: int = 5, max_objects: int = 3,
                 min_objects: int = 1, relation_margin: float | None = None):
        if split not in SPLITS:
            raise ValueError(f"shapes: split={split!r} is not one of {', '.join(SPLITS)}")
        scene_mod.check_size(size)
        if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"shapes: need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got "
                             f"min_objects={min_objects}, max_objects={max_objects}")
        if max_objects > len(SHAPES) * len(COLOUR_NAMES) * len(SIZES):
            raise ValueError("shapes: max_objects exceeds the number of distinct objects")
        if captions_per_image < 1:
            raise ValueError(f"shapes: captions_per_image={captions_per_image} must be >= 1")
        num_samples = DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        if num_samples < 0:
            raise ValueError(f"shapes: num_samples={num_samples} must be >= 0")
        if seed < 0:
            raise ValueError(f"shapes: seed={seed} must be >= 0 (numpy seeds are non-negative)")
        self.split, self.size, self.num_samples, self.seed = split, int(size), num_samples, int(seed)
        self.captions_per_image, self.max_objects, self.min_objects = captions_per_image, max_objects, min_objects
        self.relation_margin = size / 16.0 if relation_margin is None else float(relation_margin)
        self.epoch = 0

    # -- generation ---------------------------------------------------------------------
    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM_SALT, SPLITS[self.split], index])

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"shapes[{self.split}]: index {index} out of range 0..{self.num_samples - 1}")
        return index

    def _generate(self, index: int, signed: bool = False
                  ) -> tuple[scene_mod.Layout, scene_mod.Rendered, Facts, np.random.Generator]:
        rng = self._rng(index)
        layout = scene_mod.sample_layout(rng, self.size, self.min_objects, self.max_objects)
        if len(layout.shape) == 1:
            layout = _move_into_split(rng, layout, self.size, SPLITS[self.split])
        rendered = scene_mod.render(layout, self.size, signed=signed)
        facts = Facts(layout.shape, layout.colour, layout.large, layout.centre, self.size,
                      self.relation_margin)
        return layout, rendered, facts, rng

    def _pick(self, index: int, salt: int, n: int) -> int:
        """Which of ``n`` options a sample uses: fixed for val/test, per epoch for train."""
        if self.split != "train":
            return _mix(self.seed, index, salt) % n if salt else 0
        return _mix(self.seed, index, self.epoch, salt) % n

    # -- public API -------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Choose which of each image's captions/questions/refexps training samples use.
        With ``DataLoader(num_workers>0, persistent_workers=True)`` workers keep their own
        copy: call it before the workers start (or do not persist them)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        _, rendered, facts, rng = self._generate(index, signed=True)
        captions = text_mod.choose_captions(facts, rng, self.captions_per_image)
        caption = captions[self._pick(index, 0, len(captions))]
        # Question kind first, then a question of that kind, so the frequent kinds
        # (counting, attributes) do not crowd out relations and existence. Only the chosen
        # kind is generated; the choice matches ``questions(index)``.
        kinds = facts.question_kinds()
        of_kind = text_mod.question_candidates(facts, rng, [kinds[self._pick(index, 1, len(kinds))]])
        qa = of_kind[self._pick(index, 2, len(of_kind))]
        # Object first, then an expression for it, so every object is referred to as often
        # (each object has at least its full description, which is unique in the scene).
        target = self._pick(index, 3, facts.n)
        of_target = text_mod.refexp_candidates(facts, target)
        ref = of_target[self._pick(index, 4, len(of_target))]
        return {
            "image": torch.from_numpy(rendered.image),
            "caption": caption,
            "question": qa.question,
            "answer": qa.answer,
            "refexp": ref.text,
            "box": torch.from_numpy(rendered.boxes[target].copy()),
            "semantic": torch.from_numpy(rendered.semantic),
            "colour_map": torch.from_numpy(rendered.colour_map),
            "index": index,
        }

    def captions(self, index: int) -> list[str]:
        """The image's ``captions_per_image`` captions (the first mentions every object)."""
        index = self._check_index(index)
        _, _, facts, rng = self._generate(index)
        return text_mod.choose_captions(facts, rng, self.captions_per_image)

    def questions(self, index: int) -> list[QA]:
        """Every question (with answer and kind) asked about the image."""
        index = self._check_index(index)
        _, _, facts, rng = self._generate(index)
        text_mod.choose_captions(facts, rng, self.captions_per_image)  # same rng state as __getitem__
        return text_mod.question_candidates(facts, rng)

    def refexps(self, index: int) -> list[tuple[str, tuple[float, float, float, float]]]:
        """Every referring expression for the image, each with its object's box."""
        index = self._check_index(index)
        _, rendered, facts, _ = self._generate(index)
        return [(r.text, tuple(float(b) for b in rendered.boxes[r.target]))
                for r in text_mod.refexp_candidates(facts)]

    def refexp_targets(self, index: int) -> list[RefExp]:
        """Every referring expression with the index (in :meth:`scene`) of its object."""
        index = self._check_index(index)
        return text_mod.refexp_candidates(self._generate(index)[2])

    def scene(self, index: int) -> Scene:
        """The structured scene: objects with shape, colour, size, centre and box."""
        index = self._check_index(index)
        layout, rendered, _, _ = self._generate(index)
        return scene_mod.to_scene(layout, rendered.boxes, self.size)

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word (and ``,`` ``:`` ``?``) that captions, questions, answers and
        referring expressions use."""
        return text_mod.vocabulary()

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, size={self.size}, num_samples={self.num_samples}, "
                f"seed={self.seed}, objects={self.min_objects}..{self.max_objects})")


@hookimpl
def register_datasets(register):
    register("shapes", ShapesDataset)
