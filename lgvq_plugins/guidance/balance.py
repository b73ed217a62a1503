"""Adaptive balancing of the alignment terms against the tokenizer's own objective.

With fixed weights (``LanguageGuided.losses``) an alignment term's pull on the encoder is
``w_k·‖∇L_k‖``, which depends on the term's scale, the batch, the model size and the stage
of training: on the quick start the paper's weights leave every term's gradient at the
encoder output below 1 % of the tokenizer's (docs/evaluation.md, "Balancing the alignment
terms"). ``LanguageGuided.balance = 'adaptive'`` instead weighs each term k, every step, by

    λ_k = w_k · clamp(‖∇_{z_e} L_tok‖ / (‖∇_{z_e} L_k‖ + eps), 0, max_ratio)     (detached)

with ``z_e`` the encoder output (the quantizer's input) and ``L_tok`` the tokenizer's
generator objective (reconstruction + perceptual + codebook, + GAN once it starts). This is
VQ-GAN's adaptive GAN weight (taming-transformers, ``VQLPIPSWithDiscriminator.
calculate_adaptive_weight``: ``‖∇L_nll‖ / (‖∇L_g‖ + 1e-4)``, clamped to [0, 1e4],
detached) measured at the encoder output instead of the decoder's last layer, because that
is where the alignment terms and the reconstruction compete for the codes. Unclamped,
``‖∇_{z_e}(λ_k L_k)‖ = w_k·‖∇_{z_e} L_tok‖`` (up to eps): ``w_k`` becomes "the size of term
k's push on the encoder as a fraction of the tokenizer's".

Gradients are taken with ``torch.autograd.grad(..., retain_graph=True)`` with respect to
``z_e`` only, so no parameter's ``.grad`` is touched (gradient accumulation and DDP's
reducer see only the real backward). Under DDP the norms are averaged over ranks before λ is
formed, so every rank applies the same λ. A term whose gradient does not reach ``z_e`` on a
batch (norm 0: a loss on the text side only, a batch with nothing to predict) is not divided
by ~0: it keeps its fixed weight ``w_k`` for that batch, is counted in the logs
(``lg_balance_skipped``) and named in a one-time warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import gin
import torch
from torch import Tensor

from lgvq_plugins.training.distributed import all_reduce_mean

#: values of ``LanguageGuided.balance``
BALANCE_MODES = ("fixed", "adaptive")


def grad_norm_at(loss: Tensor, features: Tensor) -> Tensor:
    """``‖∂loss/∂features‖₂`` as a detached fp32 scalar; 0 when ``loss`` does not reach
    ``features`` (or carries no graph). Leaves every parameter's ``.grad`` untouched."""
    zero = torch.zeros((), device=features.device, dtype=torch.float32)
    if not (isinstance(loss, Tensor) and loss.requires_grad and features.requires_grad):
        return zero
    grad, = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
    return zero if grad is None else grad.detach().float().norm()


@dataclass
class Balanced:
    """What :class:`AdaptiveBalance` returns for one batch.

    Attributes:
        weights: term name → λ_k, the weight to apply (0-d, detached, fp32).
        logs: scalars to log: ``lg_lambda_<k>`` (λ_k), ``lg_grad_<k>`` (‖∇_{z_e} L_k‖,
            unweighted), ``lg_grad_tokenizer`` (‖∇_{z_e} L_tok‖), ``lg_balance_skipped``
            (terms that kept their fixed weight on this batch).
        skipped: names of the terms that kept their fixed weight.
    """

    weights: dict[str, Tensor] = field(default_factory=dict)
    logs: dict[str, Tensor] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


