"""The model catalogue: per-item token limits, dimensions and modalities, as data a user can extend.

The provider changes its catalogue over time, so nothing here is hard-wired into the engine: a
:class:`ModelCatalog` maps names to :class:`ModelSpec` and a user adds or overrides entries from a
TOML file (``[models."Org/name"]`` tables) or in code, without a release.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError, UnknownModelError

__all__ = ["DEFAULT_CATALOG", "ModelCatalog", "ModelSpec"]

_QWEN3_8B_DIMS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 4096)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSpec:
    """What sfembed must know of a model.

    ``max_input_tokens`` is the per-item limit, counted as the server counts (with special tokens).
    ``dimensions`` lists the output sizes the model can give; when ``accepts_dimensions`` is false
    the ``dimensions`` parameter must not be sent and the output has ``default_dimensions``.
    ``tokenizer`` names a bundled tokenizer family (``qwen3``, ``qwen3-vl``, ``bert-en``,
    ``bert-zh``, ``xlmr``) or a path to a ``tokenizer.json``; ``special_tokens`` is what the server
    adds per item.
    """

    name: str
    max_input_tokens: int
    default_dimensions: int
    dimensions: tuple[int, ...] = ()
    accepts_dimensions: bool = False
    modalities: frozenset[str] = field(default_factory=lambda: frozenset({"text"}))
    tokenizer: str | None = None
    special_tokens: int = 0

    def __post_init__(self) -> None:
        for key in ("max_input_tokens", "default_dimensions", "special_tokens"):
            value = getattr(self, key)
            least = 0 if key == "special_tokens" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(
                    f"model {self.name!r}: {key} = {value!r} is not allowed: a whole number "
                    f"{least} or more"
                )
        dims = self.dimensions
        if not all(
            isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in dims
        ):
            raise ConfigError(
                f"model {self.name!r}: dimensions = {list(dims)!r} is not allowed: a list of "
                "whole numbers 1 or more"
            )
        if not isinstance(self.accepts_dimensions, bool):
            raise ConfigError(
                f"model {self.name!r}: accepts_dimensions = {self.accepts_dimensions!r} is not "
                "allowed: true or false"
            )
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ConfigError(
                f"model {self.name!r}: tokenizer = {self.tokenizer!r} is not allowed: a bundled "
                "family's name or a path to a tokenizer.json"
            )
        if not self.dimensions:
            object.__setattr__(self, "dimensions", (self.default_dimensions,))
        if self.default_dimensions not in self.dimensions:
            raise ConfigError(f"model {self.name!r}: default_dimensions not among its dimensions")

    @property
    def accepts_images(self) -> bool:
        return "image" in self.modalities

    def output_dimensions(self, requested: int | None) -> int:
        """The vector length the server returns for ``requested`` (``None``: the default)."""
        return self.default_dimensions if requested is None else requested


def _bge(name: str, tokenizer: str, max_tokens: int = 512, dims: int = 1024) -> ModelSpec:
    return ModelSpec(
        name=name,
        max_input_tokens=max_tokens,
        default_dimensions=dims,
        tokenizer=tokenizer,
        special_tokens=2,
    )


def _qwen3(name: str, dims: tuple[int, ...], *, vl: bool = False) -> ModelSpec:
    return ModelSpec(
        name=name,
        max_input_tokens=32768,
        default_dimensions=dims[-1],
        dimensions=dims,
        accepts_dimensions=True,
        modalities=frozenset({"text", "image"}) if vl else frozenset({"text"}),
        tokenizer="qwen3-vl" if vl else "qwen3",
        special_tokens=19 if vl else 1,
    )


_BUILTIN = (
    _bge("BAAI/bge-large-zh-v1.5", "bert-zh"),
    _bge("BAAI/bge-large-en-v1.5", "bert-en"),
    _bge("netease-youdao/bce-embedding-base_v1", "xlmr", dims=768),
    _bge("BAAI/bge-m3", "xlmr", max_tokens=8192),
    _bge("Pro/BAAI/bge-m3", "xlmr", max_tokens=8192),
    _qwen3("Qwen/Qwen3-Embedding-8B", _QWEN3_8B_DIMS),
    _qwen3("Qwen/Qwen3-Embedding-4B", _QWEN3_8B_DIMS[:-1]),
    _qwen3("Qwen/Qwen3-Embedding-0.6B", _QWEN3_8B_DIMS[:6]),
    _qwen3("Qwen/Qwen3-VL-Embedding-8B", _QWEN3_8B_DIMS, vl=True),
)


class ModelCatalog(Mapping[str, ModelSpec]):
    """An immutable name -> ModelSpec map; ``with_models`` and ``load`` make extended copies."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs = {spec.name: spec for spec in specs}

    def __getitem__(self, name: str) -> ModelSpec:
        """The spec of ``name``; raises UnknownModelError (a ConfigError and a KeyError)."""
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {name!r}: give its limits (max_input_tokens, default_dimensions) "
                "in a [models] table of a config file or as a ModelSpec"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def with_models(self, *specs: ModelSpec) -> ModelCatalog:
        """A copy with ``specs`` added, replacing entries of the same name."""
        return ModelCatalog([*self._specs.values(), *specs])

    def with_table(self, table: Mapping[str, Mapping[str, Any]]) -> ModelCatalog:
        """A copy extended by a ``{name: {field: value}}`` table, as under ``[models]`` in TOML.

        Fields not given for a known model keep their catalogue values. Raises ConfigError.
        """
        return self.with_models(*(self._spec_from(name, fields) for name, fields in table.items()))

    def load(self, path: str | Path) -> ModelCatalog:
        """A copy extended by the ``[models]`` table of the TOML file at ``path``."""
        import tomllib  # here: a job without a models file starts without it

        with open(path, "rb") as handle:
            return self.with_table(tomllib.load(handle).get("models", {}))

    def _spec_from(self, name: str, fields: Mapping[str, Any]) -> ModelSpec:
        if not isinstance(fields, Mapping):
            raise ConfigError(f"model {name!r}: must be a table of its limits, not {fields!r}")
        values = dict(fields)
        known = set(ModelSpec.__dataclass_fields__) - {"name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"model {name!r}: unknown key(s) {', '.join(unknown)}; known: "
                + ", ".join(sorted(known))
            )
        required = {"max_input_tokens", "default_dimensions"}
        if name not in self._specs and not required <= set(values):
            raise ConfigError(
                f"model {name!r} is not in the catalogue: give its max_input_tokens and "
                "default_dimensions"
            )
        for key in ("dimensions", "modalities"):
            if key in values and not isinstance(values[key], list | tuple):
                raise ConfigError(f"model {name!r}: {key} = {values[key]!r} is not allowed: a list")
        if "dimensions" in values:
            values["dimensions"] = tuple(values["dimensions"])
        if "modalities" in values:
            values["modalities"] = frozenset(values["modalities"])
        try:
            if name in self._specs:
                return replace(self._specs[name], **values)
            return ModelSpec(name=name, **values)
        except TypeError as exc:
            raise ConfigError(f"model {name!r}: {exc}") from None


DEFAULT_CATALOG = ModelCatalog(_BUILTIN)
