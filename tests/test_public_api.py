"""The public surface: ``__all__`` is exactly the public names, sorted, and each is importable;
the same for :mod:`sfembed.testing`."""

from __future__ import annotations

import ast
import inspect
import types

import sfembed
import sfembed.testing

#: Public names sfembed.testing imports to offer them (the synthetic corpus lives beside it).
TESTING_PASSES_ON = {"synthetic_corpus"}


def _exposed(module: types.ModuleType) -> set[str]:
    """The public names a package module makes available (what it imports for its users, at
    once or on first use)."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    }


def _defined(module: types.ModuleType) -> set[str]:
    """The public names a module defines at its top level (classes, functions, constants, type
    aliases)."""
    names: set[str] = set()
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def test_all_lists_every_public_name_and_nothing_else() -> None:
    exported = set(sfembed.__all__)
    assert len(exported) == len(sfembed.__all__)
    assert _exposed(sfembed) == exported
    assert all(hasattr(sfembed, name) for name in sfembed.__all__)


def test_all_is_sorted() -> None:
    for module in (sfembed, sfembed.testing):
        assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))


def test_testing_all_lists_every_public_name_it_defines_and_nothing_else() -> None:
    exported = set(sfembed.testing.__all__)
    assert len(exported) == len(sfembed.testing.__all__)
    assert _defined(sfembed.testing) | TESTING_PASSES_ON == exported
    assert all(hasattr(sfembed.testing, name) for name in sfembed.testing.__all__)


def test_every_error_is_an_sfembed_error() -> None:
    errors = [getattr(sfembed, n) for n in sfembed.__all__ if n.endswith("Error")]
    assert all(issubclass(e, sfembed.SFEmbedError) for e in errors)
