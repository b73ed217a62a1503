"""Adaptive balancing of the alignment terms (lgvq_plugins/guidance/balance.py): λ on a toy
linear encoder against closed-form gradient norms, the balanced gradient norm, the clamp,
terms that do not reach the encoder, parameter gradients untouched, LanguageGuided and the
trainer with balancing off (bit-identical) and on, bf16 autocast, and a tiny gin run."""

from __future__ import annotations

import json
import math
import warnings

import gin
import pytest
import torch
from torch import nn

from fakes import CAPTIONS, FakeTextEncoder, FakeTokenizer
from lgvq_plugins.config import bundled_gin_dir
from lgvq_plugins.guidance import LanguageGuided
from lgvq_plugins.guidance.balance import AdaptiveBalance, grad_norm_at

GIN = bundled_gin_dir()
SMALL = {"width": 32, "heads": 4}


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


# ---------------------------------------------------------------------------------------
# The formula on a toy linear encoder z_e = W x
# ---------------------------------------------------------------------------------------


def _toy():
    """z_e = W x with L_rec = ½‖z − t‖² (∇ = z − t) and L_k = a·‖z‖² (∇ = 2a·z)."""
    W = nn.Parameter(torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]]))
    x = torch.tensor([1.0, 1.0])
    z = W @ x  # (3,) = [3, 1, 2]
    t = torch.tensor([0.0, 1.0, 0.0])
    rec = 0.5 * (z - t).pow(2).sum()
    return W, z, t, rec


def test_lambda_matches_the_closed_form():
    W, z, t, rec = _toy()
    a = 0.25
    term = a * z.pow(2).sum()
    rec_norm = (z - t).norm()  # √(9 + 0 + 4) = √13
    term_norm = 2 * a * z.detach().norm()  # 0.5 · √14
    assert float(grad_norm_at(rec, z)) == pytest.approx(math.sqrt(13))
    assert float(grad_norm_at(term, z)) == pytest.approx(0.5 * math.sqrt(14))
    w, eps = 0.3, 1e-4
    out = AdaptiveBalance(eps=eps)(rec, {"k": term}, {"k": w}, z)
    expected = w * math.sqrt(13) / (0.5 * math.sqrt(14) + eps)
    assert float(out.weights["k"]) == pytest.approx(expected, rel=1e-6)
    assert float(out.logs["lg_lambda_k"]) == pytest.approx(expected, rel=1e-6)
    assert float(out.logs["lg_grad_k"]) == pytest.approx(float(term_norm))
    assert float(out.logs["lg_grad_tokenizer"]) == pytest.approx(float(rec_norm.detach()))
    assert float(out.logs["lg_balance_skipped"]) == 0 and out.skipped == ()
    assert not out.weights["k"].requires_grad  # detached: no gradient flows through λ


def test_balanced_term_pushes_the_encoder_with_w_times_the_reference():
    W, z, t, rec = _toy()
    term = 7.0 * (z * torch.tensor([1.0, -2.0, 0.5])).sum()
    for w in (0.01, 0.1, 1.0):
        lam = AdaptiveBalance(eps=0.0)(rec, {"k": term}, {"k": w}, z).weights["k"]
        balanced = float(grad_norm_at(lam * term, z))
        assert balanced == pytest.approx(w * float(grad_norm_at(rec, z)), rel=1e-6)


def test_ratio_is_clamped():
    W, z, t, rec = _toy()
    tiny = 1e-9 * z.sum()  # ‖∇‖ = 1e-9·√3: the ratio would be ~2e9
    out = AdaptiveBalance(max_ratio=50.0, eps=0.0)(rec, {"k": tiny}, {"k": 0.2}, z)
    assert float(out.weights["k"]) == pytest.approx(0.2 * 50.0)
    assert out.skipped == ()


