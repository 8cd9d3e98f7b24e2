"""Quickstart: the negative-cache loss in the smallest complete training loop (one process, CPU).

    python examples/quickstart.py [steps]

A toy retrieval task: 10,000 documents with 32 random features; a document's query is its features
through a fixed random map, plus noise. A query tower and a document tower (linear, normalised)
learn to match them. The cache keeps 4,096 documents (their features, to re-encode them, and their
stale embeddings); each step scores the queries against all of it and re-encodes 4 sampled
negatives per query. Without ``torch.distributed`` initialised, one process holds the whole cache.
"""
import sys

import torch
import torch.nn.functional as F

from sharded_negcache import FieldSpec, ShardedCacheLossHandler

torch.manual_seed(0)
NUM_DOCS, FEAT, DIM, BATCH = 10_000, 32, 16, 64
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
docs = torch.randn(NUM_DOCS, FEAT)
queries = docs @ torch.randn(FEAT, FEAT) / FEAT**0.5 + 1.0 * torch.randn(NUM_DOCS, FEAT)

query_tower, doc_tower = torch.nn.Linear(FEAT, DIM), torch.nn.Linear(FEAT, DIM)


def encode_docs(data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The document network: the handler also calls it to re-encode the sampled cache rows."""
    return F.normalize(doc_tower(data["features"]), dim=-1)


handler = ShardedCacheLossHandler(
    specs={
        "features": FieldSpec((FEAT,), torch.float32),  # what the document tower reads
        "doc_id": FieldSpec((1,), torch.int64),  # so a query never samples its own document
        "embedding": FieldSpec((DIM,), torch.float32),  # the cached (stale) embedding
    },
    cache_size=4096, embedding_key="embedding", data_keys=("features",), doc_id_key="doc_id",
    score_transform=10.0, num_negatives=4,  # score = 10 * cosine
)
optimizer = torch.optim.Adam([*query_tower.parameters(), *doc_tower.parameters()], lr=1e-2)

for step in range(1, steps + 1):
    idx = torch.randint(0, NUM_DOCS, (BATCH,))
    data = {"features": docs[idx], "doc_id": idx[:, None]}
    q = F.normalize(query_tower(queries[idx]), dim=-1)
    loss = handler.update_cache_and_compute_loss(encode_docs, q, encode_docs(data), data)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 20 == 0 or step == steps:
        m = handler.last_step.metrics  # global means: cross-entropy over positive + cache, staleness
        print(f"step {step:4d}  training loss {loss.item():+.4f}  cross-entropy {m['interpretable_loss']:.4f}"
              f"  staleness {m['staleness']:.4f}  cache filled {m['fill_fraction']:.0%}")

with torch.no_grad():  # exact retrieval of the first 1,000 queries among all 10,000 documents
    scores = F.normalize(query_tower(queries[:1000]), dim=-1) @ encode_docs({"features": docs}).t()
    print(f"recall@1 {(scores.argmax(1) == torch.arange(1000)).float().mean():.3f}")
