"""The text tower of an open_clip model as a frozen :class:`~lgvq_plugins.interfaces.TextEncoder`.

Only the text tower is built (with open_clip's own builder, from the model's JSON config);
the vision tower is never instantiated. Weights come from a full CLIP checkpoint file, from
a pretrained tag *already in the local cache* (nothing is downloaded), or are random
(``pretrained=None``, for tests).

Features, as in the paper: per-token features are the output of the final layer norm
``ln_final`` (width = the text transformer's width, 512 for ViT-B/32); the caption feature is
open_clip's own pooled feature — for CLIP the end-of-text (EOT) token — after
``text_projection``.
"""

from __future__ import annotations

import difflib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lgvq_plugins.interfaces import TextTokens
from lgvq_plugins.text.encoders import DEFAULT_MAX_LENGTH, FrozenTextEncoder

# parameters of the full CLIP model that belong to neither tower
_NON_TEXT_KEYS = ("logit_scale", "logit_bias")


class PretrainedWeightsUnavailableError(RuntimeError):
    """The requested pretrained weights are not on this machine and cannot be downloaded."""


class OpenCLIPTextEncoder(FrozenTextEncoder):
    """Frozen text tower of the open_clip model ``model_name``.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
        pretrained: ``None`` for random weights; a path to a local checkpoint file (a full
            CLIP state dict — ``.pt``/``.bin``/``.safetensors``, OpenAI TorchScript files
            included — or a text-tower-only state dict); or an open_clip pretrained tag
            (``"openai"``, ``"laion2b_s34b_b79k"``, ...) whose file is already in the local
            cache. Nothing is downloaded.
        max_length: caption length L in tokens, start and end tokens included (≤ the
            model's context length). Longer captions are cut, keeping the end token last.
        text_cfg: overrides of the model config's ``text_cfg`` (e.g. ``{"layers": 2}``).
        embed_dim: override of the projection width (the caption feature's width).
        quick_gelu: use QuickGELU; default: what the model config or the pretrained tag says
            (OpenAI weights need it).
        cache_dir: where open_clip caches downloaded weights (default: open_clip's and the
            Hugging Face hub's defaults); only looked at for pretrained tags.

    ``save_pretrained`` saves ``pretrained`` when it is a tag or ``None``; a checkpoint *file*
    and ``cache_dir`` are paths of this machine, not saved: pass them again when loading
    (``from_pretrained(..., text_encoder_options={"pretrained": path})``), and the saved
    weights identity checks that they are the same weights.
    """

    lgvq_registry_name = "open_clip"

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        text_cfg: dict[str, Any] | None = None,
        embed_dim: int | None = None,
        quick_gelu: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower
        from open_clip.transformer import TextTransformer

        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            known = open_clip.list_models()
            close = difflib.get_close_matches(model_name, known, n=5)
            raise ValueError(
                f"open_clip text encoder: unknown model_name={model_name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" ({len(known)} architectures are known; see open_clip.list_models())"
            )
        model_text_cfg = dict(model_cfg["text_cfg"])
        if "hf_model_name" in model_text_cfg:
            raise ValueError(
                f"open_clip text encoder: {model_name!r} has a Hugging Face text tower "
                f"({model_text_cfg['hf_model_name']}); use the 'hf' text encoder with a local "
                "copy of that model instead"
            )
        model_text_cfg.update(text_cfg or {})
        model_text_cfg["output_tokens"] = True  # forward returns (pooled, per-token features)
        embed_dim = int(embed_dim if embed_dim is not None else model_cfg["embed_dim"])

        checkpoint, label, tag_cfg = resolve_pretrained(model_name, pretrained, cache_dir)
        if quick_gelu is None:
            quick_gelu = bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))

        context_length = int(model_text_cfg.get("context_length", 77))
        if not 2 <= max_length <= context_length:
            raise ValueError(
                f"open_clip text encoder: max_length={max_length} must be between 2 (start + end "
                f"token) and the context length of {model_name!r} ({context_length})"
            )

        tower = _build_text_tower(embed_dim, model_text_cfg, quick_gelu=quick_gelu, cast_dtype=None)
        if not isinstance(tower, TextTransformer):
            raise ValueError(f"open_clip text encoder: {model_name!r} does not have a transformer text tower")
        if checkpoint is not None:
            _load_text_weights(tower, checkpoint, model_name)

        self.model_name = model_name
        self.pretrained_label = label
        self.max_length = int(max_length)
        self.context_length = context_length
        self.width = int(tower.width)
        proj = tower.text_projection
        if proj is None:
            self.global_width = self.width
        elif isinstance(proj, torch.nn.Linear):
            self.global_width = int(proj.out_features)
        else:
            self.global_width = int(proj.shape[1])

        self._tokenizer = open_clip.get_tokenizer(model_name, context_length=self.max_length)
        self.sot_id, self.eot_id = _start_end_ids(self._tokenizer, model_name)
        self.pad_id = int(getattr(tower, "pad_id", 0))
        self.special_token_ids = frozenset(i for i in (self.sot_id, self.eot_id) if i is not None)

        # With a causal mask (and no appended CLS / padding mask) the features of the first
        # L positions do not depend on what follows, so running L tokens instead of the full
        # context gives the same numbers at a fraction of the cost: we only shorten the
        # (non-persistent) mask buffer. Other towers see the caption padded to the context
        # length, exactly as open_clip feeds them.
        self._short_context = (
            tower.attn_mask is not None and tower.cls_emb is None and not getattr(tower, "use_pad_mask", False)
        )
        if self._short_context:
            tower.attn_mask = tower.attn_mask[: self.max_length, : self.max_length].clone()
        self.text = tower
        self.config = {"model_name": model_name, "pretrained": pretrained, "max_length": self.max_length,
                       "text_cfg": {k: v for k, v in model_text_cfg.items() if k != "output_tokens"},
                       "embed_dim": embed_dim, "quick_gelu": quick_gelu, "cache_dir": cache_dir}
        local_file = checkpoint is not None and label.startswith("file:")
        self.lgvq_local_settings = ("pretrained", "cache_dir") if local_file else ("cache_dir",)
        self._freeze()

    # -- TextEncoder ----------------------------------------------------------------------
    @property
    def vocab_embeddings(self) -> torch.Tensor:
        """(V, Dt) the token-embedding matrix (49408 × 512 for ViT-B/32)."""
        return self.text.token_embedding.weight

    def tokenize(self, captions: list[str]) -> TextTokens:
        """CLIP BPE ids (B, max_length); lengths count up to and including the EOT token.

        Padding is never recognised by its id: id 0 is the real token ``"!"`` in CLIP's BPE.
        """
        ids = self._tokenizer(list(captions), context_length=self.max_length).long()
        is_end = ids == self.eot_id
        if not bool(is_end.any(dim=1).all()):
            raise RuntimeError(f"open_clip tokenizer of {self.model_name!r} dropped the end-of-text token")
        lengths = is_end.int().argmax(dim=1) + 1  # first EOT position + 1
        positions = torch.arange(ids.shape[1])[None, :]
        special = positions == (lengths[:, None] - 1)
        if self.sot_id is not None:
            special |= (positions == 0) & (ids == self.sot_id)
        return TextTokens(ids=ids, lengths=lengths, special_mask=special)

    def _encode(self, tokens: TextTokens) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokens.ids
        L = ids.shape[1]
        if not self._short_context and L < self.context_length:
            ids = F.pad(ids, (0, self.context_length - L), value=self.pad_id)
        pooled, token_feats = self.text(ids)
        return token_feats[:, :L], pooled

    def _identity_prefix(self) -> str:
        return f"open_clip/{self.model_name}/pretrained={self.pretrained_label}"


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


