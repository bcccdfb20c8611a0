"""The public surface: ``__all__`` is exactly the public names, sorted, and each is importable;
the same for :mod:`sfembed.testing`."""

from __future__ import annotations

import types

import sfembed
import sfembed.testing


def _exposed(module: types.ModuleType) -> set[str]:
    """The public names a package module makes available (what it imports for its users, at
    once or on first use)."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    }


def test_all_lists_every_public_name_and_nothing_else() -> None:
    exported = set(sfembed.__all__)
    assert len(exported) == len(sfembed.__all__)
    assert _exposed(sfembed) == exported
    assert all(hasattr(sfembed, name) for name in sfembed.__all__)


def test_all_is_sorted() -> None:
    for module in (sfembed, sfembed.testing):
        assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))


def test_testing_all_lists_every_public_name_it_offers_and_nothing_else() -> None:
    exported = set(sfembed.testing.__all__)
    assert len(exported) == len(sfembed.testing.__all__)
    assert _exposed(sfembed.testing) == exported
    assert all(hasattr(sfembed.testing, name) for name in sfembed.testing.__all__)


def test_every_error_is_an_sfembed_error() -> None:
    errors = [getattr(sfembed, n) for n in sfembed.__all__ if n.endswith("Error")]
    assert all(issubclass(e, sfembed.SFEmbedError) for e in errors)
