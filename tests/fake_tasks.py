"""A small, fast evaluation task for the tests of ``run``/``eval``/``compare`` plumbing:
code usage over the first images, one metric reported unavailable, the histogram as a table."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lgvq_plugins.evaluation.task import TaskResult, batches, tokenizer_of

NAME = "count_codes"


class CountCodes:
    needs = "tokenizer"

    def __init__(self, max_images: int = 8):
        self.max_images = max_images

    def run(self, model, data, out_dir: Path) -> TaskResult:
        tokenizer = tokenizer_of(model)
        counts = torch.zeros(tokenizer.quantizer.num_codes, dtype=torch.long)
        images = 0
        for batch in batches(data, 4, self.max_images):
            counts += torch.bincount(tokenizer.encode(batch["image"]).indices.flatten(), minlength=counts.numel())
            images += batch["image"].shape[0]
        (out_dir / "counts.txt").write_text(" ".join(map(str, counts.tolist())))
        return TaskResult(metrics={"usage": float((counts > 0).float().mean()), "lpips": None},
                          protocol={"images": images, "split": getattr(data, "split", "?")},
                          unavailable={"lpips": "no LPIPS weights here"}, artefacts={"counts": "counts.txt"},
                          tables={"usage_histogram": counts.tolist()})


@contextlib.contextmanager
def registered():
    """``count_codes`` registered in code for the duration (plugins reloaded around it)."""
    import lgvq_plugins

    lgvq_plugins.reset_plugins()
    lgvq_plugins.register_task(NAME)(CountCodes)
    try:
        yield
    finally:
        # A code registration outlives reset_plugins by design: take it back explicitly so
        # it does not leak into later tests.
        lgvq_plugins.get_host(load=False).registries["task"].remove(NAME)
        lgvq_plugins.reset_plugins()
