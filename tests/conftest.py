"""Shared fixtures: a clean gin state around every test, and a way to reload plugins."""

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
