"""Small transformer towers built offline: a WordPiece tokenizer trained on the fly and a BERT from a config.

Nothing is downloaded: the tokenizer is trained with ``tokenizers`` on the given texts, the model is a
randomly initialised ``BertModel``; both are saved to a local directory and wrapped in a
``SentenceTransformer`` (``Transformer`` + mean ``Pooling``), which is how users' models look.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

__all__ = ["train_tokenizer", "build_sentence_transformer"]

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A BERT-style WordPiece tokenizer (``PreTrainedTokenizerFast``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_sentence_transformer(
    tokenizer, directory: str, *, layers: int = 2, hidden: int = 32, heads: int = 2, max_length: int = 32,
    seed: int = 0,
):
    """A SentenceTransformer over a fresh ``BertModel`` (``layers`` x ``hidden``), mean pooling.

    The model and tokenizer are saved under ``directory`` and loaded back by sentence-transformers'
    ``Transformer`` module (a local path: no hub access).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=max(64, max_length), type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    bert = BertModel(config, add_pooling_layer=False)
    os.makedirs(directory, exist_ok=True)
    # Written by hand: under torch.distributed, save_pretrained writes on the main process only, and
    # every rank needs its own copy here.
    from safetensors.torch import save_file

    config.to_json_file(os.path.join(directory, "config.json"))
    save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, os.path.join(directory, "model.safetensors"))
    tokenizer.save_pretrained(directory)
    transformer = Transformer(directory, processor_kwargs={"model_max_length": max_length})
    transformer.max_seq_length = max_length
    pooling = Pooling(hidden, pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")
