"""The public surface: ``__all__`` is exactly the public names, sorted, and each is importable."""

from __future__ import annotations

import sfembed
import sfembed.testing


def _public(module: object) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("sfembed")
    }


def test_all_lists_every_public_name_and_nothing_else() -> None:
    exported = set(sfembed.__all__)
    assert len(exported) == len(sfembed.__all__)
    assert _public(sfembed) | {"DEFAULT_CATALOG"} == exported
    assert all(hasattr(sfembed, name) for name in sfembed.__all__)


def test_all_is_sorted() -> None:
    assert sfembed.__all__ == sorted(sfembed.__all__, key=lambda n: (not n.isupper(), n))


def test_testing_module_exports_exist() -> None:
    assert all(hasattr(sfembed.testing, name) for name in sfembed.testing.__all__)


def test_every_error_is_an_sfembed_error() -> None:
    errors = [getattr(sfembed, n) for n in sfembed.__all__ if n.endswith("Error")]
    assert all(issubclass(e, sfembed.SFEmbedError) for e in errors)
