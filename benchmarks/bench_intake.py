"""The record side of a file job, stage by stage: CPU per million records of reading JSONL,
handing records to the engine (their places kept for the id sidecar), estimating tokens,
intake as a whole (estimate, cache keys and lookup, packing) and writing the id sidecar.
Prints a Markdown table.

    .venv/bin/python benchmarks/bench_intake.py [--records 100000] [--repeat 3]

Each stage runs alone in this process on the short documents of ``bench_pacing.py --cpu``
(``intake`` with an empty cache, as a first run has); the figure is the least of ``--repeat``
runs of process CPU time, so the load of a shared machine moves it less than wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from bench_pacing import Profile, documents

from sfembed import DEFAULT_CATALOG, JobStats
from sfembed._cache import EmbeddingCache
from sfembed._config import load_settings
from sfembed._dedup import Dedup
from sfembed._intake import BLOCK, Intake, Splitter
from sfembed._job import _Ids
from sfembed._packer import packer_for
from sfembed._sources import find_sources, read_sources
from sfembed._streams import ReceiveStream, SendStream, open_stream
from sfembed._types import Chunk, EmbeddedBatch
from sfembed._writers import _write_sidecar

try:
    from sfembed._sources import read_blocks
except ImportError:  # a build from before the block reader, for a figure before
    read_blocks = None  # type: ignore[assignment]

M3 = "BAAI/bge-m3"
SPEC = DEFAULT_CATALOG[M3]
ROWS_PER_WRITE = 64  # rows of one write to the sidecar: a request's answer


def corpus(path: Path, records: int) -> None:
    """The short documents of ``bench_pacing.py --cpu`` (about 24 tokens), as it writes them."""
    texts = documents(Profile(f"cpu{records}", M3, records, rpm=1, tpm=1, bound="tpm"))
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + "\n")


class _Rows:
    """A reorder ring with room for everything, that keeps nothing."""

    def __init__(self) -> None:
        self.next = 0

    def has_room(self, units: int) -> bool:
        return True

    async def reserve(self, units: int) -> int:
        first, self.next = self.next, self.next + units
        return first

    def put(self, chunks: list[Chunk], rows: Any) -> None:
        pass

    def fail(self, chunk: Chunk, reason: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def reading(path: Path) -> Callable[[], object]:
    """What a job hands the engine: the inputs read, their places kept for the sidecar."""
    sources = find_sources(path)
    if read_blocks is None:  # a build from before the block reader
        return lambda: sum(1 for _ in _Ids().feed(read_sources(sources)))
    return lambda: sum(1 for _ in _Ids().feed(read_blocks(sources)))


def estimating(texts: list[str]) -> Callable[[], object]:
    splitter = Splitter(SPEC, overlap_tokens=0, exact=True)

    async def measure() -> None:
        for start in range(0, len(texts), BLOCK):
            await splitter.measure(texts[start : start + BLOCK])

    return lambda: asyncio.run(measure())


def intake(texts: list[str], folder: Path) -> Callable[[], object]:
    settings = load_settings()
    runs = itertools.count()

    async def run() -> None:
        stats = JobStats()
        async with EmbeddingCache(folder / f"cache-{next(runs)}.sqlite") as cache:
            dedup = Dedup(cache, SPEC, 1024, stats, scope=M3, truncating=False)
            requests_out: SendStream[list[Chunk]]
            requests_in: ReceiveStream[list[Chunk]]
            requests_out, requests_in = open_stream(64)
            stage = Intake(
                settings,
                Splitter(SPEC, overlap_tokens=0, exact=True),
                dedup,
                packer_for(settings, SPEC),
                stats,
                requests=requests_out,
                rows=_Rows(),  # type: ignore[arg-type]
            )

            async def drain() -> None:
                async for _ in requests_in:
                    pass

            async with asyncio.TaskGroup() as group:
                group.create_task(drain())
                group.create_task(stage.run(texts))

    return lambda: asyncio.run(run())


def sidecar(ids: list[str]) -> Callable[[], object]:
    vectors = np.zeros((ROWS_PER_WRITE, 1), dtype=np.float32)

    def write() -> None:
        out = io.BytesIO()
        for first in range(0, len(ids), ROWS_PER_WRITE):
            some = ids[first : first + ROWS_PER_WRITE]
            positions = np.arange(first, first + len(some), dtype=np.int64)
            batch = EmbeddedBatch(positions, vectors[: len(some)])
            _write_sidecar(out, first, some, batch)

    return write


def cpu_s(run: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def stages(folder: Path, records: int) -> Iterator[tuple[str, Callable[[], object]]]:
    path = folder / "in.jsonl"
    corpus(path, records)
    read = list(read_sources(find_sources(path)))
    texts = [str(record.item) for record in read]
    yield "read JSONL, places kept (`_Ids.feed`)", reading(path)
    yield "estimate (`Splitter.measure`)", estimating(texts)
    yield "intake, empty cache (`Intake.run`)", intake(texts, folder)
    ids = [str(record.id) for record in read]
    yield f"id sidecar, {ROWS_PER_WRITE} rows a write (`_write_sidecar`)", sidecar(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="records per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage, least kept")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"\n{args.records:,} short records, least CPU of {args.repeat} runs:\n")
        print("| stage | CPU s | s per million |")
        print("|---|---|---|")
        for name, run in stages(Path(tmp), args.records):
            seconds = cpu_s(run, args.repeat)
            print(f"| {name} | {seconds:.3f} | {seconds / args.records * 1e6:.1f} |")


if __name__ == "__main__":
    main()
