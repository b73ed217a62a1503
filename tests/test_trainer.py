"""Trainer behaviour on small fakes: learning, exact resume, NaN stop, config mismatch, the
discriminator's separation, learning-rate scaling, logs and sample grids; and the metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

import lgvq_plugins
from lgvq_plugins.training import checkpoint as C
from lgvq_plugins.training.logs import read_jsonl
from lgvq_plugins.evaluation.metrics import PSNR, CodebookUsage
from lgvq_plugins.training.trainer import ConfigMismatchError, NonFiniteLossError, Trainer, frozen

from fakes_trainer import FakeGuided, FakeShapes, FakeTokenizer


def make_trainer(tmp_path, *, disc=True, seed=0, size=40, random=False, **kwargs) -> Trainer:
    """``random=True``: the guidance draws dropout masks (global RNG) and noise (a private
    generator), so only a resume that restores both RNG kinds is exact."""
    torch.manual_seed(seed)
    model = FakeGuided(FakeTokenizer(disc=disc, disc_start=2), dropout=0.3 if random else 0.0,
                       noise=0.2 if random else 0.0)
    settings = dict(max_steps=10, batch_size=8, base_lr=2e-3, scale_lr=False, warmup_steps=2,
                    val_every=0, ckpt_every=0, log_every=0, progress=False, tensorboard=False)
    settings.update(kwargs)
    return Trainer(model, FakeShapes("train", size=size), FakeShapes("val", size=16), out_dir=tmp_path,
                   **settings)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_short_run_lowers_reconstruction_loss(tmp_path):
    trainer = make_trainer(tmp_path, disc=False, max_steps=60, size=64, base_lr=3e-3)
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.evaluate()
    assert after["rec_loss"] < 0.8 * before["rec_loss"]
    assert after["psnr"] > before["psnr"] + 1.0


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, monkeypatch):
    # 40 samples / batch 8 = 5 batches per epoch; accumulation 2 → 2 steps per epoch, so the
    # crash at step 3 falls in the middle of the second epoch.
    common = dict(max_steps=6, grad_accum_steps=2, ckpt_every=3, keep_last=5, clip_grad_norm=1.0, random=True)
    reference = make_trainer(tmp_path / "a", **common)
    reference.fit()
    expected = weights(reference)

    interrupted = make_trainer(tmp_path / "b", **common)
    original_step = Trainer.train_step

    def killed_after_three(self, micro):
        if self.step == 4:  # step 3's checkpoint is written; die during step 4
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, micro)

    monkeypatch.setattr(Trainer, "train_step", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.undo()
    assert C.load_checkpoint(tmp_path / "b" / "checkpoints").step == 3

    # A new process: different initial weights and RNG, then resume.
    resumed = make_trainer(tmp_path / "b", seed=123, **common)
    torch.rand(100)  # disturb the global RNG: resume must restore it
    assert resumed.resume() == 3
    assert (resumed.epoch, resumed.batch_in_epoch) == (1, 2)
    resumed.fit()
    # the private generator was restored too (it is not in the state_dict)
    assert torch.equal(resumed.model.noise_generator.get_state(), reference.model.noise_generator.get_state())
    got = weights(resumed)
    assert expected.keys() == got.keys()
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    for name in reference.optimizers:
        a = reference.optimizers[name].state_dict()["state"]
        b = resumed.optimizers[name].state_dict()["state"]
        for i in a:
            for key in a[i]:
                assert torch.equal(a[i][key], b[i][key])


def test_same_seed_same_run(tmp_path):
    a = make_trainer(tmp_path / "a", max_steps=4)
    a.fit()
    b = make_trainer(tmp_path / "b", max_steps=4)
    b.fit()
    for (k, v), w in zip(weights(a).items(), weights(b).values()):
        assert torch.equal(v, w), k


def test_nan_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=8, ckpt_every=2)
    forward = FakeGuided.forward

    def poisoned(self, images, captions, batch):
        out = forward(self, images, captions, batch)
        if trainer.step == 4:  # the 5th update
            out.losses["align"] = out.losses["align"] * float("nan")
        return out

    monkeypatch.setattr(FakeGuided, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 5 .*'align'"):
        trainer.fit()
    ckpt_dir = tmp_path / "checkpoints"
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000004"
    ck = C.load_checkpoint(ckpt_dir)
    assert all(torch.isfinite(v).all() for v in ck.model.values() if v.is_floating_point())


def test_resume_with_different_config_fails(tmp_path):
    a = make_trainer(tmp_path, max_steps=2, config_hash="aaa", config_lines=["Trainer.base_lr = 0.002"])
    a.fit()
    b = make_trainer(tmp_path, max_steps=2, config_hash="bbb", config_lines=["Trainer.base_lr = 0.1"])
    with pytest.raises(ConfigMismatchError, match=r"Trainer.base_lr = 0.1"):
        b.resume()


def test_discriminator_gets_only_its_own_gradient(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.step = 5  # GAN term active (disc_start=2)
    batch = [torch.utils.data.default_collate([trainer.train_data[i] for i in range(8)])]
    before = copy.deepcopy(trainer.model)
    trainer.train_step(batch)
    # Recompute the discriminator's objective alone with the weights before the update.
    tok = before.tokenizer
    x = batch[0]["image"]
    rec, _ = tok(x)
    loss = tok.discriminator_loss(x, rec.detach(), 5).loss
    grads = torch.autograd.grad(loss, tok.discriminator_parameters())
    for p, g in zip(trainer.tokenizer.discriminator_parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """2 micro-batches of 4 give the update of one batch of 8 (same samples, mean losses).
    SGD, not Adam: Adam's first step is blind to the gradient's scale."""
    big = make_trainer(tmp_path / "big", disc=False, max_steps=1, batch_size=8, scheduler=None, optimizer="sgd")
    big.fit()
    acc = make_trainer(tmp_path / "acc", disc=False, max_steps=1, batch_size=4, grad_accum_steps=2,
                       scheduler=None, optimizer="sgd")
    acc.fit()
    for (k, v), w in zip(weights(big).items(), weights(acc).values()):
        assert torch.allclose(v, w, atol=1e-6), k
    assert acc.images_seen == big.images_seen == 8


def _record_precision(t: Trainer) -> dict[str, list]:
    """Record, at every forward, whether autocast is on and the dtype the encoder's first
    convolution returns, for the generator's forward and for the discriminator's objective."""
    seen: dict[str, list] = {"encoder": [], "discriminator": []}
    t.tokenizer.encoder[0].register_forward_hook(
        lambda module, inputs, output: seen["encoder"].append((torch.is_autocast_enabled("cpu"), output.dtype)))
    disc_loss = t.tokenizer.discriminator_loss

    def recording_disc_loss(x, reconstruction, step):
        out = disc_loss(x, reconstruction, step)
        seen["discriminator"].append((torch.is_autocast_enabled("cpu"), t.tokenizer.discriminator(x).dtype))
        return out

    t.tokenizer.discriminator_loss = recording_disc_loss
    return seen


def test_bf16_autocast_on_cpu_trains(tmp_path):
    t = make_trainer(tmp_path, max_steps=3, precision="bf16")
    seen = _record_precision(t)
    t.fit()
    assert t.step == 3 and math.isfinite(t.last_train_logs["loss"])
    # the convolutions really ran in bf16 under autocast, in both objectives
    assert len(seen["encoder"]) >= 3 and len(seen["discriminator"]) == 3  # (+ the final evaluation)
    assert set(seen["encoder"]) == set(seen["discriminator"]) == {(True, torch.bfloat16)}
    # fp32 (what "auto" picks on CPU): autocast stays off
    auto = make_trainer(tmp_path / "auto", max_steps=1)
    assert auto.precision == "fp32"
    seen = _record_precision(auto)
    auto.fit()
    assert set(seen["encoder"]) == set(seen["discriminator"]) == {(False, torch.float32)}


def test_frozen_restores_requires_grad():
    p, q = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1), requires_grad=False)
    with frozen([p, q]):
        assert not p.requires_grad and not q.requires_grad
    assert p.requires_grad and not q.requires_grad


def test_lr_scales_with_global_batch_and_accumulation(tmp_path):
    t = make_trainer(tmp_path, batch_size=4, grad_accum_steps=3, base_lr=1e-5, scale_lr=True, scheduler=None)
    assert t.lr == pytest.approx(1e-5 * 4 * 3)
    assert t.optimizers["generator"].param_groups[0]["betas"] == (0.5, 0.9)
    assert t.optimizers["discriminator"].param_groups[0]["lr"] == pytest.approx(1.2e-4)


def test_cosine_schedule_with_warmup_is_step_based(tmp_path):
    t = make_trainer(tmp_path, max_steps=10, warmup_steps=2, base_lr=1e-3, min_lr=0.0)
    lrs = []
    for step in range(10):
        t.schedulers["generator"].step_update(step)
        lrs.append(t.optimizers["generator"].param_groups[0]["lr"])
    assert lrs[0] < lrs[1] < lrs[2]  # warm-up
    assert lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))
    assert lrs[-1] < lrs[5] < lrs[2]


def test_logs_samples_and_checkpoints_are_written(tmp_path):
    t = make_trainer(tmp_path, max_steps=4, log_every=2, val_every=2, ckpt_every=2, tensorboard=True,
                     num_samples=4)
    t.fit()
    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [2, 4]
    assert {"loss", "rec_loss", "lr", "images_per_sec", "disc_loss", "lg_align"} <= set(train[0])
    assert {"psnr", "codebook_usage", "perplexity", "rec_loss"} <= set(val[0])
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    grid = Image.open(tmp_path / "samples" / "step_000004.png")
    # 2 rows (originals, reconstructions) of 4 16-pixel images with torchvision's 2-pixel padding
    assert grid.size == (4 * 18 + 2, 2 * 18 + 2)
    assert C.latest_checkpoint(tmp_path / "checkpoints").name == "step_00000004"


def test_codebook_report_single_process(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from lgvq_plugins.training import distributed

    t = make_trainer(tmp_path, max_steps=1, dump_codebooks=True)
    codebook = t.tokenizer.quantizer.codebook.detach().float()
    report = t.codebook_report()
    assert report["codebooks_identical"] and report["codebook_max_abs_diff"] == 0.0
    assert len(report["codebook_sha256"]) == 1
    assert torch.equal(load_file(tmp_path / "codebook_rank0.safetensors")["codebook"], codebook)

    # Pretend to be rank 0 of two whose rank 1 holds a codebook off by 0.25 in one entry:
    # the report must compare across ranks, not a codebook with itself.
    def gather_two_ranks(local):
        other = local.clone()
        other[0, 3, 1] += 0.25
        return torch.cat([local, other])

    monkeypatch.setattr(distributed, "all_gather_cat", gather_two_ranks)
    report = t.codebook_report()
    assert report["codebooks_identical"] is False
    assert report["codebook_max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert len(report["codebook_sha256"]) == 2 and len(set(report["codebook_sha256"])) == 2
    monkeypatch.setattr(distributed, "all_gather_cat", lambda local: torch.cat([local, local.clone()]))
    report = t.codebook_report()
    assert report["codebooks_identical"] is True and report["codebook_max_abs_diff"] == 0.0
    assert len(set(report["codebook_sha256"])) == 1 and len(report["codebook_sha256"]) == 2


def test_too_small_dataset_is_a_clear_error(tmp_path):
    t = make_trainer(tmp_path, size=4, batch_size=8)
    with pytest.raises(ValueError, match="too small"):
        t.fit()


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="Trainer.max_steps"):
        make_trainer(tmp_path, max_steps="10")
    with pytest.raises(ValueError, match="Trainer.precision"):
        make_trainer(tmp_path, precision="fp8")


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------


def test_metrics_are_registered():
    assert {"psnr", "codebook_usage"} <= set(lgvq_plugins.list_metrics())
    assert isinstance(lgvq_plugins.create_metric("psnr"), PSNR)


def test_psnr_hand_computed():
    # [-1, 1] → [0, 1]: 0 → 0.5 and 0.5 → 0.75; MSE 0.0625; PSNR = -10·log10(0.0625) = 12.0412 dB
    psnr = PSNR()
    psnr.update(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5))
    assert psnr.compute().item() == pytest.approx(12.041199826559248, rel=1e-6)
    # per-image mean vs global: images with MSE 0.0625 and 0.01 (errors 0.25 and 0.1 in [0,1])
    a, b = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    per, glob = PSNR(), PSNR(reduction="global")
    for m in (per, glob):
        m.update(torch.cat([a, b]), torch.cat([a + 0.5, b + 0.2]))
    assert per.compute().item() == pytest.approx((12.041199826559248 + 20.0) / 2, rel=1e-5)
    assert glob.compute().item() == pytest.approx(-10 * math.log10((0.0625 + 0.01) / 2), rel=1e-5)


def test_psnr_matches_torchmetrics_global():
    from torchmetrics.image import PeakSignalNoiseRatio

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(3, 3, 8, 8, generator=g)).clamp(-1, 1)
    ours = PSNR(reduction="global")
    ours.update(y, x)
    theirs = PeakSignalNoiseRatio(data_range=1.0)
    theirs.update((y + 1) / 2, (x + 1) / 2)
    assert ours.compute().item() == pytest.approx(theirs.compute().item(), rel=1e-4)


def test_codebook_usage_hand_computed():
    m = CodebookUsage(num_codes=4)
    m.update(torch.tensor([[0, 0], [1, 3]]))
    out = m.compute()
    assert out["usage"].item() == pytest.approx(0.75)
    # p = (1/2, 1/4, 0, 1/4): H = 1.5·ln 2, perplexity = 2^1.5
    assert out["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-6)
    with pytest.raises(ValueError, match="num_codes"):
        m.update(torch.tensor([4]))
