"""Checkpoint files: round trips, atomic writes under a simulated crash, pruning, no pickle."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

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


def test_pointer_to_incomplete_checkpoint_falls_back_with_a_warning(tmp_path):
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 1), keep_last=None)
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 2), keep_last=None)
    (tmp_path / "latest").write_text("step_00000099\n")
    with pytest.warns(UserWarning, match="names 'step_00000099'.*newest complete checkpoint, step_00000002"):
        assert C.load_checkpoint(tmp_path).step == 2
    (tmp_path / "latest").unlink()
    with pytest.warns(UserWarning, match="latest is missing.*step_00000002"):
        assert C.latest_checkpoint(tmp_path).name == "step_00000002"
    # nothing complete at all: None (and a warning, since a pointer exists)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest").write_text("step_00000001\n")
    with pytest.warns(UserWarning, match="no other complete checkpoint"):
        assert C.latest_checkpoint(empty) is None
    with pytest.raises(C.CheckpointError, match="holds no complete checkpoint"), pytest.warns(UserWarning):
        C.load_checkpoint(empty)


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


# ---------------------------------------------------------------------------------------
# Same step twice, completeness, pruning, and real kills (SIGKILL) at every step
# ---------------------------------------------------------------------------------------


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["exchange", "no-exchange"])
def test_same_step_saved_twice_replaces_it_with_the_new_content(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:  # a platform without renameat2: the second-name protocol
        monkeypatch.setattr(C.atomic_io, "exchange", lambda a, b: False)
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 4))
    with torch.no_grad():
        model.weight.add_(1.0)
    trace: list[str] = []
    monkeypatch.setattr(C.atomic_io, "fs_trace", trace)
    path = C.save_checkpoint(tmp_path, _ckpt(model, opt, 4))
    assert C.latest_checkpoint(tmp_path) == path
    assert torch.equal(C.load_checkpoint(tmp_path).model["weight"], model.weight)
    if atomic_exchange:
        assert path.name == "step_00000004" and _entries(tmp_path) == ["latest", "step_00000004"]
        # the new folder is swapped in before the old copy is deleted
        kinds = [label.split()[0] for label in trace]
        assert kinds.index("exchange") < len(kinds) - 1 - kinds[::-1].index("delete")
    else:
        assert path.name.startswith("step_00000004.") and _entries(tmp_path) == ["latest", path.name]
        placed = next(i for i, t in enumerate(trace) if t.endswith(f"-> {path.name}"))
        retired = next(i for i, t in enumerate(trace) if "-> .tmp-old-step_00000004" in t)
        assert placed < retired  # the new folder was in place (and named by latest) first
    assert [p.name for p in C.list_checkpoints(tmp_path)] == [path.name]


def test_load_refuses_a_checkpoint_with_a_missing_or_truncated_file(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = _adam_after_steps(model)
    ck = _ckpt(model, opt, 1)
    ck.discriminator = {"d.weight": torch.ones(2)}
    folder = C.save_checkpoint(tmp_path / "a", ck)
    (folder / C.DISC_FILE).unlink()
    with pytest.raises(C.CheckpointError, match="incomplete: discriminator.safetensors is missing"):
        C.load_checkpoint(folder)
    folder = C.save_checkpoint(tmp_path / "b", _ckpt(model, opt, 1))
    data = (folder / C.OPTIM_FILE).read_bytes()
    (folder / C.OPTIM_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match=r"damaged: optimizer.safetensors has \d+ bytes"):
        C.load_checkpoint(folder)
    assert C.list_checkpoints(tmp_path / "b") == []  # and it is not offered as a fallback


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path):
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    for step in range(1, 6):
        C.save_checkpoint(tmp_path, _ckpt(model, opt, step), keep_last=None)
    (tmp_path / "latest").write_text("step_00000002\n")  # e.g. resumed from an older one
    removed = C.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in removed] == ["step_00000001", "step_00000003"]
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert not [n for n in _entries(tmp_path) if n.startswith(".tmp-")]


def test_save_sweeps_leftovers_of_killed_saves(tmp_path):
    model = nn.Linear(3, 2)
    opt = _adam_after_steps(model)
    (tmp_path / ".tmp-step_00000001.dead").mkdir(parents=True)
    (tmp_path / ".tmp-step_00000001.dead" / C.MODEL_FILE).write_bytes(b"half")
    (tmp_path / ".tmp-latest.0bad").write_text("step_00000001")
    C.save_checkpoint(tmp_path, _ckpt(model, opt, 2))
    assert _entries(tmp_path) == ["latest", "step_00000002"]


def test_crash_seam_counts_steps_and_is_off_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(C.atomic_io.CRASH_ENV, raising=False)
    model = nn.Linear(3, 2)
    before = C.atomic_io.fs_steps
    C.save_checkpoint(tmp_path, _ckpt(model, _adam_after_steps(model), 1))
    # mkdir, model, optimizer, state.json (write, rename), place, latest (write, rename)
    assert C.atomic_io.fs_steps - before == 8


CRASH_WORKER = Path(__file__).parent / "scripts" / "crash_worker.py"
# One kill point per kind of step and phase of the worker's job (the slow test kills at all):
# first save (mkdir, a tensor file, state.json written / renamed, folder placed), its pointer
# (written / renamed), the second save's prune (renamed aside / deleted), and the repeated
# save of the same step (exchange, old copy deleted, pointer renamed).
KILL_POINTS_DEFAULT = ["mkdir .tmp-step_00000002", "write model.safetensors", "write .tmp-state.json",
                       "rename .tmp-state.json", "rename .tmp-step_00000002", "write .tmp-latest",
                       "rename .tmp-latest", "rename step_00000002 -> .tmp-old", "delete .tmp-old",
                       "exchange", "delete .tmp-step_00000004", "rename .tmp-latest#-1"]


def _run_crash_worker(out: Path, points: list[str] | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop(C.atomic_io.CRASH_ENV, None)
    proc = subprocess.run([sys.executable, str(CRASH_WORKER), str(out), *(points or [])],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_kill_report(report: dict, expected_points: int) -> None:
    assert report["reference_entries"] == ["latest", "step_00000004"]
    assert len(report["points"]) == expected_points
    for p in report["points"]:
        where = f"kill after step {p['n']} ({p['label']})"
        assert p["killed"], f"{where}: the child was not killed by SIGKILL"
        left = p["after_kill"]
        # Nothing half-written is ever visible under a checkpoint's name, and the pointer
        # never names something incomplete.
        assert not left["incomplete"], f"{where}: {left['incomplete']}"
        assert left["pointer_ok"], f"{where}: latest names {left['pointer']!r}, not a complete checkpoint"
        assert p["resume_exit"] == 0, f"{where}: the fresh process could not resume"
        assert p["mismatched"] == [], f"{where}: resumed weights differ: {p['mismatched'][:5]}"
        assert p["checkpoint_mismatched"] == [], f"{where}: final checkpoint differs"
        # same folder as the uninterrupted run: leftovers of the kill are swept
        assert p["final_entries"] == report["reference_entries"], f"{where}: {p['final_entries']}"


def test_sigkill_at_each_kind_of_save_step_then_resume_is_exact(tmp_path):
    """A real SIGKILL (no cleanup handler runs) right after representative filesystem steps
    of every phase of a save; a fresh process resumes to the uninterrupted run's weights."""
    report = _run_crash_worker(tmp_path, KILL_POINTS_DEFAULT)
    assert len({p["n"] for p in report["points"]}) == len(KILL_POINTS_DEFAULT)
    _check_kill_report(report, len(KILL_POINTS_DEFAULT))


@pytest.mark.slow
def test_sigkill_after_every_save_step_then_resume_is_exact(tmp_path):
    """Every filesystem step of every save of the job (30 with exchange), one kill each."""
    report = _run_crash_worker(tmp_path)
    assert len(report["labels"]) >= 10
    _check_kill_report(report, len(report["labels"]))
