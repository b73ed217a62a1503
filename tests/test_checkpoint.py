"""Checkpoint files: round trips, atomic writes under a simulated crash, pruning, no pickle."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from lgvq_plugins.training import checkpoint as C


def _adam_after_steps(model: nn.Module, steps: int = 2) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    return opt


def _ckpt(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> C.Checkpoint:
    return C.Checkpoint(model=model.state_dict(), optimizers={"generator": opt.state_dict()},
                        state={"step": step, "epoch": 0, "batch_in_epoch": step, "rng": [C.get_rng_state()]})


def test_round_trip_restores_model_and_optimizer_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 7))

    torch.manual_seed(1)
    other = nn.Linear(3, 2)
    other_opt = torch.optim.Adam(other.parameters(), lr=5.0, betas=(0.1, 0.2))
    ck = C.load_checkpoint(tmp_path)
    assert ck.step == 7 and ck.path.name == "step_00000007"
    other.load_state_dict(ck.model)
    C.load_optimizer_state(other_opt, ck, "generator")
    assert other_opt.param_groups[0]["betas"] == (0.5, 0.9)  # tuple again, not a JSON list
    assert other_opt.param_groups[0]["lr"] == 1e-2

    # One more identical update on both gives bit-identical weights.
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (other, other_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    C.set_rng_state(C.get_rng_state())  # harmless on a fresh state
    state = json.loads(json.dumps(C.get_rng_state()))  # survives JSON
    first = (random.random(), np.random.rand(), torch.rand(3))
    C.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_crash_mid_write_leaves_latest_loadable(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 1))
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = C.save_tensors

    def crash_half_way(tensors, path):
        real_save(tensors, path)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])  # half a file, then the "kill"
        raise KeyboardInterrupt("simulated kill during checkpoint write")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(C, "save_tensors", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, _ckpt(model, opt, 2))
    monkeypatch.undo()

    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()
    ck = C.load_checkpoint(tmp_path)
    assert ck.step == 1
    for k, v in saved.items():
        assert torch.equal(ck.model[k], v)
    # The next save sweeps any leftover temporary folder and works.
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert C.load_checkpoint(tmp_path).step == 3


def test_crash_between_folder_and_pointer_keeps_previous(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 1))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before the pointer moved")

    monkeypatch.setattr(C, "write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(tmp_path, _ckpt(model, opt, 2))
    monkeypatch.undo()
    assert C.load_checkpoint(tmp_path).step == 1  # complete step 2 exists, but latest still says 1


def test_keep_last_prunes_oldest(tmp_path):
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    for step in range(1, 6):
        C.save_checkpoint(tmp_path, _ckpt(model, opt, step), keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert C.latest_checkpoint(tmp_path).name == "step_00000005"


def test_pointer_to_incomplete_checkpoint_is_an_error(tmp_path):
    model = nn.Linear(3, 2)
    C.save_checkpoint(tmp_path, _ckpt(model, _adam_after_steps(model), 1))
    (tmp_path / "latest").write_text("step_00000099\n")
    with pytest.raises(C.CheckpointError, match="not a complete checkpoint"):
        C.load_checkpoint(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    C.save_checkpoint(tmp_path, _ckpt(model, _adam_after_steps(model), 1))
    files = {p.suffix for p in (tmp_path / "step_00000001").iterdir()}
    assert files == {".safetensors", ".json"}

    def no_pickle(*a, **k):
        raise AssertionError("torch.load / pickle used while loading a checkpoint")

    monkeypatch.setattr(torch, "load", no_pickle)
    import pickle

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    ck = C.load_checkpoint(tmp_path)
    assert set(ck.model) == {"weight", "bias"}


def test_optimizer_flattening_keeps_every_tensor():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = _adam_after_steps(model)
    tensors, meta = C.flatten_optimizer_state(opt.state_dict(), "g")
    # Adam keeps step, exp_avg, exp_avg_sq per parameter: 4 parameters × 3.
    assert len(tensors) == 12 and all(k.startswith("g.state.") for k in tensors)
    rebuilt = C.unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)), "g", opt.state_dict())
    original = opt.state_dict()
    for index, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(rebuilt["state"][index][name], value)


def test_private_generators_of_modules_are_captured():
    class WithStreams(nn.Module):
        def __init__(self):
            super().__init__()
            self.gen = torch.Generator().manual_seed(3)
            self._table = {}  # filled lazily, keyed by (kind, device) like a quantizer's streams

        def draw(self):
            key = ("shared", torch.device("cpu"))
            if key not in self._table:
                self._table[key] = torch.Generator().manual_seed(5)
            return torch.rand(2, generator=self.gen), torch.rand(2, generator=self._table[key])

    a = nn.Sequential(WithStreams())
    a[0].draw()
    state = json.loads(json.dumps(C.get_rng_state(a)))
    expected = a[0].draw()
    b = nn.Sequential(WithStreams())  # fresh: its table is still empty
    C.set_rng_state(state, b)
    got = b[0].draw()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