def resolve_pretrained(model_name: str, pretrained: str | None,
                       cache_dir: str | None = None) -> tuple[str | None, str, dict[str, Any]]:
    """Map ``pretrained`` to ``(checkpoint file or None, label for the identity, tag config)``.

    A tag is looked up in the local caches only (open_clip's URL cache and the Hugging Face
    hub cache); when it is not there this raises :class:`PretrainedWeightsUnavailableError`
    saying what was asked and how to pass a local file instead.
    """
    import open_clip

    if pretrained is None or pretrained == "":
        return None, "random", {}
    path = Path(os.path.expanduser(str(pretrained)))
    if path.is_file():
        return str(path), f"file:{path.name}", {}
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        looks_like_path = os.sep in str(pretrained) or Path(str(pretrained)).suffix != ""
        raise FileNotFoundError(
            f"open_clip text encoder: pretrained={pretrained!r} for model_name={model_name!r} is "
            + ("a path that does not exist" if looks_like_path else "neither an existing file nor a known tag")
            + f". Known tags for {model_name!r}: {', '.join(tags) or 'none'}. "
            "Pass the path of a local checkpoint file, or pretrained=None for random weights."
        )
    found, looked = _cached_tag_file(tag_cfg, cache_dir)
    if found is None:
        raise PretrainedWeightsUnavailableError(
            f"open_clip text encoder: pretrained weights {model_name!r} / {pretrained!r} are not in "
            f"the local cache (looked in: {'; '.join(looked)}), and downloads are impossible here "
            "(no internet access; nothing is fetched at run time). Download the checkpoint on a "
            "machine with internet access (e.g. open_clip.create_model("
            f"{model_name!r}, pretrained={pretrained!r}) puts it in its cache), copy the file here "
            "and pass its path: pretrained='/path/to/checkpoint.pt' (gin: "
            "open_clip.pretrained = '/path/to/checkpoint.pt'). Use pretrained=None for random "
            "weights (tests only)."
        )
    return found, f"{pretrained}", tag_cfg


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> tuple[str | None, list[str]]:
    """The cached checkpoint of a pretrained tag, or None; never touches the network."""
    looked: list[str] = []
    if tag_cfg.get("file"):
        looked.append(str(tag_cfg["file"]))
        if os.path.isfile(tag_cfg["file"]):
            return str(tag_cfg["file"]), looked
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover - transformers depends on it
            hf_hub_download = None
        for name in candidates:
            looked.append(f"Hugging Face cache {repo_id}/{name}")
            if hf_hub_download is None:
                continue
            try:
                return hf_hub_download(repo_id=repo_id, filename=name, cache_dir=cache_dir,
                                       local_files_only=True), looked
            except Exception:  # noqa: BLE001 - any failure here means "not cached"
                pass
    url = tag_cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        looked.append(target)
        if os.path.isfile(target):
            return target, looked
    return None, looked


