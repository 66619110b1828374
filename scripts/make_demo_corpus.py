"""Write the demo corpus shipped in ``data/demo/``: short generated fables, dedicated to the public domain (CC0).

The text is made here from a small grammar with a fixed seed, so it has no third-party source or licence and
is the same on every run. A tiny model learns its patterns in a few hundred steps, which is what the
CPU demo (``make demo``) needs: a loss curve that visibly falls and greedy samples that look like the corpus.

    python scripts/make_demo_corpus.py            # rewrites data/demo/train/*.txt and data/demo/val/*.txt
"""

from __future__ import annotations

import argparse
import os
import random

ANIMALS = ["fox", "crow", "hare", "tortoise", "lion", "mouse", "owl", "wolf", "goat", "heron", "ant", "bee",
           "frog", "bear", "sparrow", "cat", "dog", "horse", "deer", "otter"]
PLACES = ["by the river", "in the old forest", "on the green hill", "near the mill", "at the edge of the field",
          "under the oak tree", "beside the well", "in the quiet valley", "on the stony road", "by the lake"]
TIMES = ["One morning", "Long ago", "On a cold evening", "One summer day", "In the spring", "At sunrise",
         "Late one night", "On a rainy afternoon"]
WANTS = ["a piece of cheese", "a warm place to sleep", "some fresh water", "a basket of apples", "a bright stone",
         "the last grain of wheat", "a safe way home", "a friend to talk to", "a bowl of honey", "a dry nest"]
ADJ = ["clever", "proud", "patient", "greedy", "kind", "lazy", "brave", "hungry", "wise", "foolish", "gentle", "quick"]
MORALS = [
    "Slow and steady wins the race.",
    "A kindness is never wasted.",
    "Pride goes before a fall.",
    "Look before you leap.",
    "Those who share will never be alone.",
    "Do not count your eggs before they hatch.",
    "Little friends may prove great friends.",
    "Greed often loses what it has.",
    "Work today and eat tomorrow.",
    "Honest words are worth more than sweet ones.",
]


def fable(rng: random.Random) -> str:
    a, b = rng.sample(ANIMALS, 2)
    adj_a, adj_b = rng.sample(ADJ, 2)
    want = rng.choice(WANTS)
    place = rng.choice(PLACES)
    lines = [
        f"The {adj_a.capitalize()} {a.capitalize()} and the {b.capitalize()}",
        "",
        f"{rng.choice(TIMES)}, a {adj_a} {a} was walking {place}. The {a} wanted {want}.",
        f"There it met a {adj_b} {b}. \"Good day, {b},\" said the {a}. \"Do you know where I can find {want}?\"",
    ]
    if rng.random() < 0.5:
        lines.append(f"\"I do,\" said the {b}, \"but you must help me first.\" So the {a} helped the {b}, "
                     f"and the {b} showed the way.")
        lines.append(f"By evening the {a} had {want}, and the two animals were friends.")
    else:
        lines.append(f"\"Find it yourself,\" said the {b}, and it laughed at the {a}.")
        lines.append(f"The {a} searched alone until dark. At last it found {want}, "
                     f"and the {b} went hungry that night.")
    lines.append(f"Moral: {rng.choice(MORALS)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "demo"))
    parser.add_argument("--train-files", type=int, default=8)
    parser.add_argument("--fables-per-file", type=int, default=45)
    parser.add_argument("--val-fables", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for split, files, per in (("train", args.train_files, args.fables_per_file), ("val", 1, args.val_fables)):
        directory = os.path.join(args.out, split)
        os.makedirs(directory, exist_ok=True)
        for i in range(files):
            path = os.path.join(directory, f"fables-{i:02d}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(fable(rng) for _ in range(per)))
            print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
