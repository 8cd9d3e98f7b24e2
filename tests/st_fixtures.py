"""A tiny offline SentenceTransformer and (anchor, positive) pairs for the sentence-transformers tests.

Deterministic in every process: the tokenizer's vocabulary is fixed and the BERT is initialised from a
fixed seed, so spawned ranks and the test process hold identical models.
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


def fixed_tokenizer():
    """A BERT-style WordPiece tokenizer over a fixed vocabulary (the special tokens, every word, every letter).

    Not trained: WordPiece training breaks ties between equally frequent merges in hash-map order, which
    differs between processes, so ranks would tokenize the same text differently.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from examples.efficiency.towers import SPECIAL

    letters = sorted(set("".join(WORDS)))
    vocab = {t: i for i, t in enumerate([*SPECIAL, *sorted(set(WORDS)), *letters, *("##" + c for c in letters)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_model(directory: str, seed: int = 0):
    """A 2-layer, width-32 BERT SentenceTransformer over :func:`fixed_tokenizer`, max length 16."""
    from examples.efficiency.towers import build_sentence_transformer

    return build_sentence_transformer(fixed_tokenizer(), directory, layers=2, hidden=32, heads=2, max_length=16,
                                      seed=seed)
