"""The README's Python example runs as written (so the documentation cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, f"no python block after {heading!r}"
    return match.group(1)


def test_guidance_example_runs_and_trains():
    code = _python_block_after("## Guiding a tokenizer in your own training loop")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    out, model = namespace["out"], namespace["model"]
    assert set(out.raw_losses) == {"gsa", "mtp", "ras"}
    assert tuple(out.quantized.indices.shape) == (4, 16, 16)
    # backward reached the tokenizer's encoder through the alignment losses
    grads = [p.grad for p in model.tokenizer.encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not any(k.startswith("_frozen") or "text_encoder" in k for k in model.state_dict())
