"""Two nights of a LanceDB nightly job, then an ANN index and a query. Runs without a key.

    pip install 'sfembed[lance,zstd]'
    python examples/lance_nightly.py [FOLDER]

Each night runs the same ``sfembed embed`` command. Night 1 embeds a folder of gzip and zstd
JSONL shards into the table ``docs`` (with the title and url of each document carried over);
night 2 runs after 2% of the texts changed and a shard was added: with the cache, only those
texts are sent, and the table still holds one row per id. Then an IVF-PQ index is built on the
vectors and a query runs against it. Everything talks to sfembed's built-in local server (its
vectors are deterministic but carry no meaning); point ``--base-url`` and your key at
SiliconFlow for real ones.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
import tempfile
from pathlib import Path

import lancedb
import orjson
import zstandard
from lancedb.index import IvfPq

from sfembed.testing import LocalServer, synthetic_corpus

MODEL = "BAAI/bge-m3"
SHARDS, PER_SHARD = 6, 500


def write_shard(folder: Path, shard: int, texts: list[str]) -> None:
    docs = [
        {"id": f"{shard}-{n}", "text": text, "title": text[:40], "url": f"https://x/{shard}/{n}"}
        for n, text in enumerate(texts)
    ]
    data = b"".join(orjson.dumps(doc) + b"\n" for doc in docs)
    if shard % 2:
        (folder / f"part-{shard:03d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(data)
        )
    else:
        (folder / f"part-{shard:03d}.jsonl.gz").write_bytes(gzip.compress(data))


def corpus(shard: int, *, edited: bool = False) -> list[str]:
    texts = list(synthetic_corpus(PER_SHARD, seed=shard, long_every=0))
    if edited:  # one text in fifty changed overnight
        texts = [f"{t} (revised)" if n % 50 == 0 else t for n, t in enumerate(texts)]
    return texts


async def night(server: LocalServer, shards: Path, db: Path) -> None:
    """One night: the same command every night (a cron line), against the local server."""
    command = [
        *(sys.executable, "-m", "sfembed", "embed", str(shards), "--out", str(db)),
        *("--table", "docs", "--keep-fields", "title,url", "--model", MODEL, "--no-progress"),
        *("--base-url", server.url, "--api-key-env", "SFEMBED_EXAMPLE_KEY"),
        *("--rpm", "2000", "--tpm", "2000000", "--resume-or-restart"),
    ]
    env = {**os.environ, "SFEMBED_EXAMPLE_KEY": "sk-local-test"}
    job = await asyncio.create_subprocess_exec(*command, env=env)
    if await job.wait() != 0:
        raise SystemExit(f"the job failed with status {job.returncode}")


async def main(folder: Path) -> None:
    shards, db = folder / "shards", folder / "db"
    shards.mkdir(parents=True, exist_ok=True)
    for shard in range(SHARDS):
        write_shard(shards, shard, corpus(shard))
    async with LocalServer() as server:
        print("night 1")
        await night(server, shards, db)
        for shard in range(SHARDS):
            write_shard(shards, shard, corpus(shard, edited=True))
        write_shard(shards, SHARDS, corpus(SHARDS))
        print("night 2: 2% edited, one shard added")
        await night(server, shards, db)

        table = lancedb.connect(db).open_table("docs")
        rows, ids = table.count_rows(), table.to_arrow().column("id").unique()
        print(f"table docs: {rows:,} rows, {len(ids):,} ids")
        # An IVF-PQ index: 8 partitions of about 440 vectors, 1,024 dims in 64 sub-vectors.
        index = IvfPq(distance_type="cosine", num_partitions=8, num_sub_vectors=64)
        table.create_index("vector", config=index)
        probe = table.search().where("id = '3-7'").limit(1).to_list()[0]
        # The index finds candidates; refine_factor re-ranks them by their exact distance.
        hits = table.search(probe["vector"]).limit(3).refine_factor(10).to_list()
        print(f"nearest to {probe['title']!r}:")
        for hit in hits:
            print(f"  {hit['_distance']:.4f}  {hit['id']:>6}  {hit['title']!r}")


if __name__ == "__main__":
    where = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    asyncio.run(main(where))
