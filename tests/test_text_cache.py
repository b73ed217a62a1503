"""TextFeatureCache: one encoder run per unique caption, disk reuse, identity isolation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lgvq_plugins.interfaces import TextFeatures, TextTokens
from lgvq_plugins.text.cache import TextFeatureCache

pytest.importorskip("open_clip")
from lgvq_plugins.text.clip import OpenCLIPTextEncoder

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
CAPTIONS = ["a red circle", "a blue square", "a red circle", "hello !$ world", "a blue square", ""]


def tiny_clip(seed: int = 0, **kwargs) -> OpenCLIPTextEncoder:
    torch.manual_seed(seed)
    return OpenCLIPTextEncoder("ViT-B-32", text_cfg=TINY_TEXT, embed_dim=32, **kwargs)


class CountingEncoder:
    """Delegates to a real encoder and records every batch it is asked to encode."""

    def __init__(self, encoder):
        self.inner = encoder
        self.batches: list[list[str]] = []
        self._last: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def tokenize(self, captions: list[str]) -> TextTokens:
        self._last = list(captions)
        return self.inner.tokenize(captions)

    def encode(self, tokens: TextTokens) -> TextFeatures:
        self.batches.append(self._last)
        return self.inner.encode(tokens)


@pytest.fixture(scope="module")
def encoder():
    return tiny_clip()


def shards(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.safetensors"))


def test_encoder_runs_once_per_unique_caption(encoder):
    counting = CountingEncoder(encoder)
    cache = TextFeatureCache(counting)
    feats = cache(CAPTIONS, "cpu")
    assert counting.batches == [["a red circle", "a blue square", "hello !$ world", ""]]
    assert feats.token_feats.shape == (6, 30, 64) and feats.global_feat.shape == (6, 32)
    assert torch.equal(feats.token_feats[0], feats.token_feats[2])  # duplicates share the row

    cache(["a blue square", "a green star", "a green star", ""], "cpu")
    assert counting.batches[1:] == [["a green star"]]  # only the miss, once
    cache(["a green star", "a red circle"], "cpu")
    assert len(counting.batches) == 2
    stats = cache.stats
    assert (stats.encoder_calls, stats.captions_encoded) == (2, 5)
    assert (stats.misses, stats.hits, stats.disk_hits) == (5, 2 + 2, 0)
    assert len(cache) == 5 and "a green star" in cache and "never seen" not in cache


def test_cached_features_equal_direct_encoding(encoder):
    cache = TextFeatureCache(encoder)
    cache(["a blue square", "zebra"])  # different batch composition first
    feats = cache(CAPTIONS)
    direct = encoder.encode(encoder.tokenize(CAPTIONS))
    assert feats.token_feats.dtype == torch.float32 and feats.token_feats.device.type == "cpu"
    torch.testing.assert_close(feats.token_feats, direct.token_feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.global_feat, direct.global_feat, rtol=1e-5, atol=1e-6)
    assert torch.equal(feats.tokens.ids, direct.tokens.ids)
    assert torch.equal(feats.lengths, direct.lengths)
    assert torch.equal(feats.tokens.special_mask, direct.tokens.special_mask)
    assert feats.tokens.ids.dtype == torch.int64 and feats.tokens.special_mask.dtype == torch.bool


def test_features_are_stored_in_fp32_on_cpu(encoder):
    class HalfPrecision(CountingEncoder):
        def encode(self, tokens):
            f = super().encode(tokens)
            return TextFeatures(f.token_feats.bfloat16(), f.global_feat.bfloat16(), f.tokens)

    cache = TextFeatureCache(HalfPrecision(encoder))
    feats = cache(["a red circle"])
    assert feats.token_feats.dtype == torch.float32 and feats.global_feat.dtype == torch.float32


def test_disk_cache_is_reused_without_encoding(encoder, tmp_path):
    first = TextFeatureCache(encoder, tmp_path)
    expected = first(CAPTIONS)
    written = first.save()
    assert written is not None and written.exists() and written.suffix == ".safetensors"
    assert not list(tmp_path.rglob("*.tmp"))  # atomic write left no temporary file

    counting = CountingEncoder(encoder)
    second = TextFeatureCache(counting, tmp_path)
    assert len(second) == 4
    got = second(CAPTIONS)
    assert counting.batches == []
    assert second.stats.disk_hits == 4 and second.stats.encoder_calls == 0
    for a, b in ((got.token_feats, expected.token_feats), (got.global_feat, expected.global_feat),
                 (got.tokens.ids, expected.tokens.ids), (got.lengths, expected.lengths),
                 (got.tokens.special_mask, expected.tokens.special_mask)):
        assert torch.equal(a, b)


def test_other_identity_or_length_never_reuses(encoder, tmp_path):
    with TextFeatureCache(encoder, tmp_path) as first:  # ``with`` saves on exit
        first(CAPTIONS)
    assert len(shards(tmp_path)) == 1

    other = CountingEncoder(tiny_clip(seed=1))
    assert other.identity != encoder.identity
    cache = TextFeatureCache(other, tmp_path)
    assert len(cache) == 0
    cache(["a red circle"])
    assert other.batches == [["a red circle"]]

    shorter = CountingEncoder(encoder)
    shorter.inner = tiny_clip(seed=0, max_length=8)
    assert shorter.identity == encoder.identity and shorter.max_length == 8
    cache = TextFeatureCache(shorter, tmp_path)
    assert len(cache) == 0
    assert cache(["a red circle"]).token_feats.shape == (1, 8, 64)


def test_shard_with_foreign_metadata_is_ignored(encoder, tmp_path):
    """Even a shard copied into this encoder's folder is used only if its metadata match."""
    foreign = TextFeatureCache(tiny_clip(seed=1), tmp_path)
    foreign(CAPTIONS)
    shard = foreign.save()
    mine = TextFeatureCache(encoder, tmp_path)
    (mine.directory / shard.name).write_bytes(shard.read_bytes())
    again = TextFeatureCache(encoder, tmp_path)
    assert len(again) == 0


