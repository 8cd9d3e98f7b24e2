"""A code-search data set built at run time from the Python standard library: (docstring -> function).

Every machine that runs Python has the standard library's sources, so this task needs no download.
The builder walks the running interpreter's stdlib, parses each module with ``ast`` and, for every
function or method with a docstring, makes one pair:

- query: the docstring's first paragraph (its summary), whitespace collapsed;
- document: the function's source as ``ast.unparse`` writes it, with *every* docstring inside it
  removed (its own and those of nested functions and classes), so the answer is not in the text.

Pairs whose function has no body besides the docstring are dropped (nothing to retrieve), and so are
repeated queries or repeated documents (the first in (module, line) order is kept), so that each
held-out query has exactly one right answer. The split is by *module* (``email.message``,
``json.decoder``, ``os``): no module contributes to both sides, so held-out retrieval cannot lean on
a module's private helpers and names. Modules are visited in the order of the crc32 of their name
and go to the held-out side while it stays under ``held_out_fraction`` of the pairs: deterministic,
independent of the machine and of the walk order, and no single large package fills the held-out
set (splitting by top-level package put 520 of 916 held-out pairs in ``idlelib``).

The tokenizer is written for the task: words and numbers only (punctuation carries little for a bag
of words), identifiers split at ``_`` and at camelCase boundaries, lower-cased; the same tokenizer
reads docstrings and code, so a query word and the identifier part it names become the same token.
The vocabulary comes from the training pairs only.

Everything is deterministic for a given interpreter: build twice, get the same pairs in the same order.
"""
from __future__ import annotations

import ast
import copy
import json
import os
import re
import sys
import sysconfig
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
BUILDER_VERSION = 1  # bump when the pairs or the tokenizer change (invalidates saved builds)

# Directories of the stdlib that are not library code (tests, bundled wheels, installed packages).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "_bundled"}


@dataclass(frozen=True)
class Pair:
    """One (docstring summary -> function source) example."""

    pair_id: str  # "module:qualname:line", unique
    module: str  # dotted module name, e.g. "email.message"
    package: str  # top-level package (for reports)
    query: str
    code: str


# ---- walking the standard library --------------------------------------------------------------
def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_modules(root: Path, packages: Sequence[str] | None = None) -> Iterator[tuple[str, Path]]:
    """(dotted module name, path) of every library ``.py`` file under ``root``, in sorted order.

    ``packages`` keeps only those top-level names (a small, fast build for tests).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("config-", ".")) and "-" not in d
        )
        if rel.parts and packages is not None and rel.parts[0] not in packages:
            dirnames[:] = []
            continue
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            parts = list(rel.parts) + ([] if name == "__init__.py" else [name[:-3]])
            if not parts or (packages is not None and parts[0] not in packages):
                continue
            yield ".".join(parts), Path(dirpath) / name


def _first_paragraph(docstring: str) -> str:
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _strip_docstrings(node: ast.AST) -> None:
    """Removes the docstring of ``node`` and of every function and class nested in it (in place)."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(sub, clean=False):
            sub.body = sub.body[1:] or [ast.Pass()]


