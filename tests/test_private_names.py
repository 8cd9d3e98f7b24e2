"""No file reaches into another module's private names.

A name with one leading underscore is a module's own business: renaming it must break nothing outside
that module. So no file of the package, its tests, benchmarks or examples reads ``x._name`` or imports
``from m import _name`` unless it defines ``_name`` itself (a def, a class, an assignment or a
``self._name =`` attribute). What other modules need is public and documented; the few private names
that Python, torch or a library publish as their interface are listed in ``ALLOWED`` with the reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("sharded_negcache", "tests", "benchmarks", "examples")

ALLOWED = {
    # namedtuple's public API carries an underscore so that it cannot clash with field names
    "_fields", "_replace", "_asdict", "_make",
    # nn.Module's extension points, overridden by subclasses and reached through super()
    "_apply", "_load_from_state_dict",
    # Python's own: the caller's frame (finding the trainer on the call stack), a child process's hard exit
    "_getframe", "_exit",
    # ctypes documents a loaded library's system handle as ``CDLL._handle`` (what dlclose takes)
    "_handle",
    # torch: the compiler's namespace (torch._dynamo.reset) and the module that torch.compile wraps
    "_dynamo", "_orig_mod",
    # torch: whether a profiler records; torch's own ranges (data pipes, rpc) test it before opening one,
    # and torch has no public spelling of it
    "_profiler_enabled",
    # compat: the reference's losses spell their retrieval seam ``_retrieval_fn``; code written for them sets it
    "_retrieval_fn",
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined(tree: ast.AST) -> set[str]:
    """The private names a file defines: defs, classes, assigned names, and attributes set on self / cls."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)
    return {n for n in names if _is_private(n)}


ATTRIBUTE_CALLS = {"getattr", "setattr", "hasattr", "delattr"}


def _named_in_call(call: ast.Call) -> list[str]:
    """Attribute names a call reaches by string: ``getattr(x, "_a")`` (also ``monkeypatch.setattr(x, "_a", v)``)
    and a dotted target ``monkeypatch.setattr("pkg.mod._a", v)``."""
    func = call.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if name not in ATTRIBUTE_CALLS:
        return []
    strings = [a.value for a in call.args[:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return [s.rsplit(".", 1)[-1] for s in strings]


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """``file:line: name`` for each private name of another module that ``path`` touches."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _defined(tree) | ALLOWED
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in own:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, a.name) for a in node.names if _is_private(a.name) and a.name not in own]
        elif isinstance(node, ast.Call):  # getattr(x, "_name"), monkeypatch.setattr("m._name", ...)
            found += [(node.lineno, name) for name in _named_in_call(node) if _is_private(name) and name not in own]
    rel = path.relative_to(root)
    return [f"{rel}:{line}: {name}" for line, name in sorted(set(found))]


def scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))


def test_no_file_touches_another_modules_private_names():
    found = [v for p in scanned_files() for v in violations(p)]
    assert not found, "private names of other modules used:\n" + "\n".join(found)


def test_the_scan_flags_reaches_into_other_modules_and_nothing_the_file_owns(tmp_path):
    """The rule on a file written for it: each kind of reach-in is flagged once; the file's own privates
    (defs, classes, assignments, ``self._x`` attributes), dunders and the allowed names are not."""
    src = tmp_path / "sample.py"
    src.write_text(
        "from m import _imported, public\n"
        "import sys\n"
        "_CONST = 1\n"
        "def _helper(): return _CONST\n"
        "class _Own:\n"
        "    def __init__(self): self._state = 0\n"
        "    def _method(self): return self._state + self.__class__.__name__.__len__()\n"
        "def use(obj, monkeypatch):\n"
        "    obj._method(); obj._state; obj._elsewhere\n"
        "    getattr(obj, '_by_string'); getattr(obj, '_helper')\n"
        "    monkeypatch.setattr('pkg.mod._patched', 1)\n"
        "    monkeypatch.setattr(obj, '_attr', 1)\n"
        "    sys._getframe(1); obj._fields\n"
    )
    found = [v.split(": ", 1)[1] for v in violations(src, root=tmp_path)]
    assert found == ["_imported", "_elsewhere", "_by_string", "_patched", "_attr"]
