"""Cost of text features per training batch: running the frozen encoder every step (the
reference implementation) against the feature cache (memory hit, disk hit, first-time miss);
and, with ``--memory``, that the cache's memory stays under its bound over a large data set.

    python benchmarks/text_cache.py [--encoders minilm open_clip] [--batch 8] [--batches 20]
    python benchmarks/text_cache.py --memory [--captions 300000] [--bound-mb 1024]

The timing mode prints one row per (encoder, path) with milliseconds per batch. The open_clip
encoder is ViT-B/32's text tower with random weights (the timing does not depend on them).

The memory mode runs two epochs over ``--captions`` distinct captions (CelebA-HQ has ≈ 300k)
in training-sized batches through a disk-backed cache: the first encodes and writes every
caption, the second (reshuffled) reads them back from the shards. The encoder is a cheap
stand-in of MiniLM's shape (30 tokens × 384 floats per caption, ≈ 46 KB), so the pass takes
minutes, not hours; the cache does not look inside the features. It prints the process's
peak resident memory (``ru_maxrss``) above the baseline after start-up, the cache's own peak
row bytes, and the bound; without a bound the rows alone would take captions × 46 KB.
Needs ≈ captions × 46 KB of free disk in the temporary folder (≈ 14 GB for 300k).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time

import torch

import lgvq_plugins
from lgvq_plugins.text.cache import TextFeatureCache

WORDS = ["a", "red", "blue", "green", "small", "large", "circle", "square", "triangle", "left", "right", "of", "above", "below", "the", "next", "to", "two", "three", "star", "disc", "near", "far", "bright", "dark", "striped"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def time_batches(fn, batches: list[list[str]]) -> float:
    """Median milliseconds per batch."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(name: str, batch: int, n_batches: int) -> list[tuple[str, str, float]]:
    kwargs = {"model_name": "ViT-B-32"} if name == "open_clip" else {}
    encoder = lgvq_plugins.create_text_encoder(name, **kwargs)
    data = captions(batch * n_batches)
    batches = [data[i:i + batch] for i in range(0, len(data), batch)]
    rows = []
    direct = time_batches(lambda b: encoder.encode(encoder.tokenize(b)), batches)
    rows.append((name, "encoder every step (reference)", direct))
    with tempfile.TemporaryDirectory() as tmp:
        cache = TextFeatureCache(encoder, tmp)
        rows.append((name, "cache miss (encode + store)", time_batches(cache, batches)))
        rows.append((name, "cache hit, memory", time_batches(cache, batches)))
        cache.save()
        reopened = TextFeatureCache(encoder, tmp)
        rows.append((name, "cache hit, disk (first read)", time_batches(reopened, batches)))
        start = time.perf_counter()
        TextFeatureCache(encoder, tempfile.mkdtemp(dir=tmp)).warm(data, batch_size=256)
        rows.append((name, f"warm() {len(data)} captions, per caption", (time.perf_counter() - start) * 1e3 / len(data)))
    return rows


class MiniLMShapedEncoder:
    """Features of all-MiniLM-L6-v2's shape (L=30, 384-d tokens and pooled feature) at the
    cost of a random draw: for measuring the cache, not the encoder."""

    identity, max_length, width, global_width = "bench/minilm-shaped", 30, 384, 384
    special_token_ids = frozenset({101, 102})

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def tokenize(self, captions: list[str]):
        from lgvq_plugins.interfaces import TextTokens

        n = len(captions)
        lengths = torch.randint(8, 25, (n,), generator=self.generator)
        ids = torch.randint(1000, 30000, (n, self.max_length), generator=self.generator)
        ids[torch.arange(self.max_length)[None] >= lengths[:, None]] = 0
        special = torch.zeros(n, self.max_length, dtype=torch.bool)
        special[:, 0] = True
        special[torch.arange(n), lengths - 1] = True
        return TextTokens(ids, lengths, special)

    def encode(self, tokens):
        from lgvq_plugins.interfaces import TextFeatures

        n = tokens.ids.shape[0]
        feats = torch.randn(n, self.max_length, self.width, generator=self.generator)
        return TextFeatures(feats, feats[:, 0].clone(), tokens)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_pass(n_captions: int, bound_mb: float | None, batch: int, epochs: int = 2) -> None:
    """Train-like passes over ``n_captions`` distinct captions; prints the memory figures."""
    encoder = MiniLMShapedEncoder()
    data = [f"caption {i:07d}" for i in range(n_captions)]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = TextFeatureCache(encoder, tmp, max_memory_mb=bound_mb)
        cache(data[:batch])  # allocator and first shard path warmed up before the baseline
        baseline = _rss_mb()
        start = time.perf_counter()
        for epoch in range(epochs):
            order = data[:]
            rng.shuffle(order)
            t0 = time.perf_counter()
            for i in range(0, len(order), batch):
                cache(order[i:i + batch])
            stats = cache.stats
            print(f"epoch {epoch}: {time.perf_counter() - t0:.0f} s, rows in memory {stats.memory_rows}, "
                  f"{stats.memory_bytes / 2**20:.0f} MiB; encoded {stats.captions_encoded}, "
                  f"read from disk {stats.disk_hits}, shards {stats.shards_written}, rss now {_rss_mb():.0f} MiB")
        cache.save()
        stats = cache.stats
        row_kb = stats.memory_bytes / max(stats.memory_rows, 1) / 1024
        print(f"captions {n_captions}, batch {batch}, {epochs} epochs in {time.perf_counter() - start:.0f} s")
        print(f"| bound (max_memory_mb) | {bound_mb} MiB |")
        print(f"| cache rows, peak | {stats.peak_memory_bytes / 2**20:.0f} MiB |")
        print(f"| process RSS: baseline after start-up | {baseline:.0f} MiB |")
        print(f"| process RSS: peak (ru_maxrss) | {_peak_rss_mb():.0f} MiB |")
        print(f"| process RSS: peak above baseline | {_peak_rss_mb() - baseline:.0f} MiB |")
        print(f"| unbounded rows would take | {n_captions * row_kb / 1024:.0f} MiB ({row_kb:.1f} KiB per caption) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["minilm", "open_clip"])
    parser.add_argument("--batch", type=int, default=8, help="captions per batch (paper: 8)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--memory", action="store_true", help="run the memory-bound pass instead")
    parser.add_argument("--captions", type=int, default=300_000, help="distinct captions (--memory)")
    parser.add_argument("--bound-mb", type=float, default=1024.0, help="TextFeatureCache.max_memory_mb (--memory)")
    parser.add_argument("--memory-batch", type=int, default=64, help="captions per call (--memory)")
    args = parser.parse_args()
    if args.memory:
        torch.set_num_threads(1)  # copies only; extra threads just contend on a busy machine
        memory_pass(args.captions, args.bound_mb, args.memory_batch)
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.batches} batches, max_length 30")
    print("| encoder | path | ms |")
    print("|---|---|---:|")
    for name in args.encoders:
        for enc, path, ms in bench(name, args.batch, args.batches):
            print(f"| {enc} | {path} | {ms:.2f} |")


if __name__ == "__main__":
    main()
