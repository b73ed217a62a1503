"""Reference points for ``code_word_alignment``'s ``code_word_mse`` on a data set's captions.

The measure compares word–word cosine similarities cos(t_l, t_m) (real, non-special words of
one caption, as the task and L_ras take them) with the similarities of the codes aligned to
those words. How low is low depends on the captions: this prints what trivial code
similarities score —

* ``constant_best``: every code pair at the same similarity, the mean word–word one (the
  variance of the word–word similarities: a code arrangement that carries no word
  structure at all can reach it);
* ``all_same_code``: every word aligned to one code (similarity 1);
* ``orthogonal_codes``: every word its own orthogonal code (similarity 0);

and the spread of the word–word similarities themselves.

    python scripts/code_word_baselines.py --images 256 --split test --size 32
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from lgvq_plugins import api


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="shapes")
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--text-encoder", default="minilm")
    args = ap.parse_args()
    data = api.create_dataset(args.dataset, split=args.split, size=args.size, num_samples=args.images)
    encoder = api.create_text_encoder(args.text_encoder)
    captions = [data[i]["caption"] for i in range(len(data))]
    sims = []
    for start in range(0, len(captions), 64):
        feats = encoder.encode_captions(captions[start: start + 64])
        t = F.normalize(feats.token_feats.double(), dim=-1)
        s = t @ t.transpose(1, 2)
        real = ~feats.tokens.padding_mask & ~feats.tokens.special_mask
        length = real.shape[1]
        pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(length, dtype=torch.bool)
        sims.append(s[pairs])
    s = torch.cat(sims)
    out = {"captions": len(captions), "word_pairs": int(s.numel()), "text_encoder": encoder.identity,
           "word_similarity": {"mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
                               "max": float(s.max())},
           "constant_best": float(((s - s.mean()) ** 2).mean()),
           "all_same_code": float(((1 - s) ** 2).mean()),
           "orthogonal_codes": float((s ** 2).mean())}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
