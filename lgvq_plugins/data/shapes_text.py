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

from lgvq_plugins.data.shapes_scene import COLOUR_NAMES, SHAPES, SIZES

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
_SHAPE = (False, False, True)
_COLOUR = (False, True, False)

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
        n = self.n = len(shape)
        # (size word, colour word, shape word) per object
        self.attrs = [(SIZES[int(large[i])], COLOUR_NAMES[int(colour[i])], SHAPES[int(shape[i])])
                      for i in range(n)]
        self.centre = [(float(x), float(y)) for x, y in np.asarray(centre).tolist()]
        self.size, self.margin = size, margin
        # rel[i][j]: the clear relations of object i with respect to object j
        self.rel = [[self._relations(i, j) for j in range(n)] for i in range(n)]
        self.has_relation = any(r for row in self.rel for r in row)
        # same[a][i]: objects sharing attribute a with object i (i included)
        same = [[frozenset(k for k in range(n) if self.attrs[k][a] == self.attrs[i][a]) for i in range(n)]
                for a in range(3)]
        everyone = frozenset(range(n))
        # matches[use][i]: objects fitting object i's description with those attributes
        self.matches = {use: [sorted(everyone.intersection(*(same[a][i] for a in range(3) if use[a])))
                              for i in range(n)]
                        for use in (_NOTHING, *_USES)}
        self.unique = [[u for u in _USES if len(self.matches[u][i]) == 1] for i in range(n)]
        if n == 1:
            self.unique[0].insert(0, _NOTHING)  # "the object"
        self._phrases: dict[tuple[int, tuple[bool, bool, bool]], str] = {}

    def _relations(self, i: int, j: int) -> list[str]:
        dx = self.centre[i][0] - self.centre[j][0]
        dy = self.centre[i][1] - self.centre[j][1]  # y grows downwards: negative is "above"
        m, out = self.margin, []
        if dx < -m:
            out.append("left")
        elif dx > m:
            out.append("right")
        if dy < -m:
            out.append("above")
        elif dy > m:
            out.append("below")
        return out

    def question_kinds(self) -> list[str]:
        """The question kinds this scene has at least one question of: ``relation`` needs
        two objects clearly apart; asking an object's size (colour, shape) needs a unique
        description of it that does not already name its size (colour, shape)."""
        attribute = ("size", "colour", "shape")
        return [kind for kind in QUESTION_KINDS
                if (kind != "relation" or self.has_relation)
                and (kind not in attribute
                     or any(not use[attribute.index(kind)] for uses in self.unique for use in uses))]

    def phrase(self, i: int, use: tuple[bool, bool, bool]) -> str:
        """Noun phrase without article, e.g. ``large red circle``, ``red object``."""
        key = (i, use)
        text = self._phrases.get(key)
        if text is None:
            size, colour, shape = self.attrs[i]
            words = [w for w, u in ((size, use[0]), (colour, use[1])) if u]
            words.append(shape if use[2] else "object")
            text = self._phrases[key] = " ".join(words)
        return text


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
        # Two clauses that together mention all three objects (clauses with full
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


def _count_questions(facts: Facts) -> list[QA]:
    qas = [QA("how many objects are there?", NUMBERS[facts.n], "count")]
    for k in range(3):
        present = sorted({a[k] for a in facts.attrs})
        for word in present:
            what = PLURALS[word] if k == 2 else word + " objects"
            qas.append(QA(f"how many {what} are there?",
                          NUMBERS[sum(a[k] == word for a in facts.attrs)], "count"))
    return qas


def _attribute_questions(facts: Facts, kind: str) -> list[QA]:
    """``what <kind> is the <unique description>?``, never naming the asked attribute."""
    k = ("size", "colour", "shape").index(kind)
    return [QA(f"what {kind} is the {facts.phrase(i, use)}?", facts.attrs[i][k], kind)
            for i in range(facts.n) for use in facts.unique[i] if not use[k]]


