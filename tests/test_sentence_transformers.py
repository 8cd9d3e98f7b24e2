"""The sentence-transformers loss on one process: equal to MNRL and to the engine called by hand, eval, trainer, fit.

Everything is offline: a 2-layer BERT from a config and a WordPiece tokenizer trained on the fly.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")

from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments  # noqa: E402
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss  # noqa: E402
from sentence_transformers.util import pairwise_cos_sim  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sharded_negcache import FieldSpec, JaggedFieldSpec, ShardedCacheLossHandler  # noqa: E402
from sharded_negcache.integrations.sentence_transformers import (  # noqa: E402
    CachedNegativesRankingLoss,
    NegativeCacheCallback,
    token_hash,
)
from st_fixtures import pairs, tiny_model  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(str(tmp_path_factory.mktemp("st") / "model"))


def features(model, texts):
    """What the trainer's collator hands the loss: the model's preprocessing of one text column."""
    return dict(model.preprocess(texts))


def grads(module):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in module.parameters()])


def test_empty_cache_with_in_batch_negatives_equals_mnrl(model):
    """With nothing cached, cache + in-batch is MNRL's in-batch softmax: same value, same gradients."""
    m = copy.deepcopy(model)
    anchors, positives = pairs(8, seed=1)
    ours = CachedNegativesRankingLoss(m, scale=20.0, cache_size=16, in_batch_negatives=True)
    value = ours([features(m, anchors), features(m, positives)], None)
    value.backward()
    g_ours = grads(m)
    m.zero_grad()
    reference = MultipleNegativesRankingLoss(m, scale=20.0)([features(m, anchors), features(m, positives)], None)
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, grads(m), rtol=1e-4, atol=1e-6)
    assert ours.handler.last_step.metrics["sampled"] == 0 and ours.handler.steps_done == 1


def _reference_handler(dim: int, max_length: int, cache_size: int, num_negatives: int) -> ShardedCacheLossHandler:
    """The engine used by hand: token ids as a list-format jagged field, the pair index as document id."""
    specs = {
        "emb": FieldSpec((dim,), torch.float32),
        "tokens": JaggedFieldSpec(max_length, torch.int64, format="list"),
        "pair": FieldSpec((1,), torch.int64),
    }
    return ShardedCacheLossHandler(specs, cache_size, "emb", ["tokens"], score_transform=20.0,
                                   num_negatives=num_negatives, seed=7, doc_id_key="pair")