def _text_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-tower part of a CLIP checkpoint, with the tower's own key names.

    Handles the three layouts in use: ``CustomTextCLIP`` (``text.*``), ``CLIP`` (text
    parameters at the top level next to ``visual.*``) and a text-tower-only state dict.
    """
    if any(k.startswith("text.") for k in state_dict):
        return {k[len("text."):]: v for k, v in state_dict.items() if k.startswith("text.")}
    return {k: v for k, v in state_dict.items()
            if not k.startswith("visual.") and k not in _NON_TEXT_KEYS}


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive (OpenAI's CLIP files) holds ``code/``; a ``torch.save`` zip not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, never unpickling arbitrary objects.

    ``.safetensors`` through safetensors; a TorchScript archive through ``torch.jit.load``
    (TorchScript's own format, no pickle of Python objects); anything else through
    ``torch.load(weights_only=True)``. (open_clip's loader falls back to a full unpickle on
    old torch versions; this one never does.) A ``state_dict`` entry and a DDP ``module.``
    prefix are unwrapped.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    elif _is_torchscript(str(path)):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds {type(state).__name__}, not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_text_weights(tower: torch.nn.Module, checkpoint: str, model_name: str) -> None:
    try:
        state_dict = read_checkpoint(checkpoint)
    except Exception as exc:
        raise RuntimeError(
            f"open_clip text encoder: could not read checkpoint {checkpoint!r} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    text_sd = _text_state_dict(state_dict)
    # OpenAI TorchScript checkpoints store the causal mask among their tensors
    text_sd = {k: v for k, v in text_sd.items() if k != "attn_mask"}
    own = tower.state_dict()
    missing = sorted(set(own) - set(text_sd))
    unexpected = sorted(set(text_sd) - set(own))
    resized = [f"{k} {tuple(text_sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
               if k in text_sd and text_sd[k].shape != v.shape]
    if missing or unexpected or resized:
        raise RuntimeError(
            f"open_clip text encoder: checkpoint {checkpoint!r} does not match the text tower of "
            f"{model_name!r}: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shape (checkpoint vs model) {resized[:4]}. Check model_name (and the text_cfg / "
            "embed_dim overrides) against the checkpoint."
        )
    tower.load_state_dict(text_sd, strict=True)


def _start_end_ids(tokenizer: Any, model_name: str) -> tuple[int | None, int]:
    """Start/end token ids of an open_clip tokenizer (CLIP BPE: 49406 / 49407)."""
    sot = getattr(tokenizer, "sot_token_id", None)
    eot = getattr(tokenizer, "eot_token_id", None)
    hf_tok = getattr(tokenizer, "tokenizer", None)
    if eot is None and hf_tok is not None:
        eot = hf_tok.eos_token_id if hf_tok.eos_token_id is not None else hf_tok.sep_token_id
        sot = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.cls_token_id
    if eot is None:
        raise ValueError(
            f"open_clip text encoder: the tokenizer of {model_name!r} ({type(tokenizer).__name__}) "
            "has no end-of-text token, which caption lengths are derived from"
        )
    return (int(sot) if sot is not None else None), int(eot)
