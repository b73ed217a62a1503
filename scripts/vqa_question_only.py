"""A question-only reference for ``vqa`` on ``shapes``: answer every question with the most
frequent training answer of its question type (its first two words: "what size", "how
many", "is there", ...), never looking at the image. The ``vqa`` task's readers should be
read against it.

    python scripts/vqa_question_only.py --train 1000 --images 64
"""

from __future__ import annotations

import argparse
import collections
import json

from lgvq_plugins import api


def question_type(question: str) -> str:
    return " ".join(question.lower().split()[:2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=1000, help="training images (the task's train_images)")
    ap.add_argument("--images", type=int, default=64, help="first test images (the task's max_images)")
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    train = api.create_dataset("shapes", split="train", size=args.size, num_samples=args.train)
    test = api.create_dataset("shapes", split="test", size=args.size, num_samples=args.images)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in range(len(train)):
        sample = train[i]
        counts[question_type(sample["question"])][sample["answer"]] += 1
    overall = sum(counts.values(), collections.Counter()).most_common(1)[0][0]
    right = 0
    for i in range(len(test)):
        sample = test[i]
        kind = counts.get(question_type(sample["question"]))
        guess = kind.most_common(1)[0][0] if kind else overall
        right += guess == sample["answer"]
    print(json.dumps({"train_images": len(train), "test_questions": len(test), "question_types": len(counts),
                      "accuracy": right / len(test)}, indent=2))


if __name__ == "__main__":
    main()
