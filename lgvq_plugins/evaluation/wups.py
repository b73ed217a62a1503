"""WUPS: the Wu–Palmer soft answer accuracy of Malinowski & Fritz (NIPS 2014), with WordNet
3.0 read through nltk — the VQA measure COCO-QA reports (Ren et al., NIPS 2015) at the
thresholds 0.9 and 0.0.

The formula, transcribed from the authors' own script (``calculate_wups.py``, published with
DAQUAR at https://datasets.d2.mpi-inf.mpg.de/mateusz14visual-turing/calculate_wups.py; the
same functions are in github.com/mateuszmalinowski/visual_turing_test-tutorial,
``kraino/utils/compute_wups.py``, commit a644fdf: ``wup_measure``,
``fuzzy_set_membership_measure``, ``score_it``, ``get_metric_score``):

* an answer is the list of its comma-separated items, each stripped ("chair, table");
* item measure ``mu(a, b)``: 1 when the strings are equal; otherwise the largest nltk
  ``wup_similarity`` over every pair of their **noun** synsets (0 when either word has
  none), multiplied by 0.1 when it is below the threshold;
* per question, ``WUPS(T, A) = min(prod_{t in T} max_{a in A} mu(t, a),
  prod_{a in A} max_{t in T} mu(a, t))`` with T the true and A the predicted items
  (1 when both are empty, 0 when only one is);
* the score is the mean over questions. WUPS@0.0 never scales (no similarity is below 0).

Everything is our code; only the formula is the reference's. Similarities are nltk's
Wu–Palmer (its defaults, as the script calls it), so values follow the installed nltk.

WordNet: Debian's ``wordnet-base`` + ``wordnet-sense-index`` put the WordNet 3.0 database in
``/usr/share/wordnet`` (``$LGVQ_WORDNET_DIR``, or the ``wordnet_dir`` argument, says where it
is; a Princeton ``WordNet-3.0`` folder with ``dict/`` works too). nltk's reader needs a
``lexnames`` file Debian does not ship; nltk 3.10 refuses to open files reached through
symlinks or hard links out of the reader's root, opens corpus files only under its data path
(``nltk.data.path``), and its reader looks up ``corpora/wordnet`` there when it is built (to
map Open Multilingual WordNet synsets). So :func:`reader_dir` builds, once, an nltk data
folder under the cache (``$LGVQ_CACHE_DIR`` or ``~/.cache/lgvq_plugins``):
``wordnet/<key>/corpora/wordnet`` with copies of the database files plus ``lexnames``
written from the fixed list of WordNet 3.0's 45 lexicographer files (``lexnames(5WN)``),
and that folder is appended to ``nltk.data.path``. Nothing is downloaded. Without WordNet (or
nltk), :func:`wups_scores` reports the scores unavailable with the reason, never 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from lgvq_plugins.second_stage.code_cache import cache_root

#: Environment variable naming the WordNet database folder.
WORDNET_ENV = "LGVQ_WORDNET_DIR"
#: Where Debian's ``wordnet-base`` installs it.
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
#: The database files nltk's ``WordNetCorpusReader`` opens (besides ``lexnames``).
DICT_FILES = ("cntlist.rev", "index.sense", "index.adj", "index.adv", "index.noun", "index.verb",
              "data.adj", "data.adv", "data.noun", "data.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")
#: WordNet 3.0's lexicographer files in file-number order (``lexnames(5WN)``, "forty-five").
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}  # lexnames' third field
#: The reference's down-weighting of similarities below the threshold.
BELOW_THRESHOLD_WEIGHT = 0.1
_INSTALL = ("install Debian's WordNet 3.0 (`apt-get install wordnet-base wordnet-sense-index`) or set "
            f"${WORDNET_ENV} (gin `vqa.wordnet_dir`) to a WordNet 3.0 dict folder")


class WordNetUnavailable(RuntimeError):
    """WordNet or nltk cannot be used here; the message says why and how to fix it."""


# ---------------------------------------------------------------------------------------
# The measure (no WordNet needed: the similarity is a parameter)
# ---------------------------------------------------------------------------------------


def answer_items(answer: str) -> list[str]:
    """The reference's answer items: comma-separated, each stripped (``"a, b"`` → ``[a, b]``)."""
    return [item.strip() for item in answer.split(",")]


