"""``captioning``: codes → caption; BLEU-4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap.

A small GPT (:class:`~lgvq_plugins.second_stage.gpt.CodeGPT` over *words*) reads the
image's codes as its prefix — each code's frozen codebook vector, so the captioner sees
exactly what the tokenizer kept — and is trained on the cached codes of a training split
with one caption per image (the sample's). Captions are decoded greedily (deterministic)
up to the end token. The word vocabulary is built from the training captions
(lower-cased words; ``<unk>`` for the rest).

Scores are the COCO caption protocol's, through ``pycocoevalcap`` (needs Java for the
PTB tokenizer and METEOR): references are every caption of the image
(``data.captions(i)`` when the data set has it, else the sample's caption). SPICE is
reported unavailable: it needs Stanford CoreNLP models downloaded at first use.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from lgvq_plugins.tasks.unconditional import train_split_of
from torch import Tensor, nn
from torch.utils.data import Dataset

from lgvq_plugins.evaluation.task import TaskResult, model_device, shard
from lgvq_plugins.second_stage.code_cache import cached_codes, codes_path
from lgvq_plugins.second_stage.gpt import CodeGPT
from lgvq_plugins.second_stage.train import TrainSettings, train_code_gpt
from lgvq_plugins.training import distributed as D

_WORD = re.compile(r"[a-z0-9]+")
PAD, BOS_UNUSED, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SCORES = ("bleu_4", "meteor", "rouge_l", "cider")


def caption_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def caption_scores(references: dict[Any, list[str]], candidates: dict[Any, str], *,
                   meteor: bool = True) -> tuple[dict[str, float | None], dict[str, str]]:
    """COCO caption scores of ``candidates`` (id → caption) against ``references`` (id →
    captions): ``bleu_1..4``, ``meteor``, ``rouge_l``, ``cider`` (CIDEr-D), all through
    pycocoevalcap after its PTB tokenizer; plus what was unavailable and why."""
    unavailable = {"spice": "SPICE needs Stanford CoreNLP models downloaded at first use (no internet here)"}
    if importlib.util.find_spec("pycocoevalcap") is None:
        why = "pycocoevalcap is not installed (pip install pycocoevalcap==1.2)"
        return {k: None for k in (*SCORES, "spice")}, {**unavailable, **{k: why for k in SCORES}}
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float | None] = {"spice": None}
    if shutil.which("java") is None:
        # PTB tokenization needs Java: fall back to lower-cased words, and say so
        refs = {k: [" ".join(caption_words(c)) for c in v] for k, v in references.items()}
        hyps = {k: [" ".join(caption_words(v))] for k, v in candidates.items()}
        unavailable["meteor"] = "METEOR needs Java (not found on PATH)"
        unavailable["tokenizer"] = "PTB tokenizer needs Java: lower-cased words used instead"
        meteor = False
    else:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        refs = tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        hyps = tok.tokenize({k: [{"caption": v}] for k, v in candidates.items()})
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    scores.update({f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)})
    scores["rouge_l"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["cider"] = float(Cider().compute_score(refs, hyps)[0])
    scores["meteor"] = None
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["meteor"] = float(scorer.compute_score(refs, hyps)[0])
        finally:
            scorer.close() if hasattr(scorer, "close") else None
    elif "meteor" not in unavailable:
        unavailable["meteor"] = "captioning.meteor = False"
    return scores, unavailable


class Vocabulary:
    """Words of the training captions (ids: 0 pad, 1 unused, 2 end, 3 unknown, then words
    by frequency, ties alphabetical)."""

    def __init__(self, captions: list[str], max_words: int = 2000):
        counts = Counter(w for c in captions for w in caption_words(c))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
        self.words = [PAD, BOS_UNUSED, EOS, UNK, *ranked]
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: list[str], length: int) -> Tensor:
        """(N, length) ids: words, end token, padding (captions cut to ``length - 1`` words)."""
        out = torch.zeros(len(captions), length, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = [self.index.get(w, 3) for w in caption_words(caption)][: length - 1] + [2]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: Tensor) -> list[str]:
        texts = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == 2:
                    break
                if i > 3:
                    words.append(self.words[i])
            texts.append(" ".join(words))
        return texts


class Captioning:
    """Image captioning from the codes (gin: ``captioning.*``).

    Args:
        max_images: evaluated images.
        batch_size: images per decoding batch.
        train_split, train_images: what the captioner learns from.
        max_words: caption length cap (words, before the end token).
        meteor: compute METEOR (starts a JVM: several seconds).
        seed: seed of the captioner's initialisation and batch order.
        cache_dir: code cache folder.
        examples: generated captions written to ``captions.json``.
    """

    needs = "tokenizer"

    def __init__(self, max_images: int | None = 256, batch_size: int = 32, train_split: str = "train",
                 train_images: int | None = 2000, max_words: int = 24, meteor: bool = True, seed: int = 0,
                 cache_dir: str | None = None, examples: int = 32):
        self.max_images, self.batch_size = max_images, int(batch_size)
        self.train_split, self.train_images, self.max_words = train_split, train_images, int(max_words)
        self.meteor, self.seed, self.cache_dir, self.examples = bool(meteor), int(seed), cache_dir, int(examples)

    @staticmethod
    def _prefix(tokenizer: nn.Module, codes: Tensor) -> Tensor:
        """(N, h·w, D) frozen codebook vectors of codes (N, h, w)."""
        with torch.no_grad():
            return tokenizer.quantizer.embed(codes.to(model_device(tokenizer))).flatten(2).transpose(1, 2).float().cpu()

    def run(self, tokenizer: nn.Module, data: Dataset, out_dir: Path) -> TaskResult:
        import json

        device = model_device(tokenizer)
        train = train_split_of(data, self.train_split, self.train_images)
        train_codes = cached_codes(tokenizer, train, batch_size=self.batch_size, cache_dir=self.cache_dir)
        captions = [train[i]["caption"] for i in range(len(train))]
        vocab = Vocabulary(captions)
        targets = vocab.encode(captions, self.max_words + 1)
        prefix = self._prefix(tokenizer, train_codes)
        settings = TrainSettings()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = CodeGPT(num_codes=len(vocab), seq_len=self.max_words + 1, cond_dim=prefix.shape[-1],
                            max_prefix=prefix.shape[1], pad_id=0).to(device)
        ckpt = out_dir / "captioner" / codes_path(tokenizer, train, self.cache_dir).stem
        stats = train_code_gpt(model, targets, settings, prefix=prefix,
                               checkpoint_dir=ckpt if D.is_main_process() else None)
        eval_codes = cached_codes(tokenizer, data, batch_size=self.batch_size, cache_dir=self.cache_dir)
        subset, total = shard(data, self.max_images)
        indices = list(subset.indices)
        generated: dict[int, str] = {}
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start: start + self.batch_size]
            ids = model.sample(len(idx), prefix=self._prefix(tokenizer, eval_codes[idx]).to(device), top_k=1)
            generated.update(zip(idx, vocab.decode(ids)))
        if D.is_distributed():
            parts: list[dict[int, str]] = [{} for _ in range(D.world_size())]
            torch.distributed.all_gather_object(parts, generated)
            generated = {k: v for p in parts for k, v in p.items()}
        has_all = hasattr(data, "captions")
        references = {i: (data.captions(i) if has_all else [data[i]["caption"]]) for i in generated}
        metrics, unavailable = caption_scores(references, generated, meteor=self.meteor)
        artefacts: dict[str, str] = {}
        examples = [{"index": i, "generated": generated[i], "references": references[i]}
                    for i in sorted(generated)[: self.examples]]
        if D.is_main_process():
            (out_dir / "captions.json").write_text(json.dumps(examples, indent=2))
            artefacts["captions"] = "captions.json"
        protocol = {"split": getattr(data, "split", None), "images": total,
                    "references": "every caption of the image" if has_all else "the sample's caption",
                    "decoding": "greedy, up to the end token", "vocabulary": len(vocab),
                    "scorer": "pycocoevalcap 1.2 (PTB tokenizer, BLEU, METEOR 1.5, ROUGE-L, CIDEr-D)",
                    "captioner": {"train_split": self.train_split, "train_images": len(train),
                                  "prefix": "frozen codebook vectors of the codes", **settings.protocol(),
                                  "final_loss": stats["loss"]}}
        return TaskResult(metrics=metrics, protocol=protocol, unavailable=unavailable, artefacts=artefacts,
                          tables={"examples": examples})


__all__ = ["Captioning", "Vocabulary", "caption_scores", "caption_words"]
