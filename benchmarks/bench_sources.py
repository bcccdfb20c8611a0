"""Reading and the LanceDB sink: records per second from plain, gzip and zstd JSONL (one file and
a folder of shards), and rows per second upserted into a LanceDB table. Prints Markdown tables.

    .venv/bin/python benchmarks/bench_sources.py [--records N] [--rows N]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import importlib
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import orjson
import zstandard

from sfembed._lance import LanceWriter
from sfembed._sources import read_records
from sfembed._types import EmbeddedBatch


def corpus(records: int) -> bytes:
    return b"".join(
        orjson.dumps({"id": f"doc-{n}", "text": f"short text number {n} about rivers"}) + b"\n"
        for n in range(records)
    )


def best_of(runs: int, read: Callable[[], Iterable[object]]) -> tuple[float, int]:
    """(best seconds, records) of ``runs`` full reads."""
    best, count = float("inf"), 0
    for _ in range(runs):
        start = time.perf_counter()
        count = sum(1 for _ in read())
        best = min(best, time.perf_counter() - start)
    return best, count


def reading(folder: Path, records: int) -> None:
    data = corpus(records)
    (folder / "plain.jsonl").write_bytes(data)
    (folder / "docs.jsonl.gz").write_bytes(gzip.compress(data, compresslevel=6))
    (folder / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    shards = folder / "shards"
    shards.mkdir()
    lines = data.splitlines(keepends=True)
    for shard in range(8):
        part = b"".join(lines[shard::8])
        (shards / f"part-{shard}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(part))
    print(f"\nReading {records:,} JSONL records (best of 3):\n")
    print("| input | MB on disk | s | records/s |")
    print("|---|---|---|---|")
    for name in ("plain.jsonl", "docs.jsonl.gz", "docs.jsonl.zst", "shards"):
        path = folder / name
        size = (
            sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
        )
        seconds, count = best_of(3, functools.partial(read_records, path))
        assert count == records
        label = "8 zstd shards" if name == "shards" else name
        print(f"| {label} | {size / 1e6:.1f} | {seconds:.2f} | {count / seconds:,.0f} |")


def lance(folder: Path, rows: int, dims: int = 1024, batch: int = 512) -> None:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    importlib.import_module("lancedb")
    imported = time.perf_counter() - start
    print(f"\nLanceDB sink: {rows:,} rows of {dims} float32, batches of {batch}:\n")
    print("| run | s | rows/s |")
    print("|---|---|---|")
    print(f"| import lancedb | {imported:.2f} | |")
    for run in ("first (inserts)", "second (updates every id)"):
        start = time.perf_counter()
        with LanceWriter(folder / "vectors.lance", dims=dims, keep_fields=("title",)) as writer:
            for first in range(0, rows, batch):
                count = min(batch, rows - first)
                vectors = rng.random((count, dims), dtype=np.float32)
                ids = [f"doc-{n}" for n in range(first, first + count)]
                positions = np.arange(first, first + count)
                writer.write(ids, EmbeddedBatch(positions, vectors), kept=[("t",)] * count)
        seconds = time.perf_counter() - start
        print(f"| {run} | {seconds:.2f} | {rows / seconds:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500_000, help="JSONL records to read")
    parser.add_argument("--rows", type=int, default=100_000, help="rows to write to LanceDB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        reading(Path(folder), args.records)
        lance(Path(folder), args.rows)


if __name__ == "__main__":
    main()
