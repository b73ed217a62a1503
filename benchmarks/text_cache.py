"""Cost of text features per training batch: running the frozen encoder every step (the
reference implementation) against the feature cache (memory hit, disk hit, first-time miss).

    python benchmarks/text_cache.py [--encoders minilm open_clip] [--batch 8] [--batches 20]

Prints one row per (encoder, path) with milliseconds per batch. The open_clip encoder is
ViT-B/32's text tower with random weights (the timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

import lgvq_plugins
from lgvq_plugins.text.cache import TextFeatureCache

WORDS = ("a red blue green small large circle square triangle left right of above below "
         "the next to two three star disc near far bright dark striped").split()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", default=["minilm", "open_clip"])
    parser.add_argument("--batch", type=int, default=8, help="captions per batch (paper: 8)")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
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