def test_equals_engine_called_by_hand_over_steps(model):
    """Loss values, gradients and sampled rows equal a hand-written use of ShardedCacheLossHandler.

    Positives repeat across steps (the cache holds earlier copies of a query's positive); the adapter's
    token hash must exclude them exactly as the true pair index does in the reference.
    """
    ours_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = CachedNegativesRankingLoss(ours_model, scale=20.0, cache_size=32, num_negatives=3, seed=7,
                                      in_batch_negatives=False)
    ref = _reference_handler(32, 16, 32, 3)
    opt_ours = torch.optim.SGD(ours_model.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    anchors, positives = pairs(16, seed=2)

    def encode(texts_or_tokens, as_tokens=False):
        if as_tokens:  # rebuild right-padded inputs from the cached token ids
            width = max(len(t) for t in texts_or_tokens)
            ids = torch.stack([F.pad(t, (0, width - len(t))) for t in texts_or_tokens])
            mask = torch.stack([F.pad(torch.ones_like(t), (0, width - len(t))) for t in texts_or_tokens])
            feats = {"input_ids": ids, "attention_mask": mask, "modality": "text"}
        else:
            feats = features(ref_model, texts_or_tokens)
        return F.normalize(ref_model(feats)["sentence_embedding"], dim=-1)

    excluded_hits = 0
    for step, idx in enumerate([range(0, 8), range(8, 16), range(4, 12), range(0, 8), range(2, 10)]):
        a, p = [anchors[i] for i in idx], [positives[i] for i in idx]
        cached_ids = ours.handler.gather_global_rows()["doc_id"][:, 0] if ours.handler is not None else None
        value = ours([features(ours_model, a), features(ours_model, p)], None)
        value.backward()

        pf = features(ref_model, p)
        tokens = [row[mask.bool()] for row, mask in zip(pf["input_ids"], pf["attention_mask"])]
        ref_loss = ref.update_cache_and_compute_loss(
            lambda rows: encode(rows["tokens"], as_tokens=True), encode(a), encode(p),
            {"tokens": tokens, "pair": torch.tensor(list(idx))[:, None]},
        )
        ref_loss.backward()
        mine, theirs = ours.handler.last_step, ref.last_step
        assert torch.equal(mine.sampled_rows, theirs.sampled_rows), f"step {step}"
        assert value.item() == pytest.approx(theirs.interpretable_loss.mean().item(), rel=1e-5)
        torch.testing.assert_close(grads(ours_model), grads(ref_model), rtol=1e-4, atol=1e-6)
        if cached_ids is not None:  # no query sampled a row holding its own positive's tokens
            own = token_hash(pf["input_ids"], pf["attention_mask"])
            drawn = mine.sampled_rows
            hit = cached_ids[drawn.clamp(min=0)] == own[:, None]
            assert not bool((hit & (drawn >= 0)).any())
            excluded_hits += int((cached_ids[None, :] == own[:, None]).any(1).sum())
        opt_ours.step(), opt_ref.step(), opt_ours.zero_grad(), opt_ref.zero_grad()
    assert excluded_hits > 0, "the data never put a query's own positive in the cache: the exclusion went untested"
    assert ours.handler.last_step.metrics["staleness"] > 0


def test_token_hash_ignores_padding_and_separates_texts():
    ids = torch.tensor([[2, 5, 6, 3, 0], [2, 5, 6, 3, 9], [2, 6, 5, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
    h = token_hash(ids, mask)
    assert h[0] == h[1] and h[0] != h[2] and bool((h >= 0).all())


def test_left_padded_token_ids_are_cached_real_tokens_first(model):
    """A left-padded batch caches each positive's real tokens first, exactly as its right-padded tokenization,
    and hashes to the same document ids (the positive's copy is excluded whatever the padding)."""
    m = copy.deepcopy(model)
    texts = ["alpha beta", "gamma delta epsilon zeta eta", "theta"]
    m.tokenizer.padding_side = "left"
    left = features(m, texts)
    m.tokenizer.padding_side = "right"
    right = features(m, texts)
    assert not bool(left["attention_mask"][:, 0].all()), "the batch must really be left-padded"
    loss = CachedNegativesRankingLoss(m, cache_size=8, in_batch_negatives=True)
    loss([features(m, ["read", "write open", "close parse load"]), left], None)
    cached = loss.handler.store.export_rows()  # an empty cache: item i went into row i
    lengths = right["attention_mask"].sum(1)
    assert cached["input_ids:lengths"][:3].tolist() == lengths.tolist()
    for i, n in enumerate(lengths.tolist()):
        assert cached["input_ids"][i, :n].tolist() == right["input_ids"][i, :n].tolist()
    assert torch.equal(token_hash(left["input_ids"], left["attention_mask"]),
                       token_hash(right["input_ids"], right["attention_mask"]))


def test_evaluation_leaves_the_cache_alone(model):
    m = copy.deepcopy(model)
    anchors, positives = pairs(6, seed=3)
    ours = CachedNegativesRankingLoss(m, cache_size=16)
    ours([features(m, anchors), features(m, positives)], None)
    before = {k: v.clone() for k, v in ours.handler.gather_global_rows().items()}
    m.eval()
    with torch.no_grad():
        value = ours([features(m, anchors), features(m, positives)], None)
        a = m.encode(anchors, convert_to_tensor=True)
        p = m.encode(positives, convert_to_tensor=True)
    sims = 20.0 * pairwise_cos_sim(a[:, None, :].expand(-1, 6, -1).reshape(36, -1), p.repeat(6, 1)).reshape(6, 6)
    expected = -torch.log_softmax(sims, dim=1).diagonal().mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-4)
    assert ours.handler.steps_done == 1
    after = ours.handler.gather_global_rows()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_what_it_cannot_do(model):
    from sentence_transformers.util import manhattan_sim

    with pytest.raises(ValueError, match="similarity_fct"):
        CachedNegativesRankingLoss(model, similarity_fct=manhattan_sim)
    with pytest.raises(ValueError, match="scale"):
        CachedNegativesRankingLoss(model, scale=0.0)
    ours = CachedNegativesRankingLoss(copy.deepcopy(model), cache_size=8)
    a, p = pairs(2)
    with pytest.raises(ValueError, match=r"\(anchor, positive, negative_1, ...\) text columns, got 1"):
        ours([features(model, a)], None)
    odd = features(model, p)
    odd["pixel_values"] = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"tensor inputs \['pixel_values'\] that cannot be rebuilt"):
        ours([features(model, a), odd], None)
    assert ours.handler is None  # nothing was built or written


def _trainer(model, out_dir, loss, *, max_steps, save_steps=2, data_seed=4, attach=True, eval_steps=None,
             negatives=False, **kw):
    from datasets import Dataset

    anchors, positives = pairs(64, seed=data_seed)
    columns = {"anchor": anchors, "positive": positives}
    if negatives:
        columns["negative"] = pairs(64, seed=data_seed + 100)[1]
    evaluation = {} if eval_steps is None else dict(eval_strategy="steps", eval_steps=eval_steps,
                                                    per_device_eval_batch_size=8)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=8, max_steps=max_steps, logging_steps=2,
        save_steps=save_steps, report_to=[], use_cpu=True, learning_rate=1e-3, seed=0, disable_tqdm=True,
        dataloader_drop_last=True, **evaluation,
    )
    held_out = dict(zip(("anchor", "positive"), pairs(16, seed=11)))
    if negatives:
        held_out["negative"] = pairs(16, seed=12)[1]
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(columns), loss=loss,
        eval_dataset=Dataset.from_dict(held_out), **kw,
    )
    if attach:
        NegativeCacheCallback.attach(trainer)
    return trainer


