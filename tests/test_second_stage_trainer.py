"""The second stage trains through the project's Trainer: checkpoints and logs in
the run directory, exact resume after a crash between checkpoints, the settings checked on
resume, first-stage ``Trainer.*`` bindings kept out, the caller's RNG untouched, the heads
trained the same way, and a two-process torchrun (gloo) run equal on both ranks and to one
process.
"""

from __future__ import annotations

import json
import random
import textwrap

import pytest
import torch
from ddp import torchrun

import gin
from lgvq_plugins.second_stage.gpt import CodeGPT
from lgvq_plugins.second_stage.heads import CodeReader, train_reader
from lgvq_plugins.second_stage.train import (
    TensorRows,
    TrainSettings,
    train_code_gpt,
    train_rows,
)
from lgvq_plugins.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from lgvq_plugins.training.logs import read_jsonl
from lgvq_plugins.training.trainer import ConfigMismatchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = {"progress": False}


def tiny_gpt(seed: int = 0, cond_dim: int | None = None) -> CodeGPT:
    torch.manual_seed(seed)
    return CodeGPT(num_codes=8, seq_len=6, cond_dim=cond_dim, max_prefix=2, width=16, depth=1, heads=2)


def codes_and_prefix(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 8, (n, 6), generator=g), torch.randn(n, 2, 3, generator=g)


def test_training_writes_checkpoints_and_logs_in_the_run_dir(tmp_path):
    codes, prefix = codes_and_prefix()
    settings = TrainSettings(steps=7, batch_size=8, lr=1e-3, checkpoint_every=3, log_every=2, keep_last=2, **QUIET)
    stats = train_code_gpt(tiny_gpt(cond_dim=3), codes, settings, prefix=prefix, checkpoint_dir=tmp_path)
    assert stats["steps"] == 7 and stats["codes_per_s"] > 0 and stats["run_dir"] == str(tmp_path)
    assert stats["codes_per_s"] == pytest.approx(stats["rows_per_s"] * 6)
    # steps 3 and 6 periodic, 7 at the end; two kept; `latest` names the last
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000006", "step_00000007"]
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000007"
    ck = load_checkpoint(tmp_path / "checkpoints")
    assert set(ck.optimizers) == {"generator"} and not ck.discriminator
    assert ck.state["batch_size"] == 8 and ck.state["epoch"] == 2  # 3 batches of 8 per epoch of 24 rows
    assert "second_stage_training.lr = 0.001" in ck.state["config"]
    assert all(k.startswith("model.") for k in ck.model)  # the Objective adapter's prefix
    records = [r for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["images_per_sec"] > 0 for r in records)
    assert stats["loss"] > 0  # the last step's loss


def test_the_optimizer_is_adamw_with_the_gpt_betas(tmp_path):
    codes, _ = codes_and_prefix()
    train_code_gpt(tiny_gpt(), codes, TrainSettings(steps=1, batch_size=8, lr=2e-3, weight_decay=0.05, **QUIET),
                   checkpoint_dir=tmp_path)
    group = load_checkpoint(tmp_path / "checkpoints").optimizers["generator"]["meta"]["param_groups"][0]
    assert group["lr"] == 2e-3 and tuple(group["betas"]) == (0.9, 0.95) and group["weight_decay"] == 0.05


class Crash(RuntimeError):
    pass


