"""Small query and document towers for code search, and the held-out retrieval metrics.

Both towers read token ids (0 = padding) as a bag of words: a token embedding table, shared by the
two towers so that a docstring word and the identifier part it names start out close, a mean over
the bag, then a per-tower linear map and L2 normalisation. Scores are ``scale * cos(q, d)``.
Cheap on a CPU, and enough for the comparison of losses, which is what this example is about.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


class DualEncoder(nn.Module):
    """Query tower and document tower over a shared token embedding."""

    def __init__(self, vocab_size: int, dim: int = 128) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
        self.query_head = nn.Linear(dim, dim)
        self.doc_head = nn.Linear(dim, dim)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        with torch.no_grad():  # the heads start as the identity: the initial model is a lexical matcher
            for head in (self.query_head, self.doc_head):
                head.weight.copy_(torch.eye(dim))
                head.bias.zero_()

    def encode_queries(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.query_head(self.embedding(tokens)), dim=-1)

    def encode_docs(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.doc_head(self.embedding(tokens)), dim=-1)

    def forward(self, query_tokens: torch.Tensor, doc_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_queries(query_tokens), self.encode_docs(doc_tokens)


@torch.no_grad()
def retrieval_metrics(
    model: DualEncoder, query_tokens: torch.Tensor, doc_tokens: torch.Tensor, batch: int = 256, progress: bool = False
) -> dict[str, float]:
    """MRR@10 and Recall@{1,10,100} of query i retrieving document i among *all* documents (exact).

    The rank of the right document is 1 + the number of documents scored strictly higher.
    """
    was_training = model.training
    model.eval()
    docs = torch.cat([model.encode_docs(doc_tokens[i : i + batch]) for i in range(0, len(doc_tokens), batch)])
    ranks = []
    starts = range(0, len(query_tokens), batch)
    for i in tqdm(starts, desc="eval", unit="batch", leave=False) if progress else starts:
        q = model.encode_queries(query_tokens[i : i + batch])
        scores = q @ docs.t()
        right = scores[torch.arange(len(q)), torch.arange(i, i + len(q))]
        ranks.append(1 + (scores > right.unsqueeze(1)).sum(1))
    model.train(was_training)
    rank = torch.cat(ranks).double()
    return {
        "mrr@10": torch.where(rank <= 10, 1.0 / rank, 0.0).mean().item(),
        "recall@1": (rank <= 1).double().mean().item(),
        "recall@10": (rank <= 10).double().mean().item(),
        "recall@100": (rank <= 100).double().mean().item(),
    }
