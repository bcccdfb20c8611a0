"""Embed a folder of Parquet files with Ray Data into a folder of Parquet files, every actor on one
shared account quota.

    python examples/ray_parquet.py IN_DIR OUT_DIR --quota redis://HOST:6379/0 [--model M]
        [--actors 2] [--tpm 500000 --rpm 2000] [--batch-size 512]
    python examples/ray_parquet.py --demo     # made-up corpus, the local server, a private Redis

Input rows need a ``text`` column; every other column passes through. Output rows gain
``embedding`` (a fixed-size list of float32) and ``error`` (null when the row was embedded, else
why not). The API key is read by each actor from its environment (SILICONFLOW_API_KEY): on one
machine, export it before starting this script; on a cluster, set it on every node. It is never
passed as an argument, so it never lands in Ray's task metadata.

Runs on one machine with ``ray.init(num_cpus=2)``: the actors wait on the API, not on a CPU, so
each asks for half a CPU and leaves the rest to reading and writing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

import sfembed.ray
from sfembed import RateLimits, testing


def embed_folder(
    source: str, target: str, args: argparse.Namespace, blocks: int = 0, **settings: Any
) -> None:
    """Read ``source`` (Parquet), embed its ``text`` column, write ``target`` (Parquet). With
    ``blocks``, the rows are first spread over that many blocks, so that a small corpus still
    keeps every actor busy (a data lake's many files do that by themselves)."""
    rate = RateLimits(rpm=args.rpm, tpm=args.tpm, window_s=args.window_s)
    ds = ray.data.read_parquet(source)
    if blocks:
        ds = ds.repartition(blocks)
    ds = ds.map_batches(
        sfembed.ray.Embedder,
        fn_constructor_kwargs={"model": args.model, "quota": args.quota, "rate": rate, **settings},
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_cpus=0.5,
        batch_size=args.batch_size,
        batch_format="pyarrow",
    )
    ds.write_parquet(target)


def _demo_corpus(folder: Path, documents: int) -> None:
    texts = list(testing.synthetic_corpus(documents, seed=5, long_every=100))
    for part, start in enumerate(range(0, documents, 500)):
        chunk = texts[start : start + 500]
        ids = [f"doc-{i}" for i in range(start, start + len(chunk))]
        pq.write_table(pa.table({"id": ids, "text": chunk}), folder / f"part-{part:03}.parquet")


def _local_server(config: testing.ServerConfig) -> str:
    """The local server on a loop in a thread of its own (Ray blocks this one); its URL."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return asyncio.run_coroutine_threadsafe(testing.LocalServer(config).start(), loop).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", help="folder of Parquet files with a text column")
    parser.add_argument("target", nargs="?", help="folder to write Parquet files to")
    parser.add_argument("--demo", action="store_true", help="made-up corpus, local servers")
    parser.add_argument("--quota", default="", help="Redis URL of the shared quota")
    parser.add_argument("--model", default="BAAI/bge-m3")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors embedding at once")
    parser.add_argument("--batch-size", type=int, default=512, help="rows per Ray batch")
    parser.add_argument("--tpm", type=int, default=500_000, help="account tokens per window")
    parser.add_argument("--rpm", type=int, default=2_000, help="account requests per window")
    parser.add_argument("--window-s", type=float, default=60.0, help="window length, seconds")
    args = parser.parse_args()
    if not args.demo:
        if not (args.source and args.target and args.quota):
            parser.error("give IN_DIR, OUT_DIR and --quota (or --demo)")
        ray.init(num_cpus=2)
        embed_folder(args.source, args.target, args)
        return
    work = Path(tempfile.mkdtemp(prefix="sfembed-ray-"))
    (work / "in").mkdir()
    _demo_corpus(work / "in", 3_000)
    args.tpm, args.rpm, args.window_s = 150_000, 600, 6.0
    limits = testing.ModelLimits(rpm=args.rpm, tpm=args.tpm)
    url = _local_server(testing.ServerConfig(window_s=args.window_s, default_limits=limits))
    os.environ["SILICONFLOW_API_KEY"] = "sk-local-test"  # the local server's key, before Ray
    with testing.RedisServer() as redis:
        args.quota = redis.url
        ray.init(num_cpus=2)
        embed_folder(str(work / "in"), str(work / "out"), args, blocks=8, base_url=url)
        ray.shutdown()
    out = pq.read_table(work / "out")
    failed = out.num_rows - out.column("error").null_count
    print(f"{out.num_rows:,} rows in {work / 'out'}, {failed:,} of them with an error")


if __name__ == "__main__":
    main()