def test_automatic_flush_and_warm(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    cache = TextFeatureCache(counting, tmp_path, flush_every=2)
    cache(["one", "two", "three"])
    assert len(shards(tmp_path)) == 1  # flushed without an explicit save()
    assert cache.stats.shards_written == 1  # "one", "two"
    assert cache.save() is not None  # "three" was still pending: a second shard
    assert cache.save() is None and len(shards(tmp_path)) == 2  # nothing left to write
    assert len(TextFeatureCache(encoder, tmp_path)) == 3

    warm_captions = [f"caption number {i}" for i in range(5)] * 2 + ["one"]
    assert cache.warm(warm_captions, batch_size=2) == 5
    assert [len(b) for b in counting.batches[1:]] == [2, 2, 1]
    assert cache.warm(warm_captions, batch_size=2) == 0
    calls = len(counting.batches)
    cache(warm_captions)
    assert len(counting.batches) == calls

    reloaded = TextFeatureCache(encoder, tmp_path)
    assert len(reloaded) == 8  # one, two, three + five warmed


def test_memory_limit_reads_back_from_disk(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    cache = TextFeatureCache(counting, tmp_path, max_memory_rows=2)
    expected = cache(["a", "b", "c", "d"])
    assert len(cache._memory) == 2
    # evicting a row not yet on disk wrote the pending rows first: nothing was lost
    assert cache.stats.shards_written == 1 and len(shards(tmp_path)) == 1
    again = cache(["a", "b"])  # evicted: read back from the shard, not encoded
    assert len(counting.batches) == 1 and cache.stats.disk_hits == 2
    assert torch.equal(again.token_feats, expected.token_feats[:2])
    assert torch.equal(again.tokens.ids, expected.tokens.ids[:2])

    memory_only = CountingEncoder(encoder)
    cache = TextFeatureCache(memory_only, max_memory_rows=2)
    cache(["a", "b", "c"])
    cache(["a"])
    assert memory_only.batches == [["a", "b", "c"], ["a"]]  # evicted rows are encoded again


class CheapEncoder:
    """A deterministic stand-in of a given width: features are a function of the caption."""

    identity, special_token_ids = "cheap-v1", frozenset({1, 2})

    def __init__(self, width: int = 48, max_length: int = 6):
        self.width, self.global_width, self.max_length = width, width, max_length
        self.calls = 0

    def tokenize(self, captions):
        n = len(captions)
        ids = torch.tensor([[1, 3 + sum(map(ord, c)) % 50, 2] + [0] * (self.max_length - 3) for c in captions])
        special = torch.zeros(n, self.max_length, dtype=torch.bool)
        special[:, [0, 2]] = True
        return TextTokens(ids, torch.full((n,), 3), special)

    def encode(self, tokens):
        self.calls += tokens.ids.shape[0]
        seed = tokens.ids[:, 1:2].double()
        base = torch.arange(self.max_length * self.width, dtype=torch.float64).reshape(self.max_length, self.width)
        feats = torch.sin(base[None] * 0.01 + seed[..., None]).float()
        return TextFeatures(feats, feats.mean(1), tokens)


ROW_BYTES = 6 * 48 * 4 + 48 * 4 + 6 * 8 + 8 + 6  # token feats, global, ids, length, special


def test_memory_stays_under_the_bound_and_evicted_rows_read_back_equal(tmp_path):
    captions = [f"caption {i}" for i in range(600)]
    bound_mb = 40 * ROW_BYTES / 2**20  # room for 40 rows
    encoder = CheapEncoder()
    cache = TextFeatureCache(encoder, tmp_path, max_memory_mb=bound_mb, flush_every=64)
    first = {}
    for start in range(0, len(captions), 10):
        batch = captions[start:start + 10]
        feats = cache(batch)
        for caption, row in zip(batch, feats.token_feats):
            first[caption] = row.clone()
        assert cache.stats.memory_bytes <= bound_mb * 2**20
    stats = cache.stats
    assert stats.memory_rows == 40 and stats.memory_bytes == 40 * ROW_BYTES
    assert stats.evictions == 560 and stats.peak_memory_bytes == 40 * ROW_BYTES
    assert encoder.calls == 600 and len(cache) == 600
    # every evicted row comes back from disk, unchanged, without the encoder
    again = cache(captions[:100])
    assert encoder.calls == 600 and cache.stats.disk_hits == 100
    assert torch.equal(again.token_feats, torch.stack([first[c] for c in captions[:100]]))
    assert cache.stats.memory_bytes <= bound_mb * 2**20


def test_memory_bound_is_on_by_default_and_set_from_gin(tmp_path):
    import gin
    from lgvq_plugins.text.cache import DEFAULT_MAX_MEMORY_MB

    assert TextFeatureCache(CheapEncoder()).max_memory_bytes == int(DEFAULT_MAX_MEMORY_MB * 2**20)
    assert TextFeatureCache(CheapEncoder(), max_memory_mb=None).max_memory_bytes is None
    gin.clear_config()
    try:
        gin.parse_config("TextFeatureCache.max_memory_mb = 0.5")
        assert TextFeatureCache(CheapEncoder()).max_memory_bytes == 2**19
    finally:
        gin.clear_config()
    with pytest.raises(ValueError, match="max_memory_mb"):
        TextFeatureCache(CheapEncoder(), max_memory_mb=0)


@pytest.mark.parametrize("bad", [None, 3, b"bytes"])
def test_non_string_caption_is_refused(bad):
    cache = TextFeatureCache(CheapEncoder())
    with pytest.raises(TypeError, match=f"position 1 is {type(bad).__name__}"):
        cache(["fine", bad])
    with pytest.raises(TypeError, match="caption number 0"):
        cache.warm([bad])


def test_cache_is_never_in_a_state_dict(encoder):
    holder = torch.nn.Module()
    holder.head = torch.nn.Linear(2, 2)
    holder.text_cache = TextFeatureCache(encoder)
    holder.text_cache(["a red circle"])
    assert not isinstance(holder.text_cache, torch.nn.Module)
    assert set(holder.state_dict()) == {"head.weight", "head.bias"}


def test_key_depends_on_identity_length_and_text(encoder):
    cache = TextFeatureCache(encoder)
    assert cache.key("a") != cache.key("a ")
    assert len(cache.key("a")) == 64
    other = TextFeatureCache(tiny_clip(seed=0, max_length=8))
    assert other.key("a") != cache.key("a")


def test_pending_rows_are_written_at_exit(tmp_path):
    """A process that never calls save() still leaves its features on disk."""
    script = textwrap.dedent(f"""
        import torch
        from lgvq_plugins.interfaces import TextFeatures, TextTokens
        from lgvq_plugins.text.cache import TextFeatureCache

        class Fake:
            identity, max_length, width, global_width = "fake-v1", 4, 3, 2
            special_token_ids = frozenset({{1, 2}})
            def tokenize(self, captions):
                n = len(captions)
                ids = torch.tensor([[1, 5, 2, 0]] * n)
                return TextTokens(ids, torch.full((n,), 3), ids > 0)
            def encode(self, tokens):
                n = tokens.ids.shape[0]
                return TextFeatures(torch.ones(n, 4, 3), torch.zeros(n, 2), tokens)

        TextFeatureCache(Fake(), {str(tmp_path)!r})(["x", "y"])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    found = shards(tmp_path)
    assert len(found) == 1
    from safetensors import safe_open

    with safe_open(str(found[0]), framework="pt") as f:
        assert f.metadata()["identity"] == "fake-v1"
        assert f.get_tensor("token_feats").shape == (2, 4, 3)


def test_bad_settings_raise_with_the_exact_message_and_boundaries_are_accepted(encoder):
    """Each bound exactly: 0 refused, 1 accepted (and the message as documented)."""
    for kwargs, message in (
        ({"flush_every": 0}, "TextFeatureCache: flush_every=0 must be at least 1"),
        ({"max_memory_rows": 0}, "TextFeatureCache: max_memory_rows=0 must be at least 1 or None"),
        ({"max_memory_mb": 0}, "TextFeatureCache: max_memory_mb=0 must be > 0 or None "
                               "(TextFeatureCache.max_memory_mb in gin)"),
    ):
        with pytest.raises(ValueError) as err:
            TextFeatureCache(encoder, **kwargs)
        assert str(err.value).splitlines()[0] == message  # gin may add its "In call to" line
    cache = TextFeatureCache(encoder, flush_every=1, max_memory_rows=1, max_memory_mb=1e-3)
    assert cache.flush_every == 1 and cache.max_memory_rows == 1
    with pytest.raises(ValueError) as err:
        cache.warm(["a red circle"], batch_size=0)
    assert str(err.value).splitlines()[0] == "TextFeatureCache.warm: batch_size=0 must be at least 1"
    assert cache.warm(["a red circle", "a blue square"], batch_size=1) == 2
    with pytest.raises(ValueError) as err:
        cache([], torch.device("cpu"))
    assert str(err.value).splitlines()[0] == "TextFeatureCache.cache: got an empty list of captions"


def test_warm_counts_misses_and_shards_exactly(encoder, tmp_path):
    cache = TextFeatureCache(encoder, tmp_path, flush_every=2)
    assert cache.warm(["a", "b", "c"], batch_size=2) == 3
    first = cache.stats.shards_written
    assert cache.stats.misses == 3 and cache.stats.hits == 0 and first == len(shards(cache.directory)) >= 1
    cache.warm(["c", "d", "e"], batch_size=2)  # "c" is known: 2 new misses
    cache.save()
    assert cache.stats.misses == 5
    assert cache.stats.shards_written == len(shards(cache.directory)) > first  # counted as written
    assert "captions=5" in repr(cache) and str(cache.directory) in repr(cache)
    assert "memory only" in repr(TextFeatureCache(encoder))