def test_a_term_without_gradient_at_z_e_keeps_its_fixed_weight_and_is_named():
    W, z, t, rec = _toy()
    head = nn.Parameter(torch.ones(2))
    text_only = head.pow(2).sum()  # trains a head, never reaches z_e
    balance = AdaptiveBalance()
    with pytest.warns(RuntimeWarning, match=r"'text_only' was not balanced.*no gradient at the encoder output"):
        out = balance(rec, {"text_only": text_only, "k": z.sum()}, {"text_only": 0.5, "k": 0.1}, z)
    assert float(out.weights["text_only"]) == 0.5 and out.skipped == ("text_only",)
    assert float(out.logs["lg_balance_skipped"]) == 1.0
    assert float(out.weights["k"]) == pytest.approx(0.1 * math.sqrt(13) / (math.sqrt(3) + 1e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per term, not every step
        balance(rec, {"text_only": head.sum()}, {"text_only": 0.5}, z)


def test_nothing_to_balance_against_when_the_reference_has_no_gradient():
    W, z, t, rec = _toy()
    with pytest.warns(RuntimeWarning, match="tokenizer's objective has no gradient"):
        out = AdaptiveBalance()(rec.detach(), {"k": z.sum()}, {"k": 0.1}, z)
    assert float(out.weights["k"]) == pytest.approx(0.1) and out.skipped == ("k",)


def test_terms_option_and_bad_settings():
    W, z, t, rec = _toy()
    out = AdaptiveBalance(terms=["a"], eps=0.0)(rec, {"a": z.sum(), "b": z.sum()}, {"a": 0.1, "b": 0.7}, z)
    assert float(out.weights["b"]) == pytest.approx(0.7) and "lg_lambda_b" not in out.logs
    assert float(out.weights["a"]) == pytest.approx(0.1 * math.sqrt(13) / math.sqrt(3))
    with pytest.raises(ValueError, match=r"AdaptiveBalance.terms names \['gsx'\]"):
        AdaptiveBalance(terms=["gsx"]).check_terms({"gsa": 0.1})
    with pytest.raises(ValueError, match="max_ratio"):
        AdaptiveBalance(max_ratio=0)


def test_parameter_gradients_are_not_touched():
    """Only z_e's gradient is formed: nothing accumulates in .grad (gradient accumulation and
    DDP's reducer see the real backward only)."""
    W, z, t, rec = _toy()
    AdaptiveBalance()(rec, {"k": z.pow(2).sum()}, {"k": 0.1}, z)
    assert W.grad is None
    rec.backward()  # the graph was retained
    assert W.grad is not None


# ---------------------------------------------------------------------------------------
# LanguageGuided
# ---------------------------------------------------------------------------------------


def _images(b: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _guided(**kwargs) -> LanguageGuided:
    torch.manual_seed(0)
    losses = kwargs.pop("losses", {"gsa": 0.1, "mtp": 0.1, "ras": 0.1})
    return LanguageGuided(FakeTokenizer(), FakeTextEncoder(), losses=losses, **SMALL, **kwargs)


def test_fixed_balance_leaves_the_losses_untouched():
    model = _guided(balance="fixed")
    model.train()
    torch.manual_seed(1)
    out = model(_images(), CAPTIONS)
    assert out.z_e is None and model.balancer is None
    before = dict(out.losses)
    gen = model.tokenizer.generator_loss(_images(), out.reconstruction, out.quantized, 0)
    assert model.balance_losses(out, gen.loss) == {}
    assert all(out.losses[k] is before[k] for k in before)  # the very same tensors
    for k, raw in out.raw_losses.items():
        assert torch.equal(out.losses[k], raw * model.weights[k])
    with pytest.raises(ValueError, match=r"LanguageGuided.balance = 'equal'"):
        _guided(balance="equal")


def test_adaptive_balance_in_language_guided():
    model = _guided(balance="adaptive")
    model.train()
    x = _images()
    out = model(x, CAPTIONS)
    assert torch.allclose(out.z_e, model.tokenizer.encoder(x))  # the quantizer's input
    gen = model.tokenizer.generator_loss(x, out.reconstruction, out.quantized, 0)
    ref = float(grad_norm_at(gen.loss, out.z_e))
    logs = model.balance_losses(out, gen.loss)
    assert ref > 0 and float(logs["lg_grad_tokenizer"]) == pytest.approx(ref)
    for name, w in model.weights.items():
        g = float(grad_norm_at(out.raw_losses[name], out.z_e))
        assert g > 0, name  # every built-in term reaches the encoder
        lam = w * min(ref / (g + 1e-4), 1e4)
        assert float(logs[f"lg_lambda_{name}"]) == pytest.approx(lam, rel=1e-5), name
        assert torch.allclose(out.losses[name], out.raw_losses[name] * lam, rtol=1e-5)
        # the balanced term pushes z_e with w × the tokenizer's gradient norm (up to eps)
        assert float(grad_norm_at(out.losses[name], out.z_e)) == pytest.approx(w * ref * g / (g + 1e-4), rel=1e-4)
    assert model.config["balance"] == "adaptive"
    model.eval()  # evaluation: no z_e kept, nothing balanced
    with torch.no_grad():
        out = model(x, CAPTIONS)
    assert out.z_e is None and model.balance_losses(out, torch.zeros(())) == {}


def test_adaptive_balance_under_bf16_autocast():
    model = _guided(balance="adaptive")
    model.train()
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, CAPTIONS)
        gen = model.tokenizer.generator_loss(x, out.reconstruction, out.quantized, 0)
        logs = model.balance_losses(out, gen.loss)
    assert out.z_e.dtype == torch.bfloat16
    for name in model.weights:
        lam = logs[f"lg_lambda_{name}"]
        assert lam.dtype == torch.float32 and math.isfinite(float(lam)) and float(lam) > 0
        assert torch.isfinite(out.losses[name])


# ---------------------------------------------------------------------------------------
# Through the trainer and gin
# ---------------------------------------------------------------------------------------


def _train_two_steps(tmp_path, balance: str, drop_hook: bool = False, accum: int = 1):
    from lgvq_plugins.training.trainer import Trainer

    class Captioned(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"image": _images(1, seed=i)[0], "caption": CAPTIONS[i % len(CAPTIONS)]}

    torch.manual_seed(0)
    model = _guided(balance=balance)
    if drop_hook:
        model.balance_losses = None  # the trainer then sums the losses as before this option
    trainer = Trainer(model, Captioned(), None, out_dir=tmp_path / f"{balance}{drop_hook}", max_steps=2,
                      batch_size=4, grad_accum_steps=accum, base_lr=1e-3, log_every=1, val_every=0,
                      ckpt_every=0, progress=False, tensorboard=False, scheduler=None)
    logs = [trainer.train_step(_micro(trainer, s, accum)) for s in range(2)]
    trainer.close()
    return model, logs


def _micro(trainer, step: int, accum: int):
    from lgvq_plugins.training.batch_checks import collate_samples

    return [collate_samples([trainer.train_data[(step * accum + m) * 4 + j] for j in range(4)])
            for m in range(accum)]


def test_trainer_with_balancing_off_is_bit_identical(tmp_path):
    off, logs_off = _train_two_steps(tmp_path, "fixed")
    plain, logs_plain = _train_two_steps(tmp_path, "fixed", drop_hook=True)
    for (name, a), b in zip(off.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert logs_off == logs_plain and not any(k.startswith("lg_lambda") for k in logs_off[0])


def test_trainer_applies_and_logs_lambda_with_gradient_accumulation(tmp_path):
    on, logs = _train_two_steps(tmp_path, "adaptive", accum=2)
    fixed, _ = _train_two_steps(tmp_path, "fixed", accum=2)
    for step in logs:
        for name, w in on.weights.items():
            # the logged λ is the mean over the micro-batches of w·‖∇L_tok‖/(‖∇L_k‖+eps)
            assert step[f"lg_lambda_{name}"] > 0 and step[f"lg_grad_{name}"] > 0
        assert step["lg_balance_skipped"] == 0
    changed = [n for (n, a), b in zip(on.state_dict().items(), fixed.state_dict().values())
               if n.startswith("tokenizer.encoder") and not torch.equal(a, b)]
    assert changed  # the weights differ from the fixed ones, so the encoder is trained differently


def test_gin_block_end_to_end(tmp_path):
    from lgvq_plugins.run import main

    gin.clear_config()
    main(["--gin", str(GIN / "tiny.gin"), "--gin", str(GIN / "guidance" / "adaptive.gin"),
          "--root", str(tmp_path), "--gin_bindings", "MAX_STEPS = 2",
          "--gin_bindings", "Trainer.val_every = 0", "--gin_bindings", "Experiment.report = False"])
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "lg_lambda_gsa" in r]
    assert [r["step"] for r in train] == [1, 2]
    eps = 1e-4
    for r in train:  # one micro-batch per step: the logged numbers obey the formula exactly
        for name in ("gsa", "mtp", "ras"):
            expected = 0.1 * min(r["lg_grad_tokenizer"] / (r[f"lg_grad_{name}"] + eps), 1e4)
            assert r[f"lg_lambda_{name}"] == pytest.approx(expected, rel=1e-4), name
    operative = (tmp_path / "tiny" / "operative_config.gin").read_text()
    assert "LanguageGuided.balance = 'adaptive'" in operative and "AdaptiveBalance.max_ratio" in operative
    config = json.loads((tmp_path / "tiny" / "pretrained" / "config.json").read_text())
    assert "adaptive" in json.dumps(config)


def test_compare_file_lists_fixed_and_adaptive_twins():
    from lgvq_plugins.config import parse_gin

    parse_gin([GIN / "compare" / "adaptive_compare.gin"])
    variants = gin.query_parameter("Comparison.variants")
    assert set(variants) == {"cvq_lg", "cvq_lg_adaptive", "vqgan_lg", "vqgan_lg_adaptive"}
    for name in ("cvq_lg", "vqgan_lg"):
        assert variants[f"{name}_adaptive"] == [variants[name][0], "guidance/adaptive.gin", *variants[name][1:]]


@pytest.mark.ddp
@pytest.mark.slow
def test_adaptive_balance_under_two_process_torchrun(tmp_path):
    """autograd.grad at z_e inside a DDP forward neither breaks DDP's reducer nor hangs; both
    ranks end with the same weights."""
    from pathlib import Path

    from ddp import torchrun
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parent.parent
    torchrun([str(repo / "tests" / "scripts" / "ddp_run.py"), "--gin", "gin/tiny.gin", "--gin",
              "gin/guidance/adaptive.gin", "--root", str(tmp_path), "--gin_bindings", "MAX_STEPS = 2",
              "--gin_bindings", "Experiment.report = False"],
             cwd=repo, env={"HF_HUB_OFFLINE": "1"}, timeout=900)
    run = tmp_path / "tiny"
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("lg_lambda_gsa" in r for r in rows)
    a, b = (load_file(str(run / f"state_rank{r}.safetensors")) for r in range(2))
    assert [k for k in a if not k.startswith("tokenizer.discriminator") and not torch.equal(a[k], b[k])] == []