class _FunctionCollector(ast.NodeVisitor):
    """Collects (qualname, node) of every function and method, nested ones included, in source order."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def _visit_scope(self, node: ast.AST, is_function: bool) -> None:
        self.stack.append(node.name)  # type: ignore[attr-defined]
        if is_function:
            self.found.append((".".join(self.stack), node))  # type: ignore[arg-type]
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node, True)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_scope(node, True)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_scope(node, False)


def pairs_from_source(source: str, module: str, min_query_words: int = 3) -> list[Pair]:
    """Every (docstring summary, docstring-free source) pair of one module's source text."""
    try:
        tree = ast.parse(source)
        collector = _FunctionCollector()
        collector.visit(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # generated code can nest past the stack
        return []
    package = module.split(".")[0]
    pairs = []
    for qualname, node in collector.found:
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        query = _first_paragraph(doc)
        if len(words(query)) < min_query_words:
            continue
        body = copy.deepcopy(node)
        _strip_docstrings(body)
        if all(isinstance(s, ast.Pass) for s in body.body):
            continue  # only a docstring: nothing to retrieve
        try:
            code = ast.unparse(body)
        except RecursionError:
            continue
        pairs.append(Pair(f"{module}:{qualname}:{node.lineno}", module, package, query, code))
    return pairs


def site_root() -> Path:
    """Where the running interpreter's third-party packages live (``purelib``: the venv's site-packages)."""
    return Path(sysconfig.get_paths()["purelib"])


# Installed third-party packages the library corpus is drawn from: the project's pinned stack and what it
# pulls in (``requirements-cpu.txt``). Their versions are recorded in the build's summary.
LIBRARIES = (
    "torch", "numpy", "transformers", "scipy", "sklearn", "pandas", "matplotlib", "sympy", "networkx",
    "torchrec", "sentence_transformers", "datasets", "accelerate", "huggingface_hub", "tokenizers",
)
DISTRIBUTIONS = {"sklearn": "scikit-learn", "sentence_transformers": "sentence-transformers",
                 "huggingface_hub": "huggingface-hub"}


def library_versions(libraries: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in libraries:
        try:
            out[name] = metadata.version(DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _sources(root: Path | None, packages: Sequence[str] | None, libraries: Sequence[str] | None) -> Iterator[tuple[str, Path]]:
    yield from iter_modules(Path(root) if root is not None else stdlib_root(), packages)
    if libraries:
        site = site_root()
        yield from iter_modules(site, [name for name in libraries if (site / name).is_dir()])


def collect_pairs(
    root: Path | None = None, packages: Sequence[str] | None = None, libraries: Sequence[str] | None = None,
) -> list[Pair]:
    """All pairs of the standard library (or of ``packages`` in it), then of the installed ``libraries``
    (top-level package names in site-packages), repeated queries and codes removed (the first kept)."""
    seen_queries: set[str] = set()
    seen_codes: set[str] = set()
    pairs = []
    for module, path in _sources(root, packages, libraries):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for pair in pairs_from_source(source, module):
            qkey = pair.query.lower()
            if qkey in seen_queries or pair.code in seen_codes:
                continue
            seen_queries.add(qkey)
            seen_codes.add(pair.code)
            pairs.append(pair)
    return pairs


def split_by_module(pairs: Sequence[Pair], held_out_fraction: float = 0.15) -> tuple[list[Pair], list[Pair]]:
    """(train, held_out), disjoint by module; see the module docstring for the rule."""
    counts = Counter(p.module for p in pairs)
    target = held_out_fraction * len(pairs)
    held: set[str] = set()
    size = 0
    for module in sorted(counts, key=lambda name: (zlib.crc32(name.encode()), name)):
        if size + counts[module] <= target:
            held.add(module)
            size += counts[module]
    train = [p for p in pairs if p.module not in held]
    held_out = [p for p in pairs if p.module in held]
    return train, held_out


# ---- tokenizer ---------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+|\d+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+")


def words(text: str) -> list[str]:
    """Lower-cased word and number tokens; identifiers split at '_' and camelCase ('getHTTPCode' -> get http code)."""
    out = []
    for tok in _WORD.findall(text):
        if tok.isdigit():
            out.append(tok)
        else:
            out.extend(piece.lower() for piece in _CAMEL.findall(tok))
    return out


class Vocab:
    """Token <-> id. Id 0 pads, 1 is unknown; the rest by decreasing training count, then alphabetically."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.itos = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int = 16384, min_count: int = 2) -> "Vocab":
        counts = Counter(tok for text in texts for tok in words(text))
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls(kept[: max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> list[int]:
        """Ids of the first ``max_len`` tokens, padded with 0 to ``max_len``."""
        ids = [self.stoi.get(t, UNK) for t in words(text)[:max_len]]
        return ids + [PAD] * (max_len - len(ids))


def encode_pairs(pairs: Sequence[Pair], vocab: Vocab, query_len: int, doc_len: int) -> dict[str, torch.Tensor]:
    """int32 token matrices: ``query_tokens`` [N, query_len] and ``doc_tokens`` [N, doc_len]."""
    q = torch.tensor([vocab.encode(p.query, query_len) for p in pairs], dtype=torch.int32).reshape(-1, query_len)
    d = torch.tensor([vocab.encode(p.code, doc_len) for p in pairs], dtype=torch.int32).reshape(-1, doc_len)
    return {"query_tokens": q, "doc_tokens": d}


# ---- the whole data set, built once and saved ---------------------------------------------------
@dataclass
class CodeSearchData:
    """Pairs, vocabulary and token tensors of both splits."""

    train: list[Pair]
    held_out: list[Pair]
    vocab: Vocab
    train_tensors: dict[str, torch.Tensor]
    held_out_tensors: dict[str, torch.Tensor]
    settings: dict

    def summary(self) -> dict:
        return {
            "python": sys.version.split()[0],
            "train_pairs": len(self.train),
            "held_out_pairs": len(self.held_out),
            "train_modules": len({p.module for p in self.train}),
            "held_out_modules": len({p.module for p in self.held_out}),
            "vocab_size": len(self.vocab),
            "train_pairs_by_package": dict(sorted(Counter(p.package for p in self.train).items())),
            "held_out_pairs_by_package": dict(sorted(Counter(p.package for p in self.held_out).items())),
            **self.settings,
        }


def build(
    root: Path | None = None,
    packages: Sequence[str] | None = None,
    held_out_fraction: float = 0.15,
    query_len: int = 32,
    doc_len: int = 128,
    max_vocab: int = 16384,
    libraries: Sequence[str] | None = None,
) -> CodeSearchData:
    """Collects, splits, tokenizes. Deterministic for a given interpreter, installed packages and arguments.

    ``libraries``: also the documented functions of these installed packages (e.g. :data:`LIBRARIES`).
    """
    pairs = collect_pairs(root, packages, libraries)
    train, held_out = split_by_module(pairs, held_out_fraction)
    vocab = Vocab.build((text for p in train for text in (p.query, p.code)), max_size=max_vocab)
    settings = dict(
        held_out_fraction=held_out_fraction, query_len=query_len, doc_len=doc_len, max_vocab=max_vocab,
        packages=list(packages) if packages is not None else None,
        libraries=library_versions(libraries) if libraries else None,
    )
    return CodeSearchData(
        train, held_out, vocab,
        encode_pairs(train, vocab, query_len, doc_len),
        encode_pairs(held_out, vocab, query_len, doc_len),
        settings,
    )


def load_or_build(cache_dir: Path | str, **kwargs) -> CodeSearchData:
    """``build(**kwargs)``, saved under ``cache_dir`` keyed by the interpreter, the arguments and the builder version."""
    versions = library_versions(kwargs["libraries"]) if kwargs.get("libraries") else None
    key = json.dumps(
        {"v": BUILDER_VERSION, "py": sys.version, "root": str(kwargs.get("root") or stdlib_root()), "versions": versions,
         **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(kwargs.items()) if k != "root"}},
        sort_keys=True, default=str,
    )
    path = Path(cache_dir) / f"code_search_{zlib.crc32(key.encode()):08x}.pt"
    if path.exists():
        blob = torch.load(path, weights_only=False)
        if blob.get("key") == key:
            return _from_blob(blob)
    data = build(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(_to_blob(data, key), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return data


def _to_blob(data: CodeSearchData, key: str) -> dict:
    return {
        "key": key,
        "train": [asdict(p) for p in data.train],
        "held_out": [asdict(p) for p in data.held_out],
        "vocab": data.vocab.itos,
        "train_tensors": data.train_tensors,
        "held_out_tensors": data.held_out_tensors,
        "settings": data.settings,
    }


def _from_blob(blob: dict) -> CodeSearchData:
    return CodeSearchData(
        [Pair(**p) for p in blob["train"]],
        [Pair(**p) for p in blob["held_out"]],
        Vocab(blob["vocab"]),
        blob["train_tensors"],
        blob["held_out_tensors"],
        blob["settings"],
    )


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Build the code-search pairs and print their counts.")
    parser.add_argument("--libraries", action="store_true", help=f"also the installed packages {', '.join(LIBRARIES)}")
    t0 = time.perf_counter()
    data = build(libraries=LIBRARIES if parser.parse_args().libraries else None)
    print(json.dumps(data.summary(), indent=1))
    print(f"built in {time.perf_counter() - t0:.1f} s")
    for p in data.held_out[:3]:
        print("\nQUERY:", p.query, "\nCODE:", p.code[:300])