def test_trainer_logs_checkpoints_and_resumes_exactly(model, tmp_path):
    """Cache metrics in the logs; checkpoint-N/negcache written; a resumed run ends with the same cache."""
    m = copy.deepcopy(model)
    loss = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2)
    trainer = _trainer(m, tmp_path, loss, max_steps=4)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    # batches of 8 into 32 rows: fill 8, 16 | 24, 32 rows after steps 1-4; logged as the mean per window.
    assert logs[0]["negcache/fill_fraction"] == pytest.approx((8 + 16) / 2 / 32)
    assert logs[1]["negcache/fill_fraction"] == pytest.approx((24 + 32) / 2 / 32)
    assert logs[0]["negcache/sampled"] == pytest.approx((0 + 16) / 2)  # nothing cached at step 1
    assert {"negcache/interpretable_loss", "negcache/staleness", "negcache/sampled_age"} <= set(logs[1])
    assert (tmp_path / "checkpoint-2" / "negcache" / ".metadata").exists()
    final = loss.handler.gather_global_rows()

    m2 = copy.deepcopy(model)
    loss2 = CachedNegativesRankingLoss(m2, cache_size=32, num_negatives=2)
    resumed = _trainer(m2, tmp_path, loss2, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    cb = next(c for c in resumed.callback_handler.callbacks if isinstance(c, NegativeCacheCallback))
    assert cb.loaded_from == str(tmp_path / "checkpoint-2" / "negcache")
    again = loss2.handler.gather_global_rows()
    assert loss2.handler.steps_done == 4
    assert set(final) == {"embedding", "age", "filled", "input_ids", "input_ids:lengths", "doc_id"}
    for key in ("input_ids", "input_ids:lengths", "doc_id", "age", "filled"):
        assert torch.equal(final[key], again[key]), key
    torch.testing.assert_close(final["embedding"], again["embedding"], rtol=1e-4, atol=1e-5)


def test_resume_without_a_cache_is_refused(model, tmp_path):
    m = copy.deepcopy(model)
    loss = CachedNegativesRankingLoss(m, cache_size=32)
    trainer = _trainer(m, tmp_path, loss, max_steps=2)
    trainer.train()
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-2" / "negcache")
    m2 = copy.deepcopy(model)
    resumed = _trainer(m2, tmp_path, CachedNegativesRankingLoss(m2, cache_size=32), max_steps=4)
    with pytest.raises(FileNotFoundError, match="holds no negative cache"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_model_fit(model):
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    m = copy.deepcopy(model)
    anchors, positives = pairs(24, seed=5)
    data = DataLoader([InputExample(texts=[a, p]) for a, p in zip(anchors, positives)], batch_size=8, shuffle=False)
    loss = CachedNegativesRankingLoss(m, cache_size=16)
    before = grads_free_copy(m)
    with pytest.warns(UserWarning, match="one is attached now"):  # model.fit builds a trainer without the callback
        m.fit(train_objectives=[(data, loss)], epochs=1, warmup_steps=0, show_progress_bar=False,
              optimizer_params={"lr": 1e-3})
    assert isinstance(loss.callback, NegativeCacheCallback)
    assert loss.handler.steps_done == 3 and loss.handler.last_step.metrics["fill_fraction"] == 1.0
    assert not torch.equal(before, grads_free_copy(m))


def grads_free_copy(module):
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def _rows_equal(a, b):
    """Two whole-cache gathers hold the same filled rows (embeddings to float tolerance, the rest exactly);
    what an empty row holds is unspecified."""
    assert set(a) == set(b) and torch.equal(a["filled"], b["filled"])
    filled = a["filled"].bool()
    for key in a:
        if key == "embedding":
            torch.testing.assert_close(a[key][filled], b[key][filled], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a[key][filled], b[key][filled]), key


def test_resume_loads_the_checkpoint_given_to_train_not_output_dirs(model, tmp_path):
    """resume_from_checkpoint=<elsewhere> loads that run's cache, not a stale checkpoint-2 of another run in
    output_dir; resume_from_checkpoint=True takes the trainer's own choice (output_dir's last)."""
    runs = {}
    for name, data_seed in (("elsewhere", 4), ("stale", 9)):
        m = copy.deepcopy(model)
        loss = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2)
        _trainer(m, tmp_path / name, loss, max_steps=2, data_seed=data_seed).train()
        runs[name] = loss.handler.gather_global_rows()
    assert not torch.equal(runs["elsewhere"]["doc_id"], runs["stale"]["doc_id"])  # the two caches differ
    for given, expected in ((True, "stale"), (str(tmp_path / "elsewhere" / "checkpoint-2"), "elsewhere")):
        m = copy.deepcopy(model)
        loss = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2)
        trainer = _trainer(m, tmp_path / "stale", loss, max_steps=3)  # output_dir holds the stale checkpoint-2
        trainer.add_callback(loaded := RowsAtTrainBegin(loss))  # runs after NegativeCacheCallback's load
        trainer.train(resume_from_checkpoint=given)
        assert loss.callback.loaded_from == str(tmp_path / expected / "checkpoint-2" / "negcache")
        _rows_equal(loaded.rows, runs[expected])


