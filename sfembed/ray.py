"""sfembed as a Ray Data stage: every actor embeds its batches on one shared account quota.

::

    import ray
    import sfembed.ray

    ds = ray.data.read_parquet("corpus/")
    ds = ds.map_batches(
        sfembed.ray.Embedder,
        fn_constructor_kwargs={"model": "BAAI/bge-m3", "quota": "redis://host:6379/0"},
        compute=ray.data.ActorPoolStrategy(size=4),
        batch_size=512,
        batch_format="pyarrow",
    )
    ds.write_parquet("vectors/")

Each actor runs the engine on an event loop of its own (one thread, one HTTP session, one Redis
connection pool, kept for the actor's life), and all of them pace through the same
:class:`~sfembed.SharedLimiter`, so that together they hold the account's RPM and TPM. Each batch
comes back whole, in its order, with two more columns: ``embedding`` (a fixed-size list of
float32, null where the row failed; in a batch of numpy arrays, Ray's default format, a float32
array, NaN where the row failed) and ``error`` (null where it was embedded, else why not).

Needs ``pip install 'sfembed[ray]'`` (Ray Data, pyarrow and the Redis client).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from ._client import EmbeddingClient, client_for
from ._config import Settings, load_settings
from ._engine import embed, shared_limiter_for
from ._exceptions import ConfigError
from ._limiter import Limiter
from ._types import JobStats, Unusable

__all__ = ["Embedder"]

_T = TypeVar("_T")


async def _cancelled(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


def _import_pyarrow() -> Any:
    try:
        return importlib.import_module("pyarrow")
    except ImportError as error:
        raise ConfigError("sfembed.ray needs pyarrow: pip install 'sfembed[ray]'") from error


class Embedder:
    """A callable class for ``Dataset.map_batches(..., batch_format="pyarrow")``.

    ``model`` is the embedding model; ``quota`` the Redis URL of the account's shared quota
    (every actor and every other worker on it share the limits), or ``"local"`` to let each
    actor pace alone at the full limits (right for one actor only). ``text_column`` holds the
    texts (a null or empty text fails its row alone). ``config`` is a settings TOML file;
    ``settings`` overrides its fields (``rate``, ``base_url``, ``concurrency``, ...). Raises
    ConfigError for missing extras, a bad setting or a missing ``text_column``.
    """

    def __init__(
        self,
        *,
        model: str,
        quota: str,
        text_column: str = "text",
        config: str | None = None,
        **settings: Any,
    ) -> None:
        self._pa = _import_pyarrow()
        if quota != "local":
            settings["quota"] = quota
        self.settings: Settings = load_settings(config, model=model, **settings)
        if self.settings.long_mode == "chunks":
            raise ConfigError(
                "sfembed.ray.Embedder returns one row per input: long_mode 'chunks' is not "
                "possible here (use 'pool' or 'truncate')"
            )
        self.text_column = text_column
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: EmbeddingClient | None = None
        self._limiter: Limiter | None = None
        self._stack = contextlib.AsyncExitStack()
        try:
            self._run(self._open())
        except BaseException:
            self.close()
            raise

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the actor's own loop and wait for it. A wait interrupted (a
        KeyboardInterrupt, an error raised by a signal handler) cancels it and waits for it to
        end before raising: the loop runs no job that its caller has left, sending unseen."""
        running: list[asyncio.Task[Any]] = []

        async def run() -> _T:
            task = asyncio.current_task()
            assert task is not None
            running.append(task)
            return await coroutine

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                # Scheduled after run()'s first step, so ``running`` holds its task by then.
                asyncio.run_coroutine_threadsafe(_cancelled(running), self._loop).result()
            raise

    async def _open(self) -> None:
        self._client = await self._stack.enter_async_context(client_for(self.settings))
        if self.settings.quota:
            self._limiter = await self._stack.enter_async_context(shared_limiter_for(self.settings))

    def __call__(self, batch: Any) -> Any:
        """``batch`` with ``embedding`` and ``error`` columns appended, in its own format: a
        pyarrow Table (``batch_format="pyarrow"``), or a dict of numpy arrays (Ray's default
        format), whose ``embedding`` is a float32 array of one row per input, NaN where the row
        failed. Raises ConfigError for a batch of another format, or one without
        ``text_column`` or with an ``embedding`` or ``error`` column already."""
        if isinstance(batch, self._pa.Table):
            names = batch.column_names
        elif isinstance(batch, dict):
            names = list(batch)
        else:
            raise ConfigError(
                f"sfembed.ray.Embedder takes pyarrow or numpy batches, not {type(batch).__name__}: "
                'pass batch_format="pyarrow" to map_batches'
            )
        self._check_columns(names)
        if isinstance(batch, dict):
            column = batch[self.text_column]  # numpy's strings become Python's, for the client
            texts = column.tolist() if isinstance(column, np.ndarray) else list(column)
            rows, errors = self._run(self._embed(texts))
            return {**batch, "embedding": rows, "error": np.array(errors, dtype=object)}
        texts = batch.column(self.text_column).to_pylist()
        rows, errors = self._run(self._embed(texts))
        return batch.append_column("embedding", self._vectors(rows, errors)).append_column(
            "error", self._pa.array(errors, type=self._pa.string())
        )

    def _check_columns(self, names: list[str]) -> None:
        """Raise ConfigError for a batch without the texts, or whose own columns the output's
        would shadow (a second ``embedding`` column, from another model, say)."""
        if self.text_column not in names:
            raise ConfigError(
                f"sfembed.ray.Embedder: the batch has no column {self.text_column!r} "
                f"(columns: {', '.join(names)})"
            )
        for taken in ("embedding", "error"):
            if taken in names:
                raise ConfigError(
                    f"sfembed.ray.Embedder: the batch has a column {taken!r} already, and the "
                    f"output's {taken!r} column would stand beside it under the same name: "
                    "drop or rename it first (Dataset.drop_columns, Dataset.rename_columns)"
                )

    async def _embed(self, texts: list[Any]) -> tuple[np.ndarray[Any, Any], list[str | None]]:
        inputs = [text if isinstance(text, str) else self._unusable(text) for text in texts]
        stats = JobStats()
        rows = await embed(
            inputs,
            model=self.settings.model,
            settings=self.settings,
            client=self._client,
            stats=stats,
            errors="nan",
            limiter=self._limiter,
        )
        errors: list[str | None] = [None] * len(texts)
        for failure in stats.failures:
            errors[failure.position] = failure.reason
        return rows, errors

    def _unusable(self, value: Any) -> Unusable:
        if value is None:
            return Unusable(f"{self.text_column} is null")
        return Unusable(f"{self.text_column} is not a text but {type(value).__name__}")

    def _vectors(self, rows: np.ndarray[Any, Any], errors: list[str | None]) -> Any:
        pa = self._pa
        values = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
        failed = pa.array([error is not None for error in errors], type=pa.bool_())
        return pa.FixedSizeListArray.from_arrays(values, rows.shape[1], mask=failed)

    def close(self) -> None:
        """Close the HTTP session and the Redis connections, and stop the actor's loop."""
        if self._loop.is_closed():
            return
        self._run(self._stack.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
