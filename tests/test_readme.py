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


def _python_blocks_after(heading: str) -> list[str]:
    section = README.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_save_and_reload_example_gives_the_same_codes(tmp_path, monkeypatch):
    """The README's second block (save_pretrained / from_pretrained) runs after the first and
    the reloaded model encodes the batch to the same codes."""
    import torch

    first, second = _python_blocks_after("## Guiding a tokenizer in your own training loop")[:2]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first, str(README), "exec"), namespace)  # noqa: S102 - our own README
    before = namespace["model"]
    before.eval()
    images = namespace["images"]
    with torch.no_grad():
        expected = before.tokenizer.encode(images).indices
    exec(compile(second, str(README), "exec"), namespace)  # noqa: S102
    after = namespace["model"]
    assert after is not before and (tmp_path / "my_model").is_dir()
    after.eval()
    with torch.no_grad():
        assert torch.equal(after.tokenizer.encode(images).indices, expected)