class RowsAtTrainBegin(TrainerCallback):
    """The whole cache as it is when training begins (after the negative-cache callback loaded it)."""

    def __init__(self, loss):
        self.loss, self.rows = loss, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows = {k: v.clone() for k, v in self.loss.handler.gather_global_rows().items()}  # (views on 1 rank)


def test_forgotten_callback_is_attached_with_a_warning_and_a_resume_without_it_fails(model, tmp_path):
    m = copy.deepcopy(model)
    loss = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2)
    trainer = _trainer(m, tmp_path, loss, max_steps=2, attach=False)
    with pytest.warns(UserWarning, match="had no NegativeCacheCallback; one is attached now"):
        trainer.train()
    assert (tmp_path / "checkpoint-2" / "negcache" / ".metadata").exists()  # the attached callback saved the cache
    assert "negcache/fill_fraction" in [h for h in trainer.state.log_history if "loss" in h][-1]

    m2 = copy.deepcopy(model)
    loss2 = CachedNegativesRankingLoss(m2, cache_size=32, num_negatives=2)
    resumed = _trainer(m2, tmp_path, loss2, max_steps=4, attach=False)
    with pytest.raises(RuntimeError, match="resumed at step 2 without a NegativeCacheCallback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert loss2.handler is None or loss2.handler.steps_done == 0
    # in callbacks=[...] (not attach) the callback cannot see train()'s argument: refused, not guessed
    m3 = copy.deepcopy(model)
    loss3 = CachedNegativesRankingLoss(m3, cache_size=32, num_negatives=2)
    listed = _trainer(m3, tmp_path, loss3, max_steps=4, attach=False, callbacks=[NegativeCacheCallback(loss3)])
    with pytest.raises(RuntimeError, match="cannot see which checkpoint"):
        listed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_shard_smaller_than_a_batch_fails_before_the_first_step(model, tmp_path):
    m = copy.deepcopy(model)
    loss = CachedNegativesRankingLoss(m, cache_size=4)
    with pytest.raises(ValueError, match=r"cache_size=4 gives 4 rows per rank .* per_device_train_batch_size=8"):
        _trainer(m, tmp_path, loss, max_steps=2).train()
    assert loss.handler.steps_done == 0
    with pytest.raises(ValueError, match="num_negatives must be an int >= 1"):
        CachedNegativesRankingLoss(m, num_negatives=0)
    with pytest.raises(ValueError, match=r"handler_kwargs must not set \['seed'\]"):
        CachedNegativesRankingLoss(m, handler_kwargs={"seed": 1})


def test_defaults_are_the_fine_tuning_case(model):
    loss = CachedNegativesRankingLoss(model)
    assert (loss.cache_size, loss.num_negatives, loss.in_batch_negatives) == (65536, 4, True)


def test_in_batch_loss_is_mnrls_loss_of_each_training_batch(model):
    """negcache/in_batch_loss is what MNRL (and eval_loss) computes on the batch, whatever the cache holds."""
    m = copy.deepcopy(model)
    ours = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2)
    mnrl = MultipleNegativesRankingLoss(m, scale=20.0)
    expected = []
    for seed in (1, 2, 3):
        a, p = pairs(8, seed=seed)
        ours([features(m, a), features(m, p)], None).backward()  # no optimizer step: the model is fixed
        with torch.no_grad():
            expected.append(mnrl([features(m, a), features(m, p)], None).item())
    metrics = ours.pop_metrics()
    assert metrics["negcache/in_batch_loss"] == pytest.approx(sum(expected) / 3, rel=1e-4)
    # the cache's -log P runs over more candidates than the batch once the cache holds rows
    assert metrics["negcache/interpretable_loss"] > metrics["negcache/in_batch_loss"]
    assert ours.pop_metrics() == {}


