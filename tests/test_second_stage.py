"""The second stage: CodeGPT, sampling, the code cache, training and resume."""

from __future__ import annotations

import pytest
import torch

from lgvq_plugins import api
from lgvq_plugins.second_stage import code_cache
from lgvq_plugins.second_stage.gpt import CodeGPT
from lgvq_plugins.second_stage.sampling import filter_logits, sample_next
from lgvq_plugins.second_stage.train import TrainSettings, train_code_gpt


# Tiny tensors gain nothing from threads, and a busy 2-core machine makes them far slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_gpt(cond_dim: int | None = None, seed: int = 0) -> CodeGPT:
    torch.manual_seed(seed)
    return CodeGPT(num_codes=8, seq_len=6, cond_dim=cond_dim, max_prefix=4, width=32, depth=2, heads=2).eval()


# -- sampling ----------------------------------------------------------------------------


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # nucleus 0.8: masses before each token are 0, .5, .8, .95 -> the first two reach 0.8
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[True, True, True, False]]
    # exactly reaching top_p is enough (dyadic probabilities: the sums are exact in float32)
    dyadic = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert filter_logits(dyadic, top_p=0.75).isfinite().tolist() == [[True, True, False, False]]
    # the most likely token survives any top_p; order of the vocabulary does not matter
    shuffled = logits[:, [2, 0, 3, 1]]
    assert filter_logits(shuffled, top_p=0.01).isfinite().tolist() == [[False, True, False, False]]
    # temperature scales the logits
    assert torch.allclose(filter_logits(logits, temperature=0.5), logits * 2)
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0)


def test_top_p_sampling_never_draws_outside_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(2000, 4)
    draws = sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).double().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.04  # renormalised inside the nucleus


def test_top_k_1_sampling_is_deterministic_and_greedy():
    gpt = tiny_gpt(cond_dim=5)
    prefix = torch.randn(3, 4, 5)
    a = gpt.sample(3, prefix=prefix, top_k=1, temperature=2.0, generator=torch.Generator().manual_seed(1))
    b = gpt.sample(3, prefix=prefix, top_k=1, temperature=0.3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    # greedy: each code is the arg-max of the model's logits given the codes before it
    assert torch.equal(gpt(a, prefix).argmax(-1), a)
    c = gpt.sample(3, prefix=prefix, generator=torch.Generator().manual_seed(1))
    d = gpt.sample(3, prefix=prefix, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, d)  # seeded sampling repeats


def test_completion_keeps_the_given_codes():
    gpt = tiny_gpt()
    given = torch.tensor([[3, 1, 4], [1, 5, 2]])
    out = gpt.sample(2, given=given, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6) and torch.equal(out[:, :3], given)


# -- the model ---------------------------------------------------------------------------


def test_logits_are_causal_and_ignore_prefix_padding():
    gpt = tiny_gpt(cond_dim=5)
    codes = torch.randint(0, 8, (2, 6))
    prefix, mask = torch.randn(2, 4, 5), torch.tensor([[True, True, False, False], [True, True, True, True]])
    base = gpt(codes, prefix, mask)
    changed = codes.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 8
    after = gpt(changed, prefix, mask)
    # logits i predict code i from codes < i: positions 0..3 cannot see code 3
    assert torch.allclose(base[:, :4], after[:, :4], atol=1e-6)
    assert not torch.allclose(base[:, 4:], after[:, 4:], atol=1e-4)
    noisy = prefix.clone()
    noisy[0, 2:] = 100.0  # padding of row 0
    assert torch.allclose(gpt(codes, noisy, mask)[0], base[0], atol=1e-5)
    noisy[0, 1] = 100.0  # a real prefix vector
    assert not torch.allclose(gpt(codes, noisy, mask)[0], base[0], atol=1e-4)


def test_prefix_errors_name_the_setting():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_gpt()(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="max_prefix"):
        tiny_gpt(cond_dim=5)(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 9, 5))


def test_training_learns_to_use_the_prefix():
    """Codes are a constant chosen by a one-hot prefix: a prior that reads its prefix gets
    the held-out loss near 0 and greedy samples right."""
    cls = torch.randint(0, 4, (256,))
    codes = (2 * cls)[:, None].expand(-1, 6)
    prefix = torch.nn.functional.one_hot(cls, 4).float()[:, None, :]
    gpt = tiny_gpt(cond_dim=4)
    before = gpt.loss(codes, prefix).item()
    stats = train_code_gpt(gpt, codes, TrainSettings(steps=60, batch_size=32, lr=3e-3), prefix=prefix)
    assert stats["steps"] == 60 and stats["codes_per_s"] > 0
    with torch.no_grad():
        after = gpt.loss(codes, prefix).item()
    assert before > 1.5 and after < 0.1
    sampled = gpt.sample(4, prefix=torch.eye(4)[:, None, :], top_k=1)
    assert sampled.tolist() == [[2 * c] * 6 for c in range(4)]


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    codes = torch.randint(0, 8, (64, 6))
    settings = TrainSettings(steps=6, batch_size=8, lr=1e-3, checkpoint_every=2)
    whole = tiny_gpt()
    train_code_gpt(whole, codes, settings, checkpoint_dir=tmp_path / "a")
    part = tiny_gpt()
    first = train_code_gpt(part, codes, settings, checkpoint_dir=tmp_path / "b", stop_at=3)
    assert first["steps"] == 3
    resumed = tiny_gpt(seed=5)  # different init: everything must come from the checkpoint
    second = train_code_gpt(resumed, codes, settings, checkpoint_dir=tmp_path / "b")
    assert second["steps"] == 6
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# -- the code cache ----------------------------------------------------------------------


def _tokenizer(seed: int = 0):
    torch.manual_seed(seed)
    return api.create_backbone("vqgan", resolution=32, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(), z_channels=8, embed_dim=8, quantizer_config={"num_codes": 32},
                               disc_ndf=8, disc_n_layers=1)


def test_codes_are_extracted_once_and_keyed_by_weights_and_data(tmp_path, monkeypatch):
    tok = _tokenizer()
    data = api.create_dataset("shapes", split="val", size=32, num_samples=5)
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda x: calls.append(x.shape[0]) or encode(x))
    codes = code_cache.cached_codes(tok, data, batch_size=2, cache_dir=tmp_path)
    assert calls == [2, 2, 1] and codes.shape == (5, 8, 8) and codes.dtype == torch.int64
    with torch.no_grad():
        direct = encode(torch.stack([data[i]["image"] for i in range(5)])).indices
    assert torch.equal(codes, direct)
    assert tok.training  # the caller's mode is restored
    again = code_cache.cached_codes(tok, data, batch_size=2, cache_dir=tmp_path)
    assert calls == [2, 2, 1] and torch.equal(again, codes)  # read back, not re-encoded
    path = code_cache.codes_path(tok, data, tmp_path)
    assert path.is_file() and path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    other_data = api.create_dataset("shapes", split="val", size=32, num_samples=4)
    assert code_cache.codes_path(tok, other_data, tmp_path) != path
    with torch.no_grad():
        next(tok.parameters()).add_(1e-3)
    assert code_cache.codes_path(tok, data, tmp_path) != path
