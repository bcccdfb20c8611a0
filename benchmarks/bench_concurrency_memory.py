"""Does a small job's memory depend on the concurrency it is given? 100 short documents.

    python benchmarks/bench_concurrency_memory.py [--documents 100] [--concurrency 16,1000,5000]

For each concurrency a fresh interpreter starts the local server in-process and runs
``sfembed.embed`` on N short unique documents (bge-m3, 1,024 dimensions, base64, limits far above
anything reached), then reports its peak RSS (``ru_maxrss``) and its RSS before the job. The
reorder ring used to allocate its whole capacity (4 x concurrency x batch items rows) up front;
its arrays now follow the rows in flight, so the peak should not grow with the concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys

MODEL = "BAAI/bge-m3"
KEY = "sk-local-test"


async def _job(documents: int, concurrency: int) -> dict[str, float]:
    import sfembed
    from sfembed.testing import LocalServer

    async with LocalServer() as server:
        settings = sfembed.load_settings(
            base_url=server.url, rate=sfembed.RateLimits(rpm=10**7, tpm=10**10)
        )
        async with sfembed.EmbeddingClient(api_key=KEY, base_url=server.url) as client:
            before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rows = await sfembed.embed(
                [f"document {n} about rivers and engines" for n in range(documents)],
                model=MODEL,
                settings=settings,
                client=client,
                concurrency=concurrency,
            )
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert rows.shape == (documents, 1024)
    return {"before_mb": before_kb / 1024, "peak_mb": peak_kb / 1024}


def child_main(documents: int, concurrency: int) -> None:
    print(json.dumps(asyncio.run(_job(documents, concurrency))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--concurrency", default="16,1000,5000", help="comma-separated")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(*args.child)
        return
    print("| concurrency | documents | RSS before the job MB | peak RSS MB |")
    print("|---|---|---|---|")
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        child = [sys.executable, __file__, "--child", str(args.documents), str(concurrency)]
        figures = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
        print(
            f"| {concurrency:,} | {args.documents:,} | {figures['before_mb']:.0f} "
            f"| {figures['peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
