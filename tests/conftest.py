"""Shared fixtures: a clean gin state around every test, a way to reload plugins, and the
``requires_vqtorch`` marker (tests that use the example plugin's quantizers skip, saying
why, when it is not installed)."""

from __future__ import annotations

import os

import gin
import pytest

# Tests never touch the network; the MiniLM encoder ships its weights in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload the plugin host from scratch for this test and again afterwards, so what the
    test registers or breaks never leaks into other tests."""
    import lgvq_plugins

    lgvq_plugins.reset_plugins()
    yield lgvq_plugins
    monkeypatch.undo()  # environment first, so the reload below sees the normal setup
    lgvq_plugins.reset_plugins()


def _vqtorch_missing() -> str | None:
    """Why the example plugin (examples/lgvq-vqtorch) cannot be used, or None."""
    try:
        import lgvq_vqtorch.plugin  # noqa: F401
        import vector_quantize_pytorch  # noqa: F401
    except ImportError as exc:
        return (f"needs the example plugin lgvq-vqtorch and vector-quantize-pytorch ({exc}); "
                "pip install -e examples/lgvq-vqtorch (.ci/run does)")
    return None


def pytest_collection_modifyitems(config, items):
    reason = _vqtorch_missing()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("requires_vqtorch") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny-tensor tests (threads only add overhead
    there, and cost a lot on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
