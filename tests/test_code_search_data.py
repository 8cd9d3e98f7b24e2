"""The code-search data builder: pairs well-formed, split disjoint by module, deterministic."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the examples are not part of the installed package
    sys.path.insert(0, str(ROOT))

from examples.code_search import data as D  # noqa: E402

PACKAGES = ("json", "email", "textwrap", "csv", "argparse")

SOURCE = '''
def documented(a, b):
    """Add two numbers together.

    Longer description that is not part of the query.
    """
    def inner(x):
        """A nested helper with its own docstring text."""
        return x + 1
    return inner(a) + b


def only_docstring():
    """This function has nothing but a docstring."""


def too_short():
    """Short."""
    return 1


class Holder:
    async def fetch(self, url):
        """Fetch the given address asynchronously please."""
        return await url
'''


@pytest.fixture(scope="module")
def data() -> D.CodeSearchData:
    return D.build(packages=PACKAGES)


def test_pairs_from_source_strips_every_docstring_and_skips_empty_functions():
    pairs = D.pairs_from_source(SOURCE, "pkg.mod")
    assert [p.pair_id for p in pairs] == [
        "pkg.mod:documented:2", "pkg.mod:documented.inner:7", "pkg.mod:Holder.fetch:23"
    ]
    first, inner, method = pairs
    assert first.query == "Add two numbers together."
    assert (first.module, first.package) == ("pkg.mod", "pkg")
    assert "Add two numbers" not in first.code and "nested helper" not in first.code
    assert first.code.startswith("def documented(a, b):")
    assert "return inner(a) + b" in first.code
    assert inner.query == "A nested helper with its own docstring text." and inner.code == "def inner(x):\n    return x + 1"
    assert method.code.startswith("async def fetch(self, url):")
    assert method.query == "Fetch the given address asynchronously please."


def test_words_split_identifiers_and_drop_punctuation():
    assert D.words("getHTTPResponse_code2(x) -> 'OK'") == ["get", "http", "response", "code", "2", "x", "ok"]
    assert D.words("Return the __name__ of ClassName.") == ["return", "the", "name", "of", "class", "name"]


def test_pairs_are_well_formed(data):
    pairs = data.train + data.held_out
    assert len(data.train) > 200 and len(data.held_out) > 20
    assert len({p.pair_id for p in pairs}) == len(pairs)
    assert len({p.query.lower() for p in pairs}) == len(pairs)  # one right answer per query
    assert len({p.code for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.package in PACKAGES and p.module.split(".")[0] == p.package
        assert len(D.words(p.query)) >= 3 and "\n" not in p.query
        tree = ast.parse(p.code)
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(tree.body) == 1
        assert p.pair_id.split(":")[1].split(".")[-1] == fn.name
        for node in ast.walk(fn):  # no docstring left anywhere in the document
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                assert ast.get_docstring(node) is None


def test_split_is_disjoint_by_module_and_near_the_fraction(data):
    train_modules = {p.module for p in data.train}
    held_modules = {p.module for p in data.held_out}
    assert train_modules and held_modules and not train_modules & held_modules
    total = len(data.train) + len(data.held_out)
    assert 0.05 * total < len(data.held_out) <= 0.15 * total


def test_split_rule_on_synthetic_pairs():
    pairs = [D.Pair(f"m{i % 10}:f:{i}", f"m{i % 10}", f"m{i % 10}", f"query {i}", f"code {i}") for i in range(200)]
    train, held = D.split_by_module(pairs, held_out_fraction=0.25)
    assert len(held) == 40  # 20 pairs per module: two modules fit under 25 % of 200
    assert {p.module for p in train}.isdisjoint({p.module for p in held})
    assert D.split_by_module(list(reversed(pairs)), 0.25)[1] == list(reversed(held))  # order-independent choice


def test_tokens_use_the_training_vocabulary(data):
    assert data.vocab.itos[:2] == ["<pad>", "<unk>"]
    rebuilt = D.Vocab.build(text for p in data.train for text in (p.query, p.code))
    assert rebuilt.itos == data.vocab.itos
    for split, pairs in ((data.train_tensors, data.train), (data.held_out_tensors, data.held_out)):
        assert split["query_tokens"].shape == (len(pairs), 32) and split["query_tokens"].dtype == torch.int32
        assert split["doc_tokens"].shape == (len(pairs), 128)
        assert int(split["doc_tokens"].max()) < len(data.vocab) and int(split["doc_tokens"].min()) >= 0
        assert bool((split["query_tokens"][:, 0] != D.PAD).all())  # every query has a first token
    first = data.train[0]
    expected = [data.vocab.stoi.get(t, D.UNK) for t in D.words(first.query)][:32]
    assert data.train_tensors["query_tokens"][0, : len(expected)].tolist() == expected
    assert data.train_tensors["query_tokens"][0, len(expected) :].eq(D.PAD).all()


def test_build_is_deterministic_and_saved_copy_round_trips(data, tmp_path: Path):
    again = D.build(packages=PACKAGES)
    assert again.train == data.train and again.held_out == data.held_out
    assert again.vocab.itos == data.vocab.itos
    for key in ("query_tokens", "doc_tokens"):
        assert torch.equal(again.train_tensors[key], data.train_tensors[key])
        assert torch.equal(again.held_out_tensors[key], data.held_out_tensors[key])
    saved = D.load_or_build(tmp_path, packages=PACKAGES)
    loaded = D.load_or_build(tmp_path, packages=PACKAGES)  # second call reads the file
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert loaded.train == saved.train == data.train and loaded.vocab.itos == data.vocab.itos
    assert torch.equal(loaded.held_out_tensors["doc_tokens"], data.held_out_tensors["doc_tokens"])


def test_installed_libraries_join_the_corpus_with_their_versions():
    """A small installed package (``tokenizers``' pure-Python helpers) next to ``json``: modules named from
    site-packages, pairs deduplicated across both, the version recorded, the split disjoint by module."""
    from importlib import metadata

    data = D.build(packages=["json"], libraries=["tokenizers", "not_installed_pkg"])
    packages = {p.package for p in data.train + data.held_out}
    assert packages == {"json", "tokenizers"}
    lib = [p for p in data.train + data.held_out if p.package == "tokenizers"]
    assert lib and all(p.module.startswith("tokenizers.") or p.module == "tokenizers" for p in lib)
    assert data.settings["libraries"] == {"tokenizers": metadata.version("tokenizers"), "not_installed_pkg": None}
    assert {p.module for p in data.train}.isdisjoint({p.module for p in data.held_out})
    summary = data.summary()
    assert sum(summary["train_pairs_by_package"].values()) == len(data.train)
    only_stdlib = D.collect_pairs(packages=["json"])
    assert [p for p in data.train + data.held_out if p.package == "json"] != [] and len(only_stdlib) < len(lib) + len(only_stdlib)


def test_deeply_nested_generated_code_is_skipped_not_fatal():
    # 600 chained additions parse, but walking them recurses past Python's limit (sympy ships such code).
    nested = "def f():\n    \"\"\"A generated function with a deep expression.\"\"\"\n    return " + " + ".join(["x"] * 600)
    assert D.pairs_from_source(nested, "gen") == []  # RecursionError while walking: the module is skipped
