"""Run under torchrun: SentenceTransformerTrainer (its own DDP) with the negative-cache loss and callback.

argv: out_dir max_steps [resume_step or -] [corpus]. ``corpus``: (anchor, positive, negative) triplets, the cache
prefilled with every positive and negative, an evaluation every 2 steps. Rank 0 writes ``result-<world>.json``
(log history, losses) and, whenever the cache is saved or loaded, ``rows-<event>-<step>-w<world>.pt`` (the
whole cache, gathered).
"""
from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sharded_negcache.integrations.sentence_transformers import CachedNegativesRankingLoss, NegativeCacheCallback  # noqa: E402
from st_fixtures import pairs, tiny_model  # noqa: E402


class DumpRows(TrainerCallback):
    """Gathers the whole cache after our callback saved or loaded it (runs after it in the list)."""

    def __init__(self, loss, out, world):
        self.loss, self.out, self.world = loss, out, world

    def _dump(self, event, step):
        rows = self.loss.handler.gather_global_rows()
        if int(os.environ.get("RANK", 0)) == 0:
            torch.save(rows, os.path.join(self.out, f"rows-{event}-{step}-w{self.world}.pt"))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step:
            self._dump("loaded", state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self._dump("saved", state.global_step)


def main() -> None:
    out, max_steps = sys.argv[1], int(sys.argv[2])
    resume = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    corpus = len(sys.argv) > 4 and sys.argv[4] == "corpus"
    evaluation = dict(eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8) if corpus else {}
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=8, max_steps=max_steps, logging_steps=2,
        save_steps=2, report_to=[], use_cpu=True, learning_rate=1e-3, seed=0, disable_tqdm=True,
        dataloader_drop_last=True, ddp_backend="gloo", **evaluation,
    )
    world = dist.get_world_size() if dist.is_initialized() else 1
    model = tiny_model(os.path.join(out, f"model-{os.environ.get('RANK', 0)}-w{world}"))
    anchors, positives = pairs(96, seed=4)
    columns = {"anchor": anchors, "positive": positives}
    if corpus:
        columns["negative"] = pairs(96, seed=104)[1]
    # default block size: 16 at W=2, 32 at W=1 (stream); 128 and 256 (corpus)
    loss = CachedNegativesRankingLoss(model, cache_size=256 if corpus else 32, num_negatives=2,
                                      corpus=positives + columns["negative"] if corpus else None)
    held_out = pairs(16, seed=11)
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss,
        eval_dataset=Dataset.from_dict({"anchor": held_out[0], "positive": held_out[1],
                                        "negative": pairs(16, seed=12)[1]}) if corpus else None,
    )
    NegativeCacheCallback.attach(trainer)
    trainer.add_callback(DumpRows(loss, out, world))
    trainer.train(resume_from_checkpoint=os.path.join(out, "trainer", f"checkpoint-{resume}") if resume else None)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    checksum = float(params.double().sum())
    sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    if dist.is_initialized():
        dist.all_gather(sums, torch.tensor([checksum], dtype=torch.float64))
    if int(os.environ.get("RANK", 0)) == 0:
        result = {"world": world, "log_history": trainer.state.log_history, "steps_done": loss.handler.steps_done,
                  "block_size": loss.handler.layout.block_size, "distinct": len(set(loss.corpus or [])),
                  "param_checksums": [float(s) for s in sums] if dist.is_initialized() else [checksum]}
        with open(os.path.join(out, f"result-w{world}.json"), "w") as f:
            json.dump(result, f)
    if dist.is_initialized():
        # as examples/code_search/train.py: with torch 2.13 and gloo, a DDP reducer collected after (or while)
        # the group is torn down at interpreter exit can abort the process ("terminate called without an
        # active exception"); release the trainer first, then destroy the group after a barrier
        del trainer, model, loss
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
