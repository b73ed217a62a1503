"""``vqa``: codes + question → answer; accuracy, WUPS@0.9 and WUPS@0.0 (WordNet 3.0).

Also home of :class:`ReaderTask`, the protocol shared with ``grounding``: a
:class:`~lgvq_plugins.second_stage.heads.CodeReader` reads the frozen codebook vectors of
an image's codes (cached, extracted once) together with the text (``question`` or
``refexp`` of the sample), is trained on a training split of the evaluated data set
(gin: ``second_stage_training.*``, ``CodeReader.*``) and evaluated on the first
``max_images`` samples. One text per image (the sample's).

Under torchrun every rank evaluates its ``rank::world`` share; the outputs are gathered in
sample order (:func:`~lgvq_plugins.evaluation.task.gather_rows`) and the per-sample records
(answers, boxes) with them, so every rank scores every sample once: 1 and N processes give
the same numbers.

WUPS@0.9 / @0.0 (:mod:`lgvq_plugins.evaluation.wups`: Malinowski & Fritz's measure, WordNet
through nltk; ``vqa.wordnet_dir`` or ``$LGVQ_WORDNET_DIR``, default ``/usr/share/wordnet``);
without WordNet they are reported unavailable (None, with the reason), never 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lgvq_plugins.tasks.captioning import Vocabulary
from lgvq_plugins.tasks.unconditional import train_split_of
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.task import TaskResult, gather_rows, model_device, shard
from lgvq_plugins.evaluation.wups import wups_scores
from lgvq_plugins.second_stage.code_cache import cached_codes
from lgvq_plugins.second_stage.heads import CodeReader, code_vectors, train_reader
from lgvq_plugins.second_stage.train import TrainSettings
from lgvq_plugins.training import distributed as D


def accuracy(predicted: list[str], truth: list[str]) -> float:
    """Exact-match accuracy of answer strings."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"accuracy needs equally many non-zero answers, got {len(predicted)} and {len(truth)}")
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


