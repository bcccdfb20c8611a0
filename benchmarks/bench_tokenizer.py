"""Exact token counting speed per bundled tokenizer family, against a 10M TPM quota.

For short (~100 characters) and long (~5,000 characters) English and Chinese documents it
measures, per family, tokens/s and documents/s of:

* ``fast 1t``: ``ExactCounter.count`` (``encode_batch_fast``, no offsets) in one thread, with the
  tokenizers' own Rayon parallelism off (TOKENIZERS_PARALLELISM=false);
* ``offsets 1t``: the same with ``encode_batch`` (offsets computed), the API the brief names;
* ``async 2t``: ``count_async`` over a 2-thread executor (Rayon off: the threads are the
  parallelism), as the pipeline counts;
* ``rayon``: ``ExactCounter.count`` with Rayon on (its default), one Python thread;

and the character-class estimator for comparison (in characters/s: its counts are inflated).
10,000,000 tokens per minute is 166,667 tokens/s; ``x quota`` is how many times faster than that
the async counting is::

    .venv/bin/python benchmarks/bench_tokenizer.py [--seconds 1.0]
"""

# ruff: noqa: RUF001  (Chinese text is written with its own full-width punctuation)

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from sfembed._estimator import CharClassEstimator
from sfembed._tokenizers import FAMILIES, ExactCounter, bundled_tokenizer, count_async

QUOTA_TPS = 10_000_000 / 60
FAMILY_NAMES = ("qwen3", "xlmr", "bert-en", "bert-zh")
ENGLISH = [
    "Embedding models map sentences to vectors so that similar meanings end up close together",
    "The committee met on Tuesday to review the budget for the coming fiscal year",
    "Researchers found that sleep quality strongly predicts memory recall in older adults",
    "If the request fails with a rate limit error, wait a few seconds and try again",
    "Customers reported that the mobile application crashed whenever they uploaded photos",
    "Climate scientists warn that glaciers in the Alps may lose half their volume by 2050",
]
CHINESE = [
    "今天天气很好，我们一起去公园散步吧",
    "人工智能技术正在深刻地改变医疗、教育和金融等多个行业",
    "长江是中国最长的河流，全长约六千三百公里",
    "随着城市化进程的加快，交通拥堵问题日益严重",
    "研究人员发现，适量运动可以有效降低患心脏病的风险",
    "向量检索系统会把文本转换成向量，再根据相似度排序",
    "如果接口返回错误代码，请稍等片刻后重新尝试",
    "春节是中国最重要的传统节日，家家户户都会团聚在一起",
]


def documents(pool: Sequence[str], size: int, count: int, seed: int, sep: str) -> list[str]:
    """``count`` distinct documents of about ``size`` characters, shuffled from ``pool``."""
    rng = random.Random(seed)
    docs = []
    for number in range(count):
        parts, length = [str(number)], 0
        while length < size:
            part = rng.choice(pool).strip()
            parts.append(part)
            length += len(part) + 1
        docs.append(sep.join(parts)[:size])
    return docs


def timed(run: Callable[[], object], seconds: float) -> float:
    """Median seconds per call of ``run`` over about ``seconds`` of calls, after a warm-up call.
    The median, because this machine is shared: other processes only ever slow a call down."""
    run()
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(durations) < 3:
        start = time.perf_counter()
        run()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def rayon(enabled: bool) -> None:
    # tokenizers reads this variable at each batch call.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"


def measure(
    counter: ExactCounter, docs: list[str], pool: ThreadPoolExecutor, seconds: float
) -> dict[str, float]:
    """Seconds per pass over ``docs`` for each mode of the module docstring."""
    tokenizer = counter.tokenizer
    rayon(False)
    results = {
        "fast 1t": timed(lambda: counter.count(docs), seconds),
        "offsets 1t": timed(
            lambda: tokenizer.encode_batch(docs, add_special_tokens=False), seconds
        ),
        "async 2t": timed(lambda: asyncio.run(count_async(counter, docs, pool)), seconds),
    }
    rayon(True)
    results["rayon"] = timed(lambda: counter.count(docs), seconds)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args(argv)
    kinds = {
        "en short": documents(ENGLISH, 100, 4000, 1, ". "),
        "en long": documents(ENGLISH, 5000, 200, 2, ". "),
        "zh short": documents(CHINESE, 100, 4000, 3, "。"),
        "zh long": documents(CHINESE, 5000, 200, 4, "。"),
    }
    modes = ("fast 1t", "offsets 1t", "async 2t", "rayon")
    print(f"cores: {os.cpu_count()}; quota 10M TPM = {QUOTA_TPS:,.0f} tokens/s\n")
    header = f"{'family':8} {'docs':9} {'tok/doc':>7} " + " ".join(f"{m:>19}" for m in modes)
    print(header + f" {'x quota':>8}")
    print(" " * 27 + " ".join(f"{'tok/s':>10} {'doc/s':>8}" for _ in modes))
    with ThreadPoolExecutor(2) as pool:
        for family in FAMILY_NAMES:
            counter = ExactCounter(bundled_tokenizer(FAMILIES[family]))
            for kind, docs in kinds.items():
                tokens = sum(counter.count(docs))
                times = measure(counter, docs, pool, args.seconds)
                cells = " ".join(
                    f"{tokens / t:>10,.0f} {len(docs) / t:>8,.0f}" for t in times.values()
                )
                ratio = tokens / times["async 2t"] / QUOTA_TPS
                print(f"{family:8} {kind:9} {tokens / len(docs):>7.0f} {cells} {ratio:>8.1f}")
        print()
        for named in (*FAMILY_NAMES, None):
            estimator = CharClassEstimator(family=named)
            for kind, docs in kinds.items():
                took = timed(functools.partial(estimator.count, docs), args.seconds)
                chars = sum(map(len, docs))
                print(
                    f"estimator {named or 'any':8} {kind:9} {chars / took / 1e6:>7.1f} M chars/s "
                    f"{len(docs) / took:>9,.0f} doc/s"
                )


if __name__ == "__main__":
    main()
