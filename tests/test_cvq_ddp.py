"""Under DDP every rank holds the same codebook after every step (2-process gloo run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.cvq_ddp_worker import CASES


@pytest.mark.ddp
def test_codebooks_stay_identical_across_ranks(tmp_path: Path) -> None:
    from ddp import torchrun

    script = Path(__file__).resolve().parent / "scripts" / "cvq_ddp_worker.py"
    proc = torchrun([str(script), str(tmp_path)], nproc=2, timeout=120)
    assert "rank 0: quantizer ddp done" in proc.stdout and "rank 1: quantizer ddp done" in proc.stdout
    for case in CASES:
        r0 = torch.load(tmp_path / f"{case}_rank0.pt")
        r1 = torch.load(tmp_path / f"{case}_rank1.pt")
        assert torch.equal(r0["codebook"], r1["codebook"]), f"{case}: the ranks' codebooks differ"
        assert torch.equal(r0["usage_ema"], r1["usage_ema"]), case
        assert torch.equal(r0["histogram"], r1["histogram"]), case
        for key in ("usage", "perplexity"):  # statistics of the global batch
            assert torch.equal(r0["stats"][key], r1["stats"][key]), f"{case}: {key}"
        # the histogram counts both ranks' codes: (2 + 3) latents of 4×4 per step, 6 steps
        assert int(r0["histogram"].sum()) == (2 + 3) * 16 * 6, case
        assert not torch.allclose(r0["codebook"], r0["initial"]), f"{case}: the codebook did not change"
        if case.startswith("cvq"):
            # anchors come from both ranks' features: codes sit on both sides of channel 0
            first = r0["codebook"][:, 0]
            assert (first > 1.0).any() and (first < -1.0).any(), f"{case}: {first}"