def test_a_wrapped_encode_rows_is_the_tower_the_cache_calls(model):
    """``encode_rows`` wrapped on the instance (as the efficiency study times re-encoding) receives exactly
    the rows the engine re-encodes: one call per step once the cache holds rows, as many rows as the
    distinct rows sampled, and none before (an empty cache samples nothing)."""
    m = copy.deepcopy(model)
    ours = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2, in_batch_negatives=False)
    plain, seen = ours.encode_rows, []

    def counted(rows, **kwargs):
        seen.append(rows["input_ids"][1].numel())  # (padded ids, lengths): one length per row
        return plain(rows, **kwargs)

    ours.encode_rows = counted
    calls = []
    for seed in (1, 2):
        a, p = pairs(8, seed=seed)
        ours([features(m, a), features(m, p)], None)
        sampled = ours.handler.last_step.sampled_rows
        calls.append(torch.unique(sampled[sampled >= 0]).numel())
    assert calls[0] == 0 and calls[1] > 0
    assert seen == [calls[1]]


@pytest.mark.parametrize("corpus", [False, True], ids=["stream-pairs", "corpus-triplets"])
def test_evaluation_through_the_trainer_never_touches_the_cache(model, tmp_path, corpus):
    """eval_strategy="steps" (every step) and trainer.evaluate(): the cache and its step are those of a run
    without evaluation; eval_loss is MNRL's loss on the evaluation batches (with the negative column)."""
    caches = {}
    for eval_steps in (None, 1):
        m = copy.deepcopy(model)
        texts = pairs(64, seed=4)[1] + pairs(64, seed=104)[1] if corpus else None
        loss = CachedNegativesRankingLoss(m, cache_size=256, num_negatives=2, corpus=texts)
        trainer = _trainer(m, tmp_path / str(eval_steps), loss, max_steps=4, eval_steps=eval_steps, negatives=corpus)
        trainer.train()
        caches[eval_steps] = loss.handler.gather_global_rows()
        assert loss.handler.steps_done == 4
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 4
    _rows_equal(caches[None], caches[1])

    evaluated = trainer.evaluate()
    assert loss.handler.steps_done == 4
    _rows_equal(loss.handler.gather_global_rows(), caches[1])
    reference = _trainer(m, tmp_path / "mnrl", MultipleNegativesRankingLoss(m, scale=20.0), max_steps=4, attach=False,
                         negatives=corpus)
    assert evaluated["eval_loss"] == pytest.approx(reference.evaluate()["eval_loss"], rel=1e-5)


