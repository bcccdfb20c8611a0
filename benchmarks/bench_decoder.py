"""Decoding one answer: CPU microseconds per 64 x 1024 answer, base64 and float, least of repeats.

Base64 is timed twice: with the vectors in index order, and in reverse order, as the local
server answers (a client must place vectors by index, never by position).

The decoder checks every answer before a row is kept: exact integer indices, one vector per
input, the expected width, numbers only (no strings, booleans or nulls) and finite values. This
measures what that costs on the hot path::

    .venv/bin/python benchmarks/bench_decoder.py [--items 64] [--dims 1024] [--number 200]
        [--repeat 5]

CPU time (``process_time``), not wall time: on a shared machine the least of many repeats of
the process's own time is the steadiest figure.
"""

from __future__ import annotations

import argparse
import time
import timeit

import numpy as np
import orjson
import pybase64

from sfembed._decoder import decode_body


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
    args = parser.parse_args()
    vectors = np.random.default_rng(0).standard_normal((args.items, args.dims)).astype("<f4")
    print(f"| encoding | order | body bytes | us per {args.items} x {args.dims} answer |")
    print("|---|---|---|---|")
    for encoding, reverse in (("base64", False), ("base64", True), ("float", False)):
        raw = body(vectors, encoding, reverse)

        def decode(raw: bytes = raw, encoding: str = encoding) -> None:
            decode_body(raw, items=args.items, dimensions=args.dims, encoding_format=encoding)  # type: ignore[arg-type]

        times = timeit.repeat(
            decode, number=args.number, repeat=args.repeat, timer=time.process_time
        )
        seconds = min(times) / args.number
        order = "reversed" if reverse else "by index"
        print(f"| {encoding} | {order} | {len(raw):,} | {seconds * 1e6:,.0f} |")


if __name__ == "__main__":
    main()