def test_a_run_crashed_between_checkpoints_resumes_bit_identical(tmp_path):
    """24 rows, batch 8 (3 batches per epoch), 10 steps; the run crashes inside step 8, its
    last checkpoint is step 6 (mid-epoch data position); resumed from there with a freshly
    initialised model it ends bit-identical to an uninterrupted run (weights and Adam state)."""
    codes, prefix = codes_and_prefix()
    settings = TrainSettings(steps=10, batch_size=8, lr=3e-3, checkpoint_every=3, **QUIET)

    def run(model, loss_fn, run_dir):
        rows = TensorRows(codes=codes, prefix=prefix)
        return train_rows(model, loss_fn, rows, settings, run_dir=run_dir)

    def gpt_loss(m, batch):
        return m.loss(batch["codes"], batch["prefix"])

    whole = tiny_gpt(cond_dim=3)
    run(whole, gpt_loss, tmp_path / "whole")

    calls = []

    def crashing(m, batch):
        calls.append(1)
        if len(calls) == 8:
            raise Crash("killed")
        return gpt_loss(m, batch)

    with pytest.raises(Crash):
        run(tiny_gpt(cond_dim=3), crashing, tmp_path / "crashed")
    assert latest_checkpoint(tmp_path / "crashed" / "checkpoints").name == "step_00000006"
    resumed = tiny_gpt(seed=5, cond_dim=3)  # different init: everything must come from the checkpoint
    stats = run(resumed, gpt_loss, tmp_path / "crashed")
    assert stats["steps"] == 10
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    a = load_checkpoint(tmp_path / "whole" / "checkpoints").optimizers["generator"]["tensors"]
    b = load_checkpoint(tmp_path / "crashed" / "checkpoints").optimizers["generator"]["tensors"]
    assert a.keys() == b.keys() and any("exp_avg_sq" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is loaded, not trained further
    again = tiny_gpt(seed=7, cond_dim=3)
    assert run(again, gpt_loss, tmp_path / "whole")["steps"] == 10
    assert torch.equal(again.head.weight, whole.head.weight)


def test_resume_with_other_settings_names_them(tmp_path):
    codes, _ = codes_and_prefix()
    train_code_gpt(tiny_gpt(), codes, TrainSettings(steps=2, batch_size=8, lr=1e-3, **QUIET), checkpoint_dir=tmp_path)
    with pytest.raises(ConfigMismatchError, match=r"second_stage_training\.lr = 0\.002") as err:
        train_code_gpt(tiny_gpt(), codes, TrainSettings(steps=4, batch_size=8, lr=2e-3, **QUIET),
                       checkpoint_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
    # more steps is not another configuration: the run continues
    assert train_code_gpt(tiny_gpt(), codes, TrainSettings(steps=4, batch_size=8, lr=1e-3, **QUIET),
                          checkpoint_dir=tmp_path)["steps"] == 4


def test_first_stage_trainer_bindings_do_not_reach_the_second_stage(tmp_path):
    codes, _ = codes_and_prefix()
    settings = TrainSettings(steps=3, batch_size=8, lr=1e-3, **QUIET)
    plain = tiny_gpt()
    train_code_gpt(plain, codes, settings)
    gin.parse_config(["Trainer.optimizer = 'sgd'", "Trainer.grad_accum_steps = 3", "Trainer.scale_lr = True",
                      "Trainer.base_lr = 4.5e-6", "Trainer.scheduler = 'cosine'", "Trainer.clip_grad_norm = 1e-9"])
    bound = tiny_gpt()
    train_code_gpt(bound, codes, settings)
    assert torch.equal(plain.head.weight, bound.head.weight)


def test_the_callers_random_state_is_left_alone(tmp_path):
    codes, _ = codes_and_prefix()
    train_code_gpt(tiny_gpt(), codes, TrainSettings(steps=2, batch_size=8, **QUIET), checkpoint_dir=tmp_path)
    model = tiny_gpt()  # (seeds the RNG itself)
    torch.manual_seed(123)
    random.seed(4)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(4)
    # resuming restores the checkpoint's RNG states: only inside the training
    train_code_gpt(model, codes, TrainSettings(steps=3, batch_size=8, **QUIET), checkpoint_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py


def test_too_few_rows_for_the_batch_names_the_setting():
    codes, _ = codes_and_prefix(n=5)
    with pytest.raises(ValueError, match="second_stage_training.batch_size = 8"):
        train_code_gpt(tiny_gpt(), codes, TrainSettings(steps=1, batch_size=8, **QUIET))
    with pytest.raises(ValueError, match="one row per sample"):
        TensorRows(codes=codes, prefix=torch.zeros(4, 2))


def test_the_reader_head_trains_through_the_trainer(tmp_path):
    """Answer = the class of the first code vector; the reader learns it, with checkpoints."""
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 2, (64,), generator=g)
    vectors = torch.randn(64, 4, 3, generator=g)
    vectors[:, 0, 0] = (cls.float() * 2 - 1) * 3
    words = torch.randint(1, 8, (64, 3), generator=g)
    torch.manual_seed(0)
    reader = CodeReader(3, 4, 8, 3, 2, width=16, depth=1, heads=2)
    loss = train_reader(reader, (vectors, words), cls, torch.nn.functional.cross_entropy,
                        TrainSettings(steps=30, batch_size=16, lr=3e-3, **QUIET), run_dir=tmp_path)
    assert loss < 0.2
    with torch.no_grad():
        assert (reader(vectors, words).argmax(-1) == cls).float().mean() > 0.95
    group = load_checkpoint(tmp_path / "checkpoints").optimizers["generator"]["meta"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.999)  # the heads keep torch's default betas


# -- two processes -----------------------------------------------------------------------

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    from lgvq_plugins.second_stage.gpt import CodeGPT
    from lgvq_plugins.second_stage.train import TrainSettings, train_code_gpt
    from lgvq_plugins.training import distributed as D

    out = sys.argv[1]
    D.setup_distributed()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    codes = (torch.arange(6)[None] + torch.randint(0, 2, (32, 1), generator=g)) % 8  # learnable
    torch.manual_seed(0)
    gpt = CodeGPT(num_codes=8, seq_len=6, width=16, depth=1, heads=2)
    with torch.no_grad():
        before = float(gpt.loss(codes))
    settings = TrainSettings(steps=12, batch_size=8, lr=3e-3, checkpoint_every=5, progress=False)
    # rank 1 passes no directory, as the tasks do: rank 0's is used everywhere
    stats = train_code_gpt(gpt, codes, settings, checkpoint_dir=out + "/run" if D.rank() == 0 else None)
    with torch.no_grad():
        after = float(gpt.loss(codes))
    torch.save(gpt.state_dict(), f"{out}/rank{D.rank()}.pt")
    with open(f"{out}/rank{D.rank()}.json", "w") as f:
        json.dump({"before": before, "after": after, "world": D.world_size(), **stats}, f)
    if D.is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
''')


@pytest.mark.ddp
def test_two_processes_train_one_prior_equal_to_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    torchrun([str(script), str(tmp_path / "two")], nproc=2, timeout=900)
    torchrun([str(script), str(tmp_path / "one")], nproc=1, timeout=900)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP: the same weights on both ranks
    info = json.loads((tmp_path / "two" / "rank0.json").read_text())
    assert info["world"] == 2 and info["steps"] == 12 and info["run_dir"] == str(tmp_path / "two" / "run")
    assert json.loads((tmp_path / "two" / "rank1.json").read_text())["run_dir"] == info["run_dir"]
    assert info["after"] < info["before"] - 0.3  # it learned
    ck = load_checkpoint(tmp_path / "two" / "run" / "checkpoints")
    assert ck.state["world_size"] == 2 and ck.state["batch_size"] == 4  # global batch 8 split over 2
    # the same global batches (DistributedSampler interleaves one permutation) and the mean of
    # equal-sized rank means is the global mean: one process gives the same prior, up to the
    # order of float sums
    # (measured: largest weight difference 1.5e-5 after 12 steps; the loss equal to 1e-7)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    for k in one:
        torch.testing.assert_close(r0[k], one[k], rtol=1e-3, atol=1e-4, msg=k)
    alone = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert alone["world"] == 1 and info["after"] == pytest.approx(alone["after"], rel=1e-5)