class ReaderTask:
    """Shared protocol of ``vqa`` and ``grounding`` (see the module docstring).

    Args:
        max_images, batch_size, train_split, train_images, cache_dir: as the generation tasks.
        max_words: text length cap (words).
        seed: seed of the reader's initialisation and batch order.
    """

    needs = "tokenizer"
    text_key = "question"

    def __init__(self, max_images: int | None = 256, batch_size: int = 32, train_split: str = "train",
                 train_images: int | None = 2000, max_words: int = 24, seed: int = 0, cache_dir: str | None = None):
        self.max_images, self.batch_size = max_images, int(batch_size)
        self.train_split, self.train_images, self.max_words = train_split, train_images, int(max_words)
        self.seed, self.cache_dir = int(seed), cache_dir

    # hooks
    def out_dim(self, train: Dataset, samples: list[dict[str, Any]]) -> int: ...
    def targets(self, samples: list[dict[str, Any]]) -> Tensor: ...
    def loss(self, out: Tensor, target: Tensor) -> Tensor: ...
    def record(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`score` needs of one evaluated sample, as plain JSON data (it crosses ranks)."""
    def score(self, out: Tensor, records: list[dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, str],
                                                                         dict[str, Any]]:
        """Metrics, unavailable reasons and tables from every evaluated sample's outputs
        (N, out_dim) and records, both in sample order; a ``"protocol"`` table joins the
        result's protocol."""

    def _inputs(self, tokenizer: nn.Module, data: Dataset, indices: list[int], vocab: Vocabulary
                ) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
        codes = cached_codes(tokenizer, data, batch_size=self.batch_size, cache_dir=self.cache_dir)
        samples = [data[i] for i in indices]
        words = vocab.encode([s[self.text_key] for s in samples], self.max_words + 1)
        return code_vectors(tokenizer, codes[indices]), words, samples

    def run(self, tokenizer: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        device = model_device(tokenizer)
        train = train_split_of(data, self.train_split, self.train_images)
        texts = [train[i][self.text_key] for i in range(len(train))]
        vocab = Vocabulary(texts)
        vectors, words, samples = self._inputs(tokenizer, train, list(range(len(train))), vocab)
        out_dim = self.out_dim(train, samples)
        settings = TrainSettings()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            reader = CodeReader(vectors.shape[-1], vectors.shape[1], len(vocab), self.max_words + 1, out_dim).to(device)
        final = train_reader(reader, (vectors, words), self.targets(samples), self.loss, settings)
        subset, total = shard(data, self.max_images)
        e_vectors, e_words, e_samples = self._inputs(tokenizer, data, list(subset.indices), vocab)
        with torch.no_grad():
            out = torch.cat([reader(e_vectors[i: i + self.batch_size].to(device), e_words[i: i + self.batch_size].to(device))
                             for i in range(0, len(e_samples), self.batch_size)]) if e_samples else \
                torch.zeros(0, out_dim, device=device)
        # every rank's share → every sample once, in sample order (as one process sees them)
        out = gather_rows(out).cpu()
        parts = D.all_gather_json([self.record(i, s) for i, s in zip(subset.indices, e_samples)])
        records = sorted((r for part in parts for r in part), key=lambda r: r["index"])
        metrics, unavailable, tables = self.score(out, records)
        protocol = {**tables.pop("protocol", {}), "split": getattr(data, "split", None), "images": total,
                    "text": self.text_key,
                    "reader": {"train_split": self.train_split, "train_images": len(train), "vocabulary": len(vocab),
                               "inputs": "frozen codebook vectors of the codes + words", **settings.protocol(),
                               "final_loss": final}}
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable, tables=tables)


class VQA(ReaderTask):
    """Visual question answering as classification over the training answers (gin: ``vqa.*``).

    Args (besides :class:`ReaderTask`'s):
        wordnet_dir: the WordNet 3.0 database folder for WUPS (default ``$LGVQ_WORDNET_DIR``,
            else ``/usr/share/wordnet``).
    """

    text_key = "question"

    def __init__(self, max_images: int | None = 256, batch_size: int = 32, train_split: str = "train",
                 train_images: int | None = 2000, max_words: int = 24, seed: int = 0, cache_dir: str | None = None,
                 wordnet_dir: str | None = None):
        super().__init__(max_images, batch_size, train_split, train_images, max_words, seed, cache_dir)
        self.wordnet_dir = wordnet_dir

    def out_dim(self, train: Dataset, samples: list[dict[str, Any]]) -> int:
        self.answers = sorted({s["answer"] for s in samples})
        self._index = {a: i for i, a in enumerate(self.answers)}
        return len(self.answers)

    def targets(self, samples: list[dict[str, Any]]) -> Tensor:
        return torch.tensor([self._index[s["answer"]] for s in samples])

    def loss(self, out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out, target)

    def record(self, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        return {"index": int(index), "question": sample["question"], "answer": sample["answer"]}

    def score(self, out: Tensor, records: list[dict[str, Any]]):
        predicted = [self.answers[i] for i in out.argmax(-1).tolist()]
        truth = [r["answer"] for r in records]
        wups, unavailable, wordnet = wups_scores(predicted, truth, (0.9, 0.0), wordnet_dir=self.wordnet_dir,
                                                 cache_dir=self.cache_dir)
        if not truth:
            unavailable["accuracy"] = "no evaluated questions"
        metrics = {"accuracy": accuracy(predicted, truth) if truth else None, **wups}
        examples = [{"index": r["index"], "question": r["question"], "answer": t, "predicted": p}
                    for r, t, p in list(zip(records, truth, predicted))[:32]]
        return metrics, unavailable, {"examples": examples, "protocol": wordnet}


__all__ = ["VQA", "ReaderTask", "accuracy"]
