"""A foreign tokenizer through a thin adapter: the taming-style ``VQModel`` adapter of
docs/architecture.md ("A foreign tokenizer"), run as written, meets the ``Tokenizer``
contract, is guided by ``LanguageGuided`` (MiniLM, offline) and trained by ``Trainer``.

The taming model here is our own small stand-in with taming's call signatures:
``forward`` → ``(dec, diff, (perplexity, one_hot, indices))``, ``encode`` →
``(quant, emb_loss, info)``, ``decode(quant)`` and the codebook in ``quantize.embedding``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes_trainer import FakeShapes
from torch import nn

from lgvq_plugins.contracts import ContractError, check_implements
from lgvq_plugins.guidance import LanguageGuided
from lgvq_plugins.interfaces import Quantized, SavableTokenizer, Tokenizer
from lgvq_plugins.training.trainer import Trainer

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
MAX_ADAPTER_LINES = 25


# ---------------------------------------------------------------------------------------
# A small taming-style VQModel (taming/models/vqgan.py, taming/modules/vqvae/quantize.py)
# ---------------------------------------------------------------------------------------


class VectorQuantizer(nn.Module):
    """taming's ``VectorQuantizer``: nearest code, straight-through, legacy loss."""

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, self.e_dim)
        d = (flat.pow(2).sum(1, keepdim=True) + self.embedding.weight.pow(2).sum(1)
             - 2 * flat @ self.embedding.weight.t())
        min_encoding_indices = d.argmin(1).unsqueeze(1)  # (B·h·w, 1), as taming
        min_encodings = F.one_hot(min_encoding_indices[:, 0], self.n_e).float()
        z_q = self.embedding(min_encoding_indices[:, 0]).view(z.shape)
        loss = (z_q.detach() - z).pow(2).mean() + self.beta * (z_q - z.detach()).pow(2).mean()
        z_q = z + (z_q - z).detach()
        e_mean = min_encodings.mean(0)
        perplexity = torch.exp(-(e_mean * torch.log(e_mean + 1e-10)).sum())
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, (perplexity, min_encodings, min_encoding_indices)


class VQModel(nn.Module):
    """taming's ``VQModel`` call signatures on a tiny conv autoencoder (÷4). The encoder
    has a BatchNorm so that a grid probe in training mode would be caught moving it."""

    def __init__(self, n_embed: int = 32, embed_dim: int = 8, ch: int = 16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, ch, 4, 2, 1), nn.BatchNorm2d(ch), nn.SiLU(),
                                     nn.Conv2d(ch, ch, 4, 2, 1))
        self.quant_conv = nn.Conv2d(ch, embed_dim, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.post_quant_conv = nn.Conv2d(embed_dim, ch, 1)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(ch, ch, 4, 2, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(ch, 3, 4, 2, 1))

    def encode(self, x):
        quant, emb_loss, info = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, emb_loss, info

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input):
        quant, diff, (_, _, ind) = self.encode(input)
        return self.decode(quant), diff, (None, None, ind)


# ---------------------------------------------------------------------------------------
# The adapter, as the documentation writes it
# ---------------------------------------------------------------------------------------


