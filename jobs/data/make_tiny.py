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
  tiny_chat_train.jsonl, tiny_chat_eval.jsonl
                     the same examples as conversations for jobs/tiny-chat.toml:
                     {"messages": [...]} with two exchanges each ("shift c a z b" ->
                     "d b a c"), every third with a system message

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


def conversation(i, a, b):
    """Two exchanges (user asks, assistant answers) from examples a and b."""
    def ask(ex):
        return ex["prompt"].removesuffix(" =")

    messages = [] if i % 3 else [{"role": "system", "content": "You shift letters."}]
    for ex in (a, b):
        messages.append({"role": "user", "content": ask(ex)})
        messages.append({"role": "assistant", "content": ex["completion"].strip()})
    return {"messages": messages}


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
    train, held_out = rows[:N_TRAIN], rows[N_TRAIN:]
    chats = {
        name: [conversation(i, part[2 * i], part[2 * i + 1]) for i in range(len(part) // 2)]
        for name, part in [("tiny_chat_train.jsonl", train), ("tiny_chat_eval.jsonl", held_out)]
    }
    for name, part in [("tiny_train.jsonl", train), ("tiny_eval.jsonl", held_out), *chats.items()]:
        with open(os.path.join(here, name), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