def item_measure(a: str, b: str, threshold: float, similarity: Callable[[str, str], float]) -> float:
    """``mu(a, b)``: 1 for equal strings, else ``similarity(a, b)``, × 0.1 below ``threshold``."""
    if a == b:
        return 1.0
    s = similarity(a, b)
    return s if s >= threshold else BELOW_THRESHOLD_WEIGHT * s


def wups_pair(truth: str, predicted: str, threshold: float, similarity: Callable[[str, str], float]) -> float:
    """WUPS of one question: min over the two directions of the product over items of the
    best-matching item's measure (module docstring)."""
    t_items, a_items = answer_items(truth), answer_items(predicted)
    if not t_items and not a_items:
        return 1.0

    def direction(xs: list[str], ys: list[str]) -> float:
        if not xs:
            return 0.0
        return math.prod(max((item_measure(x, y, threshold, similarity) for y in ys), default=0.0) for x in xs)

    return min(direction(t_items, a_items), direction(a_items, t_items))


def wups(predicted: Sequence[str], truth: Sequence[str], threshold: float,
         similarity: Callable[[str, str], float]) -> float:
    """Mean WUPS@``threshold`` over questions (line-aligned answer lists)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"WUPS needs equally many non-zero answers, got {len(predicted)} predicted and "
                         f"{len(truth)} true")
    return sum(wups_pair(t, p, threshold, similarity) for p, t in zip(predicted, truth)) / len(truth)


# ---------------------------------------------------------------------------------------
# WordNet through nltk
# ---------------------------------------------------------------------------------------


def wordnet_source(wordnet_dir: str | os.PathLike[str] | None = None) -> Path:
    """The WordNet database folder: ``wordnet_dir``, else ``$LGVQ_WORDNET_DIR``, else
    ``/usr/share/wordnet``; a folder whose ``dict/`` holds the files (Princeton's layout) is
    followed into it."""
    root = Path(wordnet_dir or os.environ.get(WORDNET_ENV) or DEFAULT_WORDNET_DIR)
    if not (root / "data.noun").is_file() and (root / "dict" / "data.noun").is_file():
        root = root / "dict"
    return root


def lexnames_text() -> str:
    """WordNet 3.0's ``lexnames`` file: ``NN<TAB>name<TAB>syntactic category`` per line."""
    return "".join(f"{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n"
                   for i, name in enumerate(LEXNAMES))


def reader_dir(source: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A folder nltk's WordNet reader accepts, built once under the cache from ``source``:
    copies of :data:`DICT_FILES` (nltk refuses links out of the reader's root) and
    ``source``'s ``lexnames``, or one written from :data:`LEXNAMES`. Returns
    ``<cache>/wordnet/<key>/corpora/wordnet`` (``<cache>/wordnet/<key>`` is an nltk data folder).

    The key covers the source's path, file sizes and modification times; the folder is built
    in a temporary folder renamed into place (several ranks may build it at once)."""
    source = Path(source)
    missing = [f for f in DICT_FILES if not (source / f).is_file()]
    if missing:
        raise WordNetUnavailable(f"WordNet not found at {source} (missing {', '.join(missing)}): {_INSTALL}")
    stamp = [str(source.resolve())] + [[f, (source / f).stat().st_size, (source / f).stat().st_mtime_ns]
                                       for f in (*DICT_FILES, "lexnames") if (source / f).is_file()]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / "wordnet" / key
    corpus = Path("corpora", "wordnet")
    if (target / corpus / "lexnames").is_file():
        return target / corpus
    tmp = target.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    (tmp / corpus).mkdir(parents=True)
    try:
        for f in DICT_FILES:
            shutil.copyfile(source / f, tmp / corpus / f)
        if (source / "lexnames").is_file():
            shutil.copyfile(source / "lexnames", tmp / corpus / "lexnames")
        else:
            (tmp / corpus / "lexnames").write_text(lexnames_text())
        (tmp / "source.json").write_text(json.dumps({"source": str(source.resolve())}))
        os.rename(tmp, target)
    except OSError:
        if not (target / corpus / "lexnames").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when another process renamed first
    return target / corpus


@lru_cache(maxsize=4)
def _reader(path: str) -> Any:
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    # nltk opens corpus files only under its data path, and its reader finds `corpora/wordnet`
    # there: appended (not prepended), so a user's own nltk data keeps precedence
    data_root = str(Path(path).parent.parent)
    if data_root not in nltk.data.path:
        nltk.data.path.append(data_root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multilingual functions.*")  # no Open Multilingual WordNet
        return WordNetCorpusReader(path, None)


def load_wordnet(wordnet_dir: str | os.PathLike[str] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """nltk's ``WordNetCorpusReader`` over the WordNet at ``wordnet_dir`` (see
    :func:`wordnet_source`), loaded once per process. Raises :class:`WordNetUnavailable`
    naming the missing piece."""
    path = reader_dir(wordnet_source(wordnet_dir), cache_dir)  # first: names a missing WordNet cheaply
    try:
        import nltk  # noqa: F401
    except ImportError as exc:
        raise WordNetUnavailable(f"WUPS reads WordNet through nltk, which is not installed ({exc}): "
                                 "pip install nltk") from exc
    return _reader(str(path.resolve()))


class WupSimilarity:
    """``(a, b) → max over noun synsets x of a, y of b of x.wup_similarity(y)`` (0 when
    either word has no noun synset), memoised per word and per ordered pair."""

    def __init__(self, wordnet: Any):
        self.wordnet = wordnet
        self._synsets: dict[str, list[Any]] = {}
        self._pairs: dict[tuple[str, str], float] = {}

    def synsets(self, word: str) -> list[Any]:
        if word not in self._synsets:
            self._synsets[word] = self.wordnet.synsets(word, pos="n")
        return self._synsets[word]

    def __call__(self, a: str, b: str) -> float:
        if (a, b) not in self._pairs:
            # nltk returns None when two synsets share no ancestor: the reference skips those
            self._pairs[(a, b)] = max((x.wup_similarity(y) or 0.0 for x in self.synsets(a) for y in self.synsets(b)),
                                      default=0.0)
        return self._pairs[(a, b)]


def wups_scores(predicted: Sequence[str], truth: Sequence[str], thresholds: Sequence[float] = (0.9, 0.0), *,
                wordnet_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None
                ) -> tuple[dict[str, float | None], dict[str, str], dict[str, Any]]:
    """``({"wups_0.9": ..., "wups_0.0": ...}, unavailable, protocol)``: every score None with
    the reason when WordNet cannot be loaded; ``protocol`` names the WordNet used."""
    names = [f"wups_{t:.1f}" for t in thresholds]
    if not truth:
        return dict.fromkeys(names), dict.fromkeys(names, "no evaluated questions"), {}
    try:
        wordnet = load_wordnet(wordnet_dir, cache_dir)
    except WordNetUnavailable as exc:
        return dict.fromkeys(names), dict.fromkeys(names, str(exc)), {}
    similarity = WupSimilarity(wordnet)
    metrics = {n: wups(predicted, truth, t, similarity) for n, t in zip(names, thresholds)}
    import nltk

    protocol = {"wordnet": {"version": wordnet.get_version(), "source": str(wordnet_source(wordnet_dir)),
                            "nltk": nltk.__version__, "synsets": "nouns", "measure": "Malinowski & Fritz 2014"}}
    return metrics, {}, protocol


__all__ = ["WORDNET_ENV", "WordNetUnavailable", "WupSimilarity", "answer_items", "item_measure", "lexnames_text",
           "load_wordnet", "reader_dir", "wordnet_source", "wups", "wups_pair", "wups_scores"]
