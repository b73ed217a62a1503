"""Language for ``shapes`` scenes: captions, question–answer pairs, referring expressions.

Everything is generated from a small grammar over the scene's facts and is *true of the
scene* by construction:

* Spatial relations come from object centres (x right, y down) and are stated only when
  they are clear: ``i`` is left of ``j`` when ``x_i < x_j - margin`` (likewise right,
  above, below). Inside the margin neither relation holds and none is stated or asked.
* Noun phrases in captions are existential ("a red circle"), so they only need to exist.
* Definite descriptions ("the red circle") in questions and referring expressions are
  used only when exactly one object fits them, and a relational or superlative expression
  ("the object left of the blue square", "the leftmost circle") only when exactly one
  candidate satisfies it and every other candidate clearly does not.

A scene given to this module has no two objects alike in size, colour *and* shape, so the
full description of every object is unique and every object can be referred to.
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple, Sequence

import numpy as np

from .shapes_scene import COLOUR_NAMES, SHAPES, SIZES

NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
PLURALS: dict[str, str] = {s: (s + "es" if s.endswith("s") else s + "s") for s in SHAPES}
YES_NO: tuple[str, ...] = ("yes", "no")

#: Every answer a question can have, in a fixed order (usable as VQA class ids).
ANSWERS: tuple[str, ...] = (*YES_NO, *NUMBERS[1:], *COLOUR_NAMES, *SHAPES, *SIZES)

RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of", "right": "to the right of", "above": "above", "below": "below",
}
OPPOSITE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}
#: superlative word → (axis of the centre, +1 for the largest value / -1 for the smallest)
SUPERLATIVES: dict[str, tuple[int, int]] = {
    "leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1),
}
#: absolute position phrase → (axis, side): stated when the centre is a margin past the midline
REGIONS: dict[str, tuple[int, int]] = {
    "on the left": (0, -1), "on the right": (0, 1), "at the top": (1, -1), "at the bottom": (1, 1),
}
QUESTION_KINDS: tuple[str, ...] = ("count", "colour", "shape", "size", "relation", "exist")

# Which attributes a description uses: (size, colour, shape). Ordered from short to long,
# so the first unique one is the shortest way to single an object out.
_USES: tuple[tuple[bool, bool, bool], ...] = (
    (False, False, True), (False, True, False), (True, False, False),
    (False, True, True), (True, False, True), (True, True, False), (True, True, True),
)
_FULL = (True, True, True)
_COLOUR_SHAPE = (False, True, True)
_NOTHING = (False, False, False)

# Fixed words of the grammar's templates (the attribute words are added to these).
_TEMPLATE_TEXT = """
a an the one object objects: there is are picture of image single on dark background and
from left to right top to bottom, what colour size shape how many is there ?
leftmost rightmost topmost bottommost on the left on the right at the top at the bottom
to the left of to the right of above below
"""


class QA(NamedTuple):
    """One question with its answer and its kind (one of ``QUESTION_KINDS``)."""

    question: str
    answer: str
    kind: str


class RefExp(NamedTuple):
    """A referring expression and the index of the one object it picks out."""

    text: str
    target: int


class Facts:
    """What the grammar needs to know about a scene: attributes and clear relations.

    Args:
        shape, colour, large: per-object attribute indices (sequences of length N).
        centre: (N, 2) centres (x, y) in pixels.
        size: image side in pixels.
        margin: pixels a centre must clear before a relation is stated.
    """

    def __init__(self, shape: Sequence[int], colour: Sequence[int], large: Sequence[bool],
                 centre: np.ndarray, size: int, margin: float):
        self.n = len(shape)
        # (size word, colour word, shape word) per object
        self.attrs = [(SIZES[int(large[i])], COLOUR_NAMES[int(colour[i])], SHAPES[int(shape[i])])
                      for i in range(self.n)]
        self.centre = [(float(centre[i][0]), float(centre[i][1])) for i in range(self.n)]
        self.size, self.margin = size, margin
        d = np.asarray(centre, dtype=np.float64)[:, None, :] - np.asarray(centre, dtype=np.float64)[None, :, :]
        # rel[i][j]: clear relations of object i with respect to object j
        self.rel = [[[r for r, clear in (("left", d[i, j, 0] < -margin), ("right", d[i, j, 0] > margin),
                                         ("above", d[i, j, 1] < -margin), ("below", d[i, j, 1] > margin))
                      if clear] for j in range(self.n)] for i in range(self.n)]
        self.unique = [[u for u in _USES if self._count(self.attrs[i], u) == 1] for i in range(self.n)]
        if self.n == 1:
            self.unique[0].insert(0, _NOTHING)  # "the object"

    def _count(self, attrs: tuple[str, str, str], use: tuple[bool, bool, bool]) -> int:
        return sum(all(a == b for a, b, u in zip(attrs, other, use) if u) for other in self.attrs)

    def matching(self, use: tuple[bool, bool, bool], attrs: tuple[str, str, str]) -> list[int]:
        """Objects that fit a description with these attributes."""
        return [k for k, other in enumerate(self.attrs)
                if all(a == b for a, b, u in zip(attrs, other, use) if u)]

    def phrase(self, i: int, use: tuple[bool, bool, bool]) -> str:
        """Noun phrase without article, e.g. ``large red circle``, ``red object``."""
        size, colour, shape = self.attrs[i]
        words = [w for w, u in ((size, use[0]), (colour, use[1])) if u]
        words.append(shape if use[2] else "object")
        return " ".join(words)


def article(phrase: str) -> str:
    """``a``/``an`` + phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_list(items: Sequence[str]) -> str:
    """``x``, ``x and y``, ``x, y and z``."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _ordered(facts: Facts, axis: int) -> list[int] | None:
    """Objects sorted along an axis when every neighbour pair is clearly apart, else None."""
    order = sorted(range(facts.n), key=lambda k: facts.centre[k][axis])
    gaps_clear = all(facts.centre[b][axis] - facts.centre[a][axis] > facts.margin
                     for a, b in zip(order, order[1:]))
    return order if gaps_clear else None


def _regions(facts: Facts, i: int) -> list[str]:
    half = facts.size / 2.0
    return [p for p, (axis, side) in REGIONS.items()
            if side * (facts.centre[i][axis] - half) > facts.margin]


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------


def caption_candidates(facts: Facts) -> tuple[list[str], list[str]]:
    """All captions the grammar can say about the scene: ``(complete, partial)``, where a
    complete caption mentions every object with its colour and shape."""
    n = facts.n
    full = [article(facts.phrase(i, _FULL)) for i in range(n)]
    short = [article(facts.phrase(i, _COLOUR_SHAPE)) for i in range(n)]
    listing = join_list(full)
    count = f"{NUMBERS[n]} {'object' if n == 1 else 'objects'}"
    complete = [f"{count}: {listing}", listing, f"a picture of {listing}", f"an image of {listing}",
                join_list(short)]
    partial: list[str] = []
    if n == 1:
        complete += [f"there is {listing}", f"a single {facts.phrase(0, _FULL)}",
                     f"{listing} on a dark background", f"there is {short[0]}"]
        partial.append(article(facts.phrase(0, (True, False, True))))
    else:
        complete.append(f"there are {count}: {listing}")
        for axis, words in ((0, "from left to right"), (1, "from top to bottom")):
            order = _ordered(facts, axis)
            if order is not None:
                complete.append(f"{words}: {join_list([full[k] for k in order])}")
    for i in range(n):
        for region in _regions(facts, i):
            (complete if n == 1 else partial).append(f"{full[i]} {region}")
    clauses = []  # (text, objects mentioned)
    for i, j in itertools.permutations(range(n), 2):
        for r in facts.rel[i][j]:
            for a, b in ((full[i], full[j]), (short[i], short[j])):
                clauses.append((f"{a} {RELATION_PHRASES[r]} {b}", {i, j}))
    for text, objs in clauses:
        (complete if len(objs) == n else partial).append(text)
        (complete if len(objs) == n else partial).append(f"there is {text}")
    if n == 3:
        # Two clauses that together mention all three objects (first clause with full
        # descriptions only, to keep the list from growing quadratically).
        for (t1, o1), (t2, o2) in itertools.combinations(clauses[::2], 2):
            if len(o1 | o2) == 3:
                complete.append(f"{t1}, and {t2}")
    return list(dict.fromkeys(complete)), [p for p in dict.fromkeys(partial) if p not in complete]


def choose_captions(facts: Facts, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions: the first is complete (it is the one val/test use), the rest are
    drawn without replacement from everything else the grammar can say. If the grammar
    has fewer than ``count`` different captions for this scene, they repeat in order."""
    complete, partial = caption_candidates(facts)
    first = int(rng.integers(len(complete)))
    rest = complete[:first] + complete[first + 1:] + partial
    picked = [complete[first]] + [rest[k] for k in rng.permutation(len(rest))[: count - 1]]
    return [picked[k % len(picked)] for k in range(count)]


