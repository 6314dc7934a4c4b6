#!/usr/bin/env python3
"""Generates the tiny demo task for jobs/tiny.toml (deterministic, no downloads).

The task: shift every letter of a 4-letter sequence one place along the alphabet
(z wraps to a), e.g. prompt "shift c a z b =" -> completion " d b a c". The rule is
simple, but the answers to held-out sequences cannot be memorised: a model only gets
them right by learning to copy each letter from four places back and shift it.

Writes, next to this script:
  tiny_train.jsonl  3000 {"prompt", "completion"} examples
  tiny_eval.jsonl    200 examples whose letter sequences never occur in training
                     (the eval set, and the held-out prompts `generate` is tested on)

Run: python3 jobs/data/make_tiny.py   (the files are committed; rerunning reproduces them)
"""
import json
import os
import random

LETTERS = "abcdefghijklmnopqrstuvwxyz"
N_TRAIN, N_EVAL, LENGTH, SEED = 3000, 200, 4, 20261128


def example(seq):
    shifted = [LETTERS[(LETTERS.index(c) + 1) % 26] for c in seq]
    return {"prompt": "shift " + " ".join(seq) + " =", "completion": " " + " ".join(shifted)}


def main():
    rng = random.Random(SEED)
    seen = set()
    rows = []
    while len(rows) < N_TRAIN + N_EVAL:
        seq = tuple(rng.choice(LETTERS) for _ in range(LENGTH))
        if seq in seen:
            continue
        seen.add(seq)
        rows.append(example(seq))
    here = os.path.dirname(os.path.abspath(__file__))
    for name, part in [("tiny_train.jsonl", rows[:N_TRAIN]), ("tiny_eval.jsonl", rows[N_TRAIN:])]:
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
