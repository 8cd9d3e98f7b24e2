"""A tiny offline SentenceTransformer and (anchor, positive) pairs for the sentence-transformers tests.

Deterministic in every process: the tokenizer is trained on fixed texts and the BERT is initialised
from a fixed seed, so spawned ranks and the test process hold identical models.
"""
from __future__ import annotations

import random

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega read write open close parse load save sort merge split join").split()


def pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` anchors (5 random words) and positives (the same words reversed plus a tag word)."""
    rng = random.Random(seed)
    anchors = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(n)]
    positives = [" ".join(reversed(a.split())) + " " + WORDS[i % len(WORDS)] for i, a in enumerate(anchors)]
    return anchors, positives


def tiny_model(directory: str, seed: int = 0):
    """A 2-layer, width-32 BERT SentenceTransformer with a 200-token WordPiece vocabulary, max length 16."""
    from examples.efficiency.towers import build_sentence_transformer, train_tokenizer

    a, p = pairs(200, seed=123)
    tokenizer = train_tokenizer(a + p, vocab_size=200)
    return build_sentence_transformer(tokenizer, directory, layers=2, hidden=32, heads=2, max_length=16, seed=seed)
