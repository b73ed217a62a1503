"""Guidance heads for the language tasks: the guided model's own, or an *alignment probe*.

The language tasks (masked words, code–word alignment, retrieval) read the code–text
transformer and the alignment heads. A guided model brings its own. An unguided tokenizer
has none, so a fair protocol gives it the same heads — a :class:`LanguageGuided` wrapper of
the same architecture — trained on its *frozen* codes with a fixed budget (steps, batch,
learning rate, training split, text encoder). With ``heads="probe"`` a guided model is
probed the same way, so base and guided codes can be compared under one protocol.

The probe is trained once per (tokenizer, settings) and shared by the tasks of a run.
Training is deterministic (seeded init and sample order) and identical on every rank (no
collectives), so 1 and N processes probe alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import gin
from lgvq_plugins.evaluation.task import is_guided, model_device, tokenizer_of
from lgvq_plugins.interfaces import GuidedOutput, Quantized, TextFeatures

#: alignment losses the probe trains (weight 1 each: the tokenizer is frozen, so the
#: weights only balance the heads against one another).
PROBE_LOSSES: dict[str, float] = {"gsa": 1.0, "mtp": 1.0, "ras": 1.0}


@gin.configurable("alignment_probe")
@dataclass(frozen=True)
class ProbeSettings:
    """The budget of the alignment probe (gin: ``alignment_probe.steps = 300``).

    Attributes:
        steps: Adam updates of the heads.
        batch_size: images per update.
        lr: learning rate.
        train_split: the split of the evaluated data set the heads are trained on (never the
            evaluated split itself).
        text_encoder: registered text encoder for an unguided tokenizer (a guided model's
            own encoder is used for it).
        width, depth, heads: code–text transformer size (None: ``LanguageGuided``'s defaults).
        pool: the first ``pool`` samples of the training split are the probe's training
            set (their frozen codes are computed once).
        seed: seed of the heads' initialisation and the sample order.
    """

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    train_split: str = "train"
    text_encoder: str = "minilm"
    width: int | None = None
    depth: int = 2
    heads: int | None = None
    pool: int = 1024
    seed: int = 0

    def protocol(self) -> dict[str, Any]:
        return {"heads": "probe (trained on frozen codes)", "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "train_split": self.train_split, "train_images": self.pool, "losses": dict(PROBE_LOSSES),
                "seed": self.seed}


#: attribute (in the tokenizer's ``__dict__``, not a submodule: never in its state_dict)
#: holding its trained probes, so they live exactly as long as the tokenizer.
_PROBES_ATTR = "_lgvq_alignment_probes"


def sibling_split(data: Dataset, split: str) -> Dataset:
    """The ``split`` of the data set ``data`` comes from, built with ``data``'s settings
    (constructor arguments read back from same-named attributes, ``num_samples`` left at
    the split's default)."""
    if getattr(data, "split", None) == split:
        raise ValueError(f"the alignment probe would train on the evaluated split {split!r}; set "
                         "`alignment_probe.train_split` to another split")
    cls = type(data)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if "split" not in params:
        raise ValueError(
            f"cannot build the {split!r} split of {cls.__name__} to train the alignment probe: its "
            "constructor takes no `split`. Pass `probe_data=` to the task (a dataset of the same kind), "
            "or evaluate a guided model with its own heads.")
    kwargs = {name: getattr(data, name) for name in params
              if name not in ("split", "num_samples") and hasattr(data, name)}
    return cls(split=split, **kwargs)


def guidance_heads(model: nn.Module, data: Dataset, *, heads: str = "auto", need: str,
                   settings: ProbeSettings | None = None, probe_data: Dataset | None = None
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """The guided model whose heads a task uses, and the protocol entry saying which.

    Args:
        heads: ``"auto"`` (own heads when the model is guided and has the ``need`` loss,
            else a probe), ``"own"`` (error if absent) or ``"probe"``.
        need: the alignment loss whose head the task reads (``"mtp"``, ``"ras"``, ``"gsa"``).
    """
    if heads not in ("auto", "own", "probe"):
        raise ValueError(f"heads={heads!r}: use 'auto', 'own' or 'probe'")
    own = is_guided(model) and need in model.alignment_losses
    if heads == "own" and not own:
        raise ValueError(f"heads='own' but the model has no trained {need!r} head (unguided, or "
                         f"LanguageGuided.losses[{need!r}] = 0); use heads='probe' or 'auto'")
    if own and heads != "probe":
        return model, {"heads": "own (trained with the tokenizer)"}
    settings = settings or ProbeSettings()
    tokenizer = tokenizer_of(model)
    per_model = tokenizer.__dict__.setdefault(_PROBES_ATTR, {})
    if settings not in per_model:
        train = probe_data if probe_data is not None else sibling_split(data, settings.train_split)
        encoder = model.text_encoder if is_guided(model) else settings.text_encoder
        per_model[settings] = train_probe(tokenizer, train, settings, encoder)
    return per_model[settings], settings.protocol()


def train_probe(tokenizer: nn.Module, data: Dataset, settings: ProbeSettings, text_encoder: Any) -> nn.Module:
    """A :class:`LanguageGuided` around the frozen ``tokenizer`` whose heads (code–text
    transformer, gsa/mtp/ras heads) are trained for ``settings.steps`` updates on the first
    ``settings.pool`` samples of ``data``.

    The tokenizer is frozen, so its codes are computed once per pooled image; each update
    runs only the heads (and the text encoder, once per distinct caption, through the
    feature cache). The losses are those :class:`LanguageGuided` computes, on the same
    :class:`~lgvq_plugins.interfaces.GuidedOutput`.
    """
    from lgvq_plugins.guidance.model import LanguageGuided

    device = model_device(tokenizer)
    pool = list(range(min(settings.pool, len(data))))
    if not pool:
        raise ValueError("the alignment probe got an empty training data set")
    was_training = tokenizer.training
    tokenizer.eval()  # frozen codes: no re-anchoring, no EMA updates, no dropout
    samples = [data[i] for i in pool]
    captions = [s["caption"] for s in samples]
    with torch.no_grad():
        codes = [tokenizer.encode(torch.stack([s["image"] for s in samples[i:i + 64]]).to(device))
                 for i in range(0, len(samples), 64)]
    z_q = torch.cat([q.z_q for q in codes])
    indices = torch.cat([q.indices for q in codes])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        # enabled=True explicitly: an unguided run's gin (`LanguageGuided.enabled = False`) must
        # not switch the probe's heads off
        probe = LanguageGuided(tokenizer, text_encoder=text_encoder, losses=PROBE_LOSSES, enabled=True,
                               width=settings.width, depth=settings.depth, heads=settings.heads).to(device)
        opt = torch.optim.Adam(list(probe.guidance_parameters()), lr=settings.lr)
        order = torch.Generator().manual_seed(settings.seed)
        probe.train()
        tokenizer.eval()
        with torch.enable_grad():  # tasks run under no_grad
            for _ in range(settings.steps):
                idx = torch.randint(0, len(pool), (settings.batch_size,), generator=order)
                batch_captions = [captions[i] for i in idx.tolist()]
                z = z_q[idx]
                hidden = probe.code_text.hidden(z)
                text = probe.text_cache(batch_captions, device)
                guided = GuidedOutput(reconstruction=z.new_zeros(0), text=text,
                                      quantized=Quantized(z, indices[idx], z.new_zeros(())),
                                      visual_tokens=probe.code_text.proj_out(hidden),
                                      extras={"visual_factors": (hidden, probe.code_text.proj_out)})
                batch = {"caption": batch_captions}
                loss = sum(fn(guided, batch) for fn in probe.alignment_losses.values())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    probe.eval()
    tokenizer.train(was_training)
    return probe


@dataclass
class HeadOutputs:
    """What the language tasks read from one batch."""

    z_q: Tensor  # (B, D, h, w)
    hidden: Tensor  # (B, 1 + h·w, width) code–text transformer states
    visual_tokens: Tensor  # (B, 1 + h·w, Dt)
    text: TextFeatures


def head_outputs(guide: nn.Module, batch: Mapping[str, Any]) -> HeadOutputs:
    """Encode a batch's images and captions with ``guide`` (eval mode, no losses computed)."""
    device = model_device(guide)
    images = batch["image"].to(device)
    z_q = guide.tokenizer.encode(images).z_q
    hidden = guide.code_text.hidden(z_q)
    text = guide.text_cache(list(batch["caption"]), device)
    return HeadOutputs(z_q, hidden, guide.code_text.proj_out(hidden), text)


def token_strings(encoder: Any, ids: list[int]) -> list[str]:
    """Readable tokens for figures (the encoder's tokenizer when it can say, else ids)."""
    tok = getattr(encoder, "_tokenizer", None)  # HF encoders keep their tokenizer here
    if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]
    return [str(i) for i in ids]


__all__ = ["PROBE_LOSSES", "HeadOutputs", "ProbeSettings", "guidance_heads", "head_outputs", "sibling_split",
           "token_strings", "train_probe"]