@gin.configurable
class AdaptiveBalance:
    """Per-step weights of the alignment terms from gradient norms at the encoder output.

    Args:
        max_ratio: upper clamp of ``‖∇L_tok‖ / ‖∇L_k‖`` (taming: 1e4). It bounds λ_k at
            ``w_k·max_ratio`` when a term's gradient is tiny but not zero.
        eps: added to ``‖∇L_k‖`` (taming: 1e-4). At the quick-start size the norms are
            ~1e-2, so it changes λ by about 1 %; lower it for larger latents, whose
            (mean-reduced) gradients are smaller.
        terms: names of the terms to balance (default: every term with a weight); the
            others keep their fixed weight.
        sync: average the gradient norms over DDP ranks so every rank applies the same λ.
    """

    def __init__(self, max_ratio: float = 1e4, eps: float = 1e-4, terms: Sequence[str] | None = None,
                 sync: bool = True):
        if not max_ratio > 0:
            raise ValueError(f"AdaptiveBalance.max_ratio must be > 0, got {max_ratio!r}")
        if not eps >= 0:
            raise ValueError(f"AdaptiveBalance.eps must be >= 0, got {eps!r}")
        self.max_ratio, self.eps, self.sync = float(max_ratio), float(eps), bool(sync)
        self.terms = None if terms is None else tuple(str(t) for t in terms)
        self._warned: set[str] = set()

    @property
    def config(self) -> dict[str, object]:
        """The settings, as plain data."""
        return {"max_ratio": self.max_ratio, "eps": self.eps,
                "terms": None if self.terms is None else list(self.terms), "sync": self.sync}

    def check_terms(self, weights: Mapping[str, float]) -> None:
        """Raise when ``terms`` names a term that has no weight (a typo would silently
        leave the intended term at its fixed weight)."""
        unknown = sorted(set(self.terms or ()) - set(weights))
        if unknown:
            raise ValueError(f"AdaptiveBalance.terms names {unknown}, which are not among the alignment "
                             f"losses with a weight > 0 ({sorted(weights)}); fix the names or drop them")

    def __call__(self, reference: Tensor, losses: Mapping[str, Tensor], weights: Mapping[str, float],
                 features: Tensor) -> Balanced:
        """λ_k for every term in ``losses`` (unweighted scalars) given the tokenizer's objective
        ``reference``, the base weights ``weights`` and the encoder output ``features`` (z_e)."""
        names = [n for n in losses if self.terms is None or n in self.terms]
        fixed = {n: torch.tensor(float(weights[n]), device=features.device) for n in losses if n not in names}
        if not names:
            return Balanced(weights=fixed)
        # (1 + K,) norms, fp32; averaged over ranks so every rank forms the same λ.
        norms = torch.stack([grad_norm_at(reference, features)] + [grad_norm_at(losses[n], features) for n in names])
        if self.sync:
            norms = all_reduce_mean(norms)
        ref, term = norms[0], norms[1:]
        base = torch.tensor([float(weights[n]) for n in names], device=norms.device)
        usable = torch.isfinite(ref) & (ref > 0) & torch.isfinite(term) & (term > 0)
        ratio = (ref / (term + self.eps)).clamp(0.0, self.max_ratio)
        lam = torch.where(usable, base * ratio, base).detach()
        skipped = tuple(n for n, ok in zip(names, usable.tolist()) if not ok)  # one host sync per step
        for name in skipped:
            self._warn(name, float(ref), float(term[names.index(name)]), float(weights[name]))
        logs: dict[str, Tensor] = {"lg_grad_tokenizer": ref,
                                   "lg_balance_skipped": torch.tensor(float(len(skipped)))}
        for i, name in enumerate(names):
            logs[f"lg_lambda_{name}"] = lam[i]
            logs[f"lg_grad_{name}"] = term[i]
        return Balanced(weights={**fixed, **{n: lam[i] for i, n in enumerate(names)}}, logs=logs,
                        skipped=skipped)

    def _warn(self, name: str, ref: float, grad: float, weight: float) -> None:
        if name in self._warned:
            return
        self._warned.add(name)
        if not (ref > 0):
            why = (f"the tokenizer's objective has no gradient at the encoder output z_e "
                   f"(‖∇L_tok‖ = {ref:.3g}), so there is nothing to balance against")
        else:
            why = f"it has no gradient at the encoder output z_e on this batch (‖∇L_{name}‖ = {grad:.3g})"
        warnings.warn(
            f"LanguageGuided.balance = 'adaptive': alignment loss {name!r} was not balanced: {why}. It "
            f"keeps its fixed weight {weight:g} on such batches (counted as lg_balance_skipped in "
            "logs/metrics.jsonl). A term that never reaches the encoder can be left out with "
            f"AdaptiveBalance.terms = [...] (warned once per term).", RuntimeWarning, stacklevel=3)


__all__ = ["AdaptiveBalance", "Balanced", "BALANCE_MODES", "grad_norm_at"]