# --------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------


def question_candidates(facts: Facts, rng: np.random.Generator) -> list[QA]:
    """Every question with one clear answer that the grammar asks about the scene."""
    n, qas = facts.n, []
    qas.append(QA("how many objects are there?", NUMBERS[n], "count"))
    sizes, colours, shapes = (sorted({a[k] for a in facts.attrs}) for k in range(3))
    for word, k in [(s, 0) for s in sizes] + [(c, 1) for c in colours]:
        qas.append(QA(f"how many {word} objects are there?",
                      NUMBERS[sum(a[k] == word for a in facts.attrs)], "count"))
    for s in shapes:
        qas.append(QA(f"how many {PLURALS[s]} are there?",
                      NUMBERS[sum(a[2] == s for a in facts.attrs)], "count"))

    for i in range(n):
        for use in facts.unique[i]:
            the = "the " + facts.phrase(i, use)
            for k, kind in enumerate(("size", "colour", "shape")):
                if not use[k]:  # never ask about an attribute the question already names
                    qas.append(QA(f"what {kind} is {the}?", facts.attrs[i][k], kind))

    for i, j in itertools.permutations(range(n), 2):
        a = "the " + facts.phrase(i, facts.unique[i][0])
        b = "the " + facts.phrase(j, facts.unique[j][0])
        for r in facts.rel[i][j]:
            qas.append(QA(f"is {a} {RELATION_PHRASES[r]} {b}?", "yes", "relation"))
            qas.append(QA(f"is {a} {RELATION_PHRASES[OPPOSITE[r]]} {b}?", "no", "relation"))

    present = {(a[1], a[2]) for a in facts.attrs}
    for colour, shape in sorted(present):
        qas.append(QA(f"is there {article(colour + ' ' + shape)}?", "yes", "exist"))
    # As many "no" as "yes" questions, about colour–shape pairs the scene lacks.
    absent_pairs = len(COLOUR_NAMES) * len(SHAPES)
    for k in rng.permutation(absent_pairs)[: 2 * len(present)]:
        colour, shape = COLOUR_NAMES[k // len(SHAPES)], SHAPES[k % len(SHAPES)]
        if (colour, shape) not in present:
            qas.append(QA(f"is there {article(colour + ' ' + shape)}?", "no", "exist"))
            if sum(q.answer == "no" for q in qas if q.kind == "exist") == len(present):
                break
    return qas


# --------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------


def refexp_candidates(facts: Facts) -> list[RefExp]:
    """Every referring expression the grammar has for the scene; each picks out exactly
    one object."""
    n, out = facts.n, []
    for i in range(n):
        out.extend(RefExp("the " + facts.phrase(i, use), i) for use in facts.unique[i])
    if n == 1:
        return out

    # "the <head> <relation> the <landmark>": exactly one head-matching object (other than
    # the landmark) stands in the relation, and every other one clearly in the opposite one.
    for j in range(n):
        landmark = "the " + facts.phrase(j, facts.unique[j][0])
        for r in RELATIONS:
            for head in (_NOTHING, (False, False, True)):
                for i in range(n):
                    if i == j or r not in facts.rel[i][j]:
                        continue
                    others = [k for k in facts.matching(head, facts.attrs[i]) if k not in (i, j)]
                    if all(OPPOSITE[r] in facts.rel[k][j] for k in others):
                        out.append(RefExp(f"the {facts.phrase(i, head)} {RELATION_PHRASES[r]} {landmark}", i))

    # "the leftmost <head>": the extreme object along an axis, clear of the runner-up.
    for word, (axis, side) in SUPERLATIVES.items():
        for head in (_NOTHING, (False, False, True), (False, True, False)):
            for i in range(n):
                others = [k for k in facts.matching(head, facts.attrs[i]) if k != i]
                if others and all(side * (facts.centre[i][axis] - facts.centre[k][axis]) > facts.margin
                                  for k in others):
                    out.append(RefExp(f"the {word} {facts.phrase(i, head)}", i))
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z]+|[,:?]")


def words(text: str) -> list[str]:
    """Split generated text into the vocabulary's units (words and , : ?)."""
    return _WORD.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word and punctuation mark the grammar can produce, sorted."""
    attribute_words = [*SHAPES, *PLURALS.values(), *COLOUR_NAMES, *SIZES, *NUMBERS[1:], *YES_NO]
    return sorted(set(words(_TEMPLATE_TEXT)) | set(attribute_words))