def _adapter_source() -> str:
    section = DOC.read_text(encoding="utf-8").split("## A foreign tokenizer", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, "no python block in docs/architecture.md's 'A foreign tokenizer' section"
    return match.group(1)


@pytest.fixture(scope="module")
def adapter_ns() -> dict:
    namespace: dict = {}
    exec(compile(_adapter_source(), str(DOC), "exec"), namespace)  # noqa: S102 - our own doc
    return namespace


def test_the_documented_adapter_is_thin():
    lines = [line for line in _adapter_source().splitlines() if line.strip()]
    assert len(lines) <= MAX_ADAPTER_LINES, f"the adapter in docs/architecture.md has {len(lines)} lines"


def test_the_bare_taming_model_does_not_meet_the_contract():
    with pytest.raises(ContractError) as info:
        LanguageGuided(VQModel(), "minilm", image_size=16)
    assert info.value.missing == ["embed_dim", "grid"]  # forward exists, with its own signature


def test_adapter_meets_the_contract_and_keeps_the_models_numbers(adapter_ns):
    torch.manual_seed(0)
    vq = VQModel()
    adapter = adapter_ns["TamingVQModel"](vq)
    check_implements(adapter, Tokenizer, role="taming adapter")
    assert isinstance(adapter, Tokenizer)
    assert adapter.embed_dim == 8 and adapter.quantizer.num_codes == 32 and adapter.quantizer.dim == 8

    bn_before = vq.encoder[1].running_mean.clone(), int(vq.encoder[1].num_batches_tracked)
    assert adapter.grid(16) == (4, 4) and adapter.grid((16, 24)) == (4, 6)
    assert torch.equal(vq.encoder[1].running_mean, bn_before[0])  # the probe ran in eval mode
    assert int(vq.encoder[1].num_batches_tracked) == bn_before[1] and adapter.training

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    adapter.eval()
    vq.eval()
    with torch.no_grad():
        rec, q = adapter(x)
        dec, diff, (_, _, ind) = vq(x)
        assert isinstance(q, Quantized) and q.indices.shape == (2, 4, 4) and q.indices.dtype == torch.int64
        assert torch.equal(rec, dec) and torch.equal(q.indices.flatten(), ind[:, 0])
        torch.testing.assert_close(q.loss, diff)
        torch.testing.assert_close(adapter.decode_indices(q.indices), adapter.decode(q.z_q))
        torch.testing.assert_close(adapter.quantizer(vq.quant_conv(vq.encoder(x))).z_q, q.z_q)
        assert 1.0 <= float(q.stats["perplexity"]) <= 32.0


def test_guided_and_trained_by_the_projects_trainer(adapter_ns, tmp_path):
    torch.manual_seed(0)
    vq = VQModel()
    model = LanguageGuided(adapter_ns["TamingVQModel"](vq), text_encoder="minilm", image_size=16,
                           width=32, heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, FakeShapes("train", size=16), out_dir=tmp_path, max_steps=3, batch_size=4,
                      base_lr=1e-3, scale_lr=False, scheduler=None, device="cpu", log_every=1, val_every=0,
                      ckpt_every=0, progress=False, tensorboard=False)
    trainer.fit()
    assert trainer.step == 3
    logs = trainer.last_train_logs
    for key in ("loss", "rec_loss", "q_loss", "lg_gsa", "lg_mtp", "lg_ras", "q_perplexity"):
        assert math.isfinite(logs[key]), (key, logs)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the foreign model's own weights (encoder, codebook, decoder) and the guidance heads learnt
    for prefix in ("tokenizer.module.encoder.0.", "tokenizer.module.quantize.embedding.",
                   "tokenizer.module.decoder.", "code_text.", "alignment_losses.mtp."):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert not any("text_encoder" in k for k in after)  # MiniLM stays frozen and unsaved


def test_registered_adapter_saves_and_reloads_from_data(adapter_ns, tmp_path):
    """The doc's advice for save_pretrained: a registered factory that records its settings."""
    import lgvq_plugins
    from lgvq_plugins.hookspecs import hookimpl
    from lgvq_plugins.pretrained import from_pretrained, save_pretrained

    def taming_tiny(n_embed: int = 32, embed_dim: int = 8, ch: int = 16):
        adapter = adapter_ns["TamingVQModel"](VQModel(n_embed, embed_dim, ch))
        adapter.config.update(n_embed=n_embed, embed_dim=embed_dim, ch=ch)
        return adapter

    class Plugin:
        @staticmethod
        @hookimpl
        def register_backbones(register):
            register("taming_tiny", taming_tiny)

    host = lgvq_plugins.get_host()
    name = host.register_plugin(Plugin, name="tests.taming_adapter")
    try:
        torch.manual_seed(0)
        tokenizer = lgvq_plugins.create_backbone("taming_tiny", n_embed=24)
        check_implements(tokenizer, SavableTokenizer, role="registered taming adapter")
        tokenizer(torch.rand(4, 3, 16, 16))  # training-mode forward: BatchNorm statistics move
        save_pretrained(tokenizer, tmp_path / "taming")
        loaded = from_pretrained(tmp_path / "taming")
    finally:
        host.unregister_plugin(name)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tokenizer.eval()
    with torch.no_grad():
        assert loaded.quantizer.num_codes == 24
        assert torch.equal(loaded(x)[0], tokenizer(x)[0])
        assert torch.equal(loaded.encode(x).indices, tokenizer.encode(x).indices)