def test_negative_columns_with_an_empty_cache_equal_mnrl(model):
    """(anchor, positive, negative) with nothing cached and in-batch negatives: MNRL's softmax over every
    positive and negative of the batch, the same value and gradients; in evaluation MNRL's loss too."""
    m = copy.deepcopy(model)
    a, p = pairs(8, seed=1)
    n = pairs(8, seed=21)[1]
    batch = [features(m, a), features(m, p), features(m, n)]
    ours = CachedNegativesRankingLoss(m, cache_size=16)
    value = ours(batch, None)
    value.backward()
    g_ours = grads(m)
    m.zero_grad()
    mnrl = MultipleNegativesRankingLoss(m, scale=20.0)
    reference = mnrl(batch, None)
    reference.backward()
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(g_ours, grads(m), rtol=1e-4, atol=1e-6)
    assert ours.handler.steps_done == 1
    assert int(ours.handler.gather_global_rows()["filled"].sum()) == 8  # the 8 positives; no negative cached
    m.eval()
    with torch.no_grad():
        assert ours(batch, None).item() == pytest.approx(mnrl(batch, None).item(), rel=1e-5)


def _embeddings(model, texts):
    with torch.no_grad():
        return F.normalize(model(features(model, texts))["sentence_embedding"], dim=-1)


def test_corpus_prefill_and_a_step_in_corpus_mode(model):
    """Prefill from a dataset column: one row per distinct text, id = its token hash, embedding = the model's
    (in eval mode, restored after). A step then rewrites exactly its positives' and sampled rows with the current
    model's embeddings, inserts nothing, and leaves every other row as it was."""
    from datasets import Dataset

    m = copy.deepcopy(model)
    anchors, positives = pairs(8, seed=5)
    others = pairs(10, seed=6)[1]
    texts = positives + others + positives[:3]  # three duplicates: one row each
    loss = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2, corpus=Dataset.from_dict({"t": texts})["t"])
    m.train()
    loss.prefill()
    assert m.training
    rows = {k: v.clone() for k, v in loss.handler.gather_global_rows().items()}
    distinct = positives + others
    f = features(m, distinct)
    ids = token_hash(f["input_ids"], f["attention_mask"]).tolist()
    where = {int(rows["doc_id"][r, 0]): r for r in rows["filled"].nonzero().flatten().tolist()}
    assert sorted(where) == sorted(ids) and len(where) == 18
    prefilled = rows["embedding"][[where[i] for i in ids]]
    torch.testing.assert_close(prefilled, _embeddings(m, distinct), rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # the model moves, so every re-encoded row visibly changes
        gen = torch.Generator().manual_seed(0)
        for prm in m.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=gen))
    loss([features(m, anchors), features(m, positives)], None).backward()
    after = loss.handler.gather_global_rows()
    assert torch.equal(after["filled"], rows["filled"]) and torch.equal(after["doc_id"], rows["doc_id"])
    sampled = loss.handler.last_step.sampled_rows
    rewritten = {where[i] for i in ids[:8]} | set(sampled[sampled >= 0].tolist())
    assert len(rewritten) > 8  # some rows other than the positives' were sampled
    now = _embeddings(m, distinct)
    for i, doc in enumerate(ids):
        expected = now[i] if where[doc] in rewritten else rows["embedding"][where[doc]]
        torch.testing.assert_close(after["embedding"][where[doc]], expected, rtol=1e-5, atol=1e-6)