def _relation_questions(facts: Facts) -> list[QA]:
    """One "yes" (the clear relation) and one "no" (its opposite) per clear relation."""
    qas = []
    for i, j in itertools.permutations(range(facts.n), 2):
        a = "the " + facts.phrase(i, facts.unique[i][0])
        b = "the " + facts.phrase(j, facts.unique[j][0])
        for r in facts.rel[i][j]:
            qas.append(QA(f"is {a} {RELATION_PHRASES[r]} {b}?", "yes", "relation"))
            qas.append(QA(f"is {a} {RELATION_PHRASES[OPPOSITE[r]]} {b}?", "no", "relation"))
    return qas


def _exist_questions(facts: Facts, rng: np.random.Generator) -> list[QA]:
    """``is there a <colour> <shape>?``: every pair present ("yes") and as many absent
    pairs ("no"), drawn from ``rng``."""
    present = sorted({(a[1], a[2]) for a in facts.attrs})
    qas = [QA(f"is there {article(c + ' ' + s)}?", "yes", "exist") for c, s in present]
    # 2 × present draws always hold enough absent pairs: at most len(present) are present.
    draws = rng.permutation(len(COLOUR_NAMES) * len(SHAPES))[: 2 * len(present)].tolist()
    absent = [(COLOUR_NAMES[k // len(SHAPES)], SHAPES[k % len(SHAPES)]) for k in draws]
    absent = [pair for pair in absent if pair not in present][: len(present)]
    qas += [QA(f"is there {article(c + ' ' + s)}?", "no", "exist") for c, s in absent]
    return qas


def question_candidates(facts: Facts, rng: np.random.Generator,
                        kinds: Sequence[str] | None = None) -> list[QA]:
    """Every question with one clear answer that the grammar asks about the scene, for the
    given kinds (default: all). Only ``exist`` questions draw from ``rng``."""
    qas: list[QA] = []
    for kind in QUESTION_KINDS if kinds is None else kinds:
        if kind == "count":
            qas += _count_questions(facts)
        elif kind in ("colour", "shape", "size"):
            qas += _attribute_questions(facts, kind)
        elif kind == "relation":
            qas += _relation_questions(facts)
        elif kind == "exist":
            qas += _exist_questions(facts, rng)
        else:
            raise ValueError(f"unknown question kind {kind!r}; kinds are {', '.join(QUESTION_KINDS)}")
    return qas


# --------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------


def refexp_candidates(facts: Facts, target: int | None = None) -> list[RefExp]:
    """Every referring expression the grammar has for the scene (or for one ``target``
    object); each picks out exactly one object."""
    n, out = facts.n, []
    targets = range(n) if target is None else (target,)
    for i in targets:
        out.extend(RefExp("the " + facts.phrase(i, use), i) for use in facts.unique[i])
    if n == 1:
        return out

    # "the <head> <relation> the <landmark>": exactly one head-matching object (other than
    # the landmark) stands in the relation, and every other one clearly in the opposite one.
    for i in targets:
        for j in range(n):
            if i == j:
                continue
            landmark = "the " + facts.phrase(j, facts.unique[j][0])
            for r in facts.rel[i][j]:
                for head in (_NOTHING, _SHAPE):
                    others = [k for k in facts.matches[head][i] if k != i and k != j]
                    if all(OPPOSITE[r] in facts.rel[k][j] for k in others):
                        out.append(RefExp(f"the {facts.phrase(i, head)} {RELATION_PHRASES[r]} {landmark}", i))

    # "the leftmost <head>": the extreme object along an axis, clear of the runner-up.
    for i in targets:
        for head in (_NOTHING, _SHAPE, _COLOUR):
            others = [k for k in facts.matches[head][i] if k != i]
            if not others:
                continue
            for word, (axis, side) in SUPERLATIVES.items():
                if all(side * (facts.centre[i][axis] - facts.centre[k][axis]) > facts.margin for k in others):
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
