"""Decoding one answer: CPU microseconds per 64 x 1024 answer, base64 and float, least of repeats.

Base64 is timed twice: with the vectors in index order, and in reverse order, as the local
server answers (a client must place vectors by index, never by position).

The decoder checks every answer before a row is kept: exact integer indices, one vector per
input, the expected width, numbers only (no strings, booleans or nulls) and finite values. This
measures what that costs on the hot path::

    .venv/bin/python benchmarks/bench_decoder.py [--items 64] [--dims 1024] [--number 200]
        [--repeat 5] [--cold]

CPU time (``process_time``), not wall time: on a shared machine the least of many repeats of
the process's own time is the steadiest figure. Decoded again and again, one answer stays in
the processor's caches, which a job's answers do not (a job decodes each answer once, among
everything else it does): ``--cold`` writes 4 MiB of other memory and copies the body afresh
before each decode, and prints the median of ``--number`` x ``--repeat`` single decodes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import numpy as np
import orjson
import pybase64

from sfembed._decoder import decode_body
from sfembed._types import EncodingFormat


def body(vectors: np.ndarray, encoding: str, reverse: bool = False) -> bytes:
    data = [
        {
            "object": "embedding",
            "embedding": pybase64.b64encode_as_string(row.tobytes())
            if encoding == "base64"
            else row,
            "index": index,
        }
        for index, row in enumerate(vectors)
    ]
    if reverse:
        data.reverse()
    usage = {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
    payload = {"object": "list", "model": "m", "data": data, "usage": usage}
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="vectors per answer (64)")
    parser.add_argument("--dims", type=int, default=1024, help="values per vector (1024)")
    parser.add_argument("--number", type=int, default=200, help="decodes per repeat (200)")
    parser.add_argument("--repeat", type=int, default=5, help="repeats, least kept (5)")
    parser.add_argument(
        "--cold", action="store_true", help="caches emptied before each decode; median shown"
    )
    args = parser.parse_args()
    vectors = np.random.default_rng(0).standard_normal((args.items, args.dims)).astype("<f4")
    kind = "median, caches emptied" if args.cold else "least"
    print(f"| encoding | order | body bytes | us per {args.items} x {args.dims} answer ({kind}) |")
    print("|---|---|---|---|")
    runs: tuple[tuple[EncodingFormat, bool], ...] = (
        ("base64", False),
        ("base64", True),
        ("float", False),
    )
    for encoding, reverse in runs:
        raw = body(vectors, encoding, reverse)

        def decode(raw: bytes = raw, encoding: EncodingFormat = encoding) -> None:
            decode_body(raw, items=args.items, dimensions=args.dims, encoding_format=encoding)

        if args.cold:
            seconds = _cold(raw, encoding, args)
        else:
            times = timeit.repeat(
                decode, number=args.number, repeat=args.repeat, timer=time.process_time
            )
            seconds = min(times) / args.number
        order = "reversed" if reverse else "by index"
        print(f"| {encoding} | {order} | {len(raw):,} | {seconds * 1e6:,.0f} |")


def _cold(raw: bytes, encoding: EncodingFormat, args: argparse.Namespace) -> float:
    """Median CPU seconds of single decodes, each after the caches were filled with other data
    and the body copied afresh (as the HTTP client hands over a body it has just joined)."""
    other = np.zeros(4 << 20, dtype=np.uint8)
    times = []
    for _ in range(args.number * args.repeat):
        other += 1
        fresh = bytes(bytearray(raw))
        started = time.thread_time()
        decode_body(fresh, items=args.items, dimensions=args.dims, encoding_format=encoding)
        times.append(time.thread_time() - started)
    return statistics.median(times)


if __name__ == "__main__":
    main()