def test_corpus_mode_refuses_what_it_cannot_do(model):
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="got one string"):
        CachedNegativesRankingLoss(m, corpus="a text")
    with pytest.raises(ValueError, match=r"corpus\[1\] is int"):
        CachedNegativesRankingLoss(m, corpus=["a", 3])
    with pytest.raises(ValueError, match="corpus needs exclude_same_text=True"):
        CachedNegativesRankingLoss(m, corpus=["a"], exclude_same_text=False)
    with pytest.raises(ValueError, match=r"handler_kwargs must not set \['cache_mode'\]"):
        CachedNegativesRankingLoss(m, handler_kwargs={"cache_mode": "corpus"})
    too_many = CachedNegativesRankingLoss(m, cache_size=8, corpus=pairs(12, seed=5)[1])
    with pytest.raises(ValueError, match="cache_size"):
        too_many.prefill()
    assert int(too_many.handler.gather_global_rows()["filled"].sum()) == 0
    anchors, positives = pairs(4, seed=5)
    loss = CachedNegativesRankingLoss(m, cache_size=16, corpus=positives[:3])
    loss.prefill()
    before = {k: v.clone() for k, v in loss.handler.gather_global_rows().items()}
    with pytest.raises(ValueError, match="not in the corpus"):  # positives[3] is not a document of the corpus
        loss([features(m, anchors), features(m, positives)], None)
    after = loss.handler.gather_global_rows()
    assert all(torch.equal(before[k], after[k]) for k in before) and loss.handler.steps_done == 0


def test_corpus_cache_is_prefilled_when_training_begins_and_restored_not_prefilled_on_resume(model, tmp_path):
    texts = pairs(64, seed=4)[1] + pairs(64, seed=104)[1]
    m = copy.deepcopy(model)
    loss = CachedNegativesRankingLoss(m, cache_size=256, num_negatives=2, corpus=texts)
    trainer = _trainer(m, tmp_path, loss, max_steps=2, negatives=True)
    trainer.add_callback(begin := RowsAtTrainBegin(loss))
    trainer.train()
    assert int(begin.rows["filled"].sum()) == len(set(texts)) and int(begin.rows["age"].max()) == 0  # prefilled
    saved = {k: v.clone() for k, v in loss.handler.gather_global_rows().items()}

    m2 = copy.deepcopy(model)
    loss2 = CachedNegativesRankingLoss(m2, cache_size=256, num_negatives=2, corpus=texts)
    resumed = _trainer(m2, tmp_path, loss2, max_steps=3, negatives=True)
    resumed.add_callback(loaded := RowsAtTrainBegin(loss2))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    for key in saved:  # the checkpoint's rows exactly: no prefill over them (it would reset ages and embeddings)
        assert torch.equal(saved[key], loaded.rows[key]), key
    assert loss2.handler.steps_done == 3


def test_corpus_is_prefilled_by_the_first_training_step_in_a_plain_loop(model):
    m = copy.deepcopy(model)
    anchors, positives = pairs(8, seed=7)
    loss = CachedNegativesRankingLoss(m, cache_size=32, num_negatives=2, corpus=positives + pairs(6, seed=8)[1])
    loss([features(m, anchors), features(m, positives)], None).backward()
    assert int(loss.handler.gather_global_rows()["filled"].sum()) == 14 and loss.handler.steps_done == 1
    assert loss.handler.last_step.metrics["sampled"] == 16  # 8 anchors x 2 draws from the prefilled rows


def test_the_model_appears_once_in_the_losss_state_dict(model):
    loss = CachedNegativesRankingLoss(model, cache_size=64)
    model_keys = set(model.state_dict())
    keys = list(loss.state_dict())
    assert not any(k.startswith("mnrl.") for k in keys), keys[:5]
    assert sum(k.startswith("model.") for k in keys) == len(model_keys)
