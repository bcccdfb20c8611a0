"""Does `sfembed embed`, as a user runs it, finish at the speed of the quota? Four account profiles.

    python benchmarks/bench_pacing.py [--profile tpm,rpm,faults,large,long] [--repeat 1]
        [--workdir DIR] [--trace] [--keep]
    python benchmarks/bench_pacing.py --cpu [--cpu-counts 20000,100000[,400000]] [--no-cache]
        [--repeat 1] [--workdir DIR] [--keep]

Each profile runs the local server in a process of its own, shaped like the provider: a sliding
6 s window, an answer in 30 ms + 5 ms per 1,000 tokens, and a token count of its own (about 14%
over XLM-R's on this corpus, so no client tokenizer agrees with it). The job is the command line
with its defaults (cache on, progress bar on), started as a separate process: the clock runs from
just before that process is started until it has exited, so interpreter start-up, imports,
tokenizer loading, input hashing and the last answer all count.

Per profile it prints:

* whole-run ratio: the ideal time (tokens the server accepted / TPM per second; requests / RPM per
  second for the RPM-bound profile) over the time from process start to exit;
* the share of the limit the server accepted in each whole window after the first, from the first
  accepted request;
* 429s, requests the server saw, time from process start to the first request the server saw;
* rows wrong: each row must be exactly the server's vector for its record's text, with its id;
* the job process's peak RSS and CPU time (user + system).

Profiles:

* ``tpm``: 2,000 documents (median ~150 tokens, max ~2,700, 20% Chinese), BAAI/bge-m3, 60,000 TPM
  and 200 RPM per 6 s window;
* ``rpm``: 4,000 tiny documents, BAAI/bge-large-en-v1.5, 10 RPM per 6 s window;
* ``faults``: ``tpm`` plus 3% 503, 1% 504, 1% connection resets and 0.5% answers stalled for 30 s
  (the server's draws from seed 20: 10 503s, 3 504s, 5 resets and 2 stalls in the first 317
  requests; seed 0, used before, drew no stall at all);
* ``large``: 12,000 documents of the ``tpm`` mix on 600,000 TPM and 2,000 RPM per 6 s window;
* ``long``: a model with long items (Qwen3, 32,768 tokens) on the ``tpm`` quota: 1,000 documents
  of the ``tpm`` mix and 12 of 5,000 to 22,000 words (6,600 to 29,000 tokens by the server's
  count) among them, each up to half a window in a request of its own.

With ``--shape`` every profile runs against a server of another shape, the job's flags
unchanged (the user's account as they know it), comma-separated:

* ``count=F``: the server counts F times its usual tokens (charge and ``usage``);
* ``latency=A+B``: an answer in A s + B s per 1,000 tokens; ``tail=S``: the per-token share
  log-normal with sigma S (mean kept);
* ``fixed``: a fixed window (the count starts afresh at each multiple of the window), not a
  sliding one;
* ``window=W``: a window of W s, the quota (TPM and RPM, flags and server alike) scaled by W / 6;
* ``tpm=N`` / ``rpm=N``: that quota per window (flags and server) instead of the profile's;
* ``docs=N``: N documents of the profile's kind instead of its count;
* ``limit=F``: the server's own limits are F times the flags' (the ideal is then the server's);
* ``429=P``: a share P of the requests answered with the provider's 429 (TPM) whatever the
  quota; ``retry-after=S``: 429 and 503 answers carry ``Retry-After`` (S s);
* ``concurrency=N``: the job's ``--concurrency``; ``config=PATH``: its ``--config``.

With ``--trace`` the server notes every request it refuses and the job every decision of its
limiter, and each 429 (and the two requests that came closest to the limit) is explained from
both records: see ``_pacing_trace.py``. The job then starts through a small wrapper that notes
them, so its start-up and CPU figures are not the plain command's.

With ``--cpu`` it measures instead the client CPU of the same command (defaults: cache on,
progress on; bge-m3, 1024-d base64) on unique short texts (~24 tokens) against a server with
no limits and no latency: the marginal CPU between the first and the last job size, per million
documents, so that start-up (imports, the interpreter) is left out. Each size prints the job's
peak RSS too: with a third size (``--cpu-counts 20000,100000,400000``) it shows whether memory
stays flat as the corpus grows.

Each run works in a folder of its own under ``--workdir`` (input, output, the job's cache: some
3.3 GB for the 400,000-document ``--cpu`` run), deleted once its figures are taken; with
``--trace``, or when the job failed, its logs and traces are kept there (the path printed), and
``--keep`` keeps everything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
from _harness import (
    ServerReport,
    _serve,
    max_sliding,
    remove_if_empty,
    server_process,
    table,
    tidy,
    windows,
)
from _pacing_trace import BOOT, explain, serve_traced

from sfembed import testing
from sfembed._cache import normalise

KEY = "sk-local-test"
WINDOW_S = 6.0
LATENCY_S = 0.030
LATENCY_PER_1K_S = 0.005
_WORD_LIST = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "data model vector search index query token window request limit batch order record nightly "
    "embedding corpus document server client retry quota minute second latency stream output "
    "river mountain winter library harbour engine garden market signal theory history village"
)
_WORDS = _WORD_LIST.split()
_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
)


class FaultRates(TypedDict, total=False):
    """A profile's random faults: probabilities per request (fields of testing.Faults)."""

    rate_503: float
    rate_504: float
    rate_reset: float
    rate_stall: float


class Latency(TypedDict, total=False):
    """A shape's model time (fields of testing.Faults), or none of it."""

    latency_s: float
    latency_per_1k_tokens_s: float
    latency_sigma: float


@dataclass(frozen=True)
class Profile:
    name: str
    model: str
    documents: int
    rpm: int
    tpm: int
    bound: str  # "tpm" or "rpm": which limit the ideal time is computed from
    tiny: bool = False
    faults: FaultRates = field(default_factory=FaultRates)
    latency: bool = True
    options: tuple[str, ...] = ()
    seed: int = 0  # of the server's fault draws
    long_documents: int = 0  # of 5,000 to 22,000 words, spread through the corpus


PROFILES = {
    "tpm": Profile("tpm", "BAAI/bge-m3", 2_000, rpm=200, tpm=60_000, bound="tpm"),
    "rpm": Profile(
        "rpm", "BAAI/bge-large-en-v1.5", 4_000, rpm=10, tpm=10_000_000, bound="rpm", tiny=True
    ),
    "faults": Profile(
        "faults",
        "BAAI/bge-m3",
        2_000,
        rpm=200,
        tpm=60_000,
        bound="tpm",
        faults={"rate_503": 0.03, "rate_504": 0.01, "rate_reset": 0.01, "rate_stall": 0.005},
        seed=20,
    ),
    "large": Profile("large", "BAAI/bge-m3", 12_000, rpm=2_000, tpm=600_000, bound="tpm"),
    "long": Profile(
        "long",
        "Qwen/Qwen3-Embedding-0.6B",
        1_000,
        rpm=200,
        tpm=60_000,
        bound="tpm",
        long_documents=12,
    ),
}


@dataclass(frozen=True)
class Shape:
    """How the server (and the quota the job is told) differ from a profile's: see ``--shape``."""

    token_factor: float = 1.0
    latency_s: float = LATENCY_S
    latency_per_1k_s: float = LATENCY_PER_1K_S
    latency_sigma: float = 0.0
    fixed_window: bool = False
    window_s: float = WINDOW_S
    tpm: int | None = None
    rpm: int | None = None
    documents: int | None = None
    limit_factor: float = 1.0
    rate_429: float = 0.0
    retry_after_s: float | None = None
    concurrency: int | None = None
    config: str | None = None


def parse_shape(text: str) -> Shape:
    """A :class:`Shape` from ``--shape``'s comma-separated settings; raises SystemExit naming
    one it does not know."""
    values: dict[str, object] = {}
    for part in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = part.partition("=")
        if key == "latency":
            fixed, _, per_1k = value.partition("+")
            values.update(latency_s=float(fixed), latency_per_1k_s=float(per_1k or 0))
        elif key == "fixed":
            values["fixed_window"] = True
        elif key in _SHAPE_KEYS:
            name, kind = _SHAPE_KEYS[key]
            values[name] = kind(value)
        else:
            raise SystemExit(f"--shape: unknown setting {key!r}")
    return Shape(**values)  # type: ignore[arg-type]


_SHAPE_KEYS: dict[str, tuple[str, type]] = {
    "count": ("token_factor", float),
    "tail": ("latency_sigma", float),
    "window": ("window_s", float),
    "tpm": ("tpm", int),
    "rpm": ("rpm", int),
    "docs": ("documents", int),
    "limit": ("limit_factor", float),
    "429": ("rate_429", float),
    "retry-after": ("retry_after_s", float),
    "concurrency": ("concurrency", int),
    "config": ("config", str),
}


def shaped(profile: Profile, shape: Shape) -> Profile:
    """``profile`` with the quota and corpus of ``shape`` (the quota scaled to its window)."""
    scale = shape.window_s / WINDOW_S
    tpm = shape.tpm if shape.tpm is not None else round(profile.tpm * scale)
    rpm = shape.rpm if shape.rpm is not None else round(profile.rpm * scale)
    documents = shape.documents if shape.documents is not None else profile.documents
    options = profile.options
    if shape.concurrency is not None:
        options = (*options, "--concurrency", str(shape.concurrency))
    if shape.config is not None:
        options = (*options, "--config", shape.config)
    return dataclasses.replace(profile, tpm=tpm, rpm=rpm, documents=documents, options=options)


def mixed_text(rng: random.Random) -> str:
    """A document for the TPM-bound profiles: 80% English (a word is about a token), 20%
    Chinese (a character is a token); lengths log-normal, median ~150, at most ~2,700."""
    tokens = min(2_100, max(4, int(rng.lognormvariate(4.8, 0.9))))
    if rng.random() < 0.2:
        return "".join(rng.choices(_HANZI, k=tokens))
    words = rng.choices(_WORDS, k=tokens)
    return " ".join(words).capitalize() + "."


def documents(profile: Profile) -> list[str]:
    rng = random.Random(11)
    if profile.tiny:
        return [f"item {i}: {rng.choice(_WORDS)}" for i in range(profile.documents)]
    if profile.name.startswith("cpu"):
        count = profile.documents
        return [f"record {i} on {' '.join(rng.choices(_WORDS, k=18))}." for i in range(count)]
    texts = [mixed_text(rng) for _ in range(profile.documents)]
    for number in range(profile.long_documents):
        words = rng.choices(_WORDS, k=rng.randint(5_000, 22_000))
        texts.insert(number * len(texts) // profile.long_documents, " ".join(words) + ".")
    return texts


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    exit_code: int
    report: ServerReport
    first_request_s: float
    rows_wrong: int


# The job is started by this small launcher, not by the benchmark itself: Linux carries a
# process's peak memory across exec, so a job spawned from the benchmark (which holds the corpus
# and, after a check, a whole output) would report the benchmark's peak as its own. The clock
# starts just before the fork (CLOCK_MONOTONIC is the machine's, so it compares with the server's).
_LAUNCHER = """
import json, os, sys, time
started = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
ended = time.monotonic()
with open(sys.argv[1], "w") as out:
    json.dump({"started": started, "ended": ended, "cpu_s": usage.ru_utime + usage.ru_stime,
               "maxrss_kb": usage.ru_maxrss, "exit_code": os.waitstatus_to_exitcode(status)}, out)
"""


#: What a run keeps of its folder when traced or failed: the job's output streams and figures,
#: the traces (a few MB at most); never the input, the output or the cache.
LOGS = ("stdout.txt", "stderr.txt", "launched.json", "trace.json", "server.json")


def run_profile(
    profile: Profile, texts: list[str], workdir: Path, *, trace: bool = False, keep: bool = False,
    shape: Shape = Shape(),
) -> Run:  # fmt: skip
    """One run of the job in ``workdir`` (made afresh), deleted after but for its logs when
    traced or failed, their place printed (everything, with ``keep``)."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    run: Run | None = None
    try:
        run = _run(profile, texts, workdir, trace, shape)
        return run
    finally:
        if not keep:
            logs = trace or run is None or run.exit_code != 0
            if tidy(workdir, LOGS if logs else ()):
                print(f"{profile.name}: logs kept in {workdir}", file=sys.stderr, flush=True)


def _run(profile: Profile, texts: list[str], workdir: Path, trace: bool, shape: Shape) -> Run:
    source = workdir / "in.jsonl"
    with open(source, "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + "\n")
    config = server_config(profile, shape)
    with server_process(config, serve_traced if trace else _serve) as (url, box):
        python = (sys.executable, "-c", BOOT, str(workdir / "trace.json")) if trace else ()
        command = [
            *(python or (sys.executable,)),
            *("-m", "sfembed", "embed", str(source)),
            *("--out", str(workdir / "out.npy"), "--base-url", url, "--model", profile.model),
            *("--rpm", str(profile.rpm), "--tpm", str(profile.tpm)),
            *("--window-s", str(shape.window_s)),
            *profile.options,
        ]
        env = {**os.environ, "SILICONFLOW_API_KEY": KEY}
        measured = workdir / "launched.json"
        launch = [sys.executable, "-c", _LAUNCHER, str(measured), *command]
        with open(workdir / "stdout.txt", "wb") as out, open(workdir / "stderr.txt", "wb") as err:
            subprocess.run(launch, env=env, stdout=out, stderr=err, check=True)
        job = json.loads(measured.read_text())
    report: ServerReport = box[0][0] if trace else box[0]
    if trace:
        server = {"accepted": report.accepted, "refusals": box[0][1]}
        (workdir / "server.json").write_text(json.dumps(server))
        for line in explain(workdir / "trace.json", report.accepted, box[0][1], shape.window_s,
                            server_tpm(profile, shape)):  # fmt: skip
            print(line, file=sys.stderr, flush=True)
    started = job["started"]
    first = report.first_request_at - started if report.first_request_at else float("nan")
    return Run(
        wall_s=job["ended"] - started,
        cpu_s=job["cpu_s"],
        peak_rss_mb=job["maxrss_kb"] / 1024,
        exit_code=job["exit_code"],
        report=report,
        first_request_s=first,
        rows_wrong=rows_wrong(profile.model, texts, workdir / "out.npy"),
    )


def server_config(profile: Profile, shape: Shape) -> testing.ServerConfig:
    """The local server of ``profile`` in ``shape``."""
    latency = Latency(
        latency_s=shape.latency_s,
        latency_per_1k_tokens_s=shape.latency_per_1k_s,
        latency_sigma=shape.latency_sigma,
    )
    faults = testing.Faults(
        **(latency if profile.latency else {}),
        **profile.faults,
        rate_429=shape.rate_429,
        retry_after_s=shape.retry_after_s,
        seed=profile.seed,
    )
    limits = testing.ModelLimits()
    if profile.latency:
        limits = testing.ModelLimits(rpm=server_rpm(profile, shape), tpm=server_tpm(profile, shape))
    return testing.ServerConfig(
        window_s=shape.window_s,
        default_limits=limits,
        faults=faults,
        fixed_window=shape.fixed_window,
        token_factor=shape.token_factor,
    )


def server_tpm(profile: Profile, shape: Shape) -> int:
    return max(1, int(profile.tpm * shape.limit_factor))


def server_rpm(profile: Profile, shape: Shape) -> int:
    return max(1, int(profile.rpm * shape.limit_factor))


def rows_wrong(model: str, texts: list[str], path: Path) -> int:
    """Rows that are missing, extra, or not exactly the server's vector for their text and id."""
    if not path.exists():
        return len(texts)
    rows = np.load(path, mmap_mode="r")
    ids = [json.loads(line)["id"] for line in path.with_suffix(".ids.jsonl").open()]
    wrong = abs(len(rows) - len(texts))
    for i, (row, text) in enumerate(zip(rows, texts, strict=False)):
        expected = testing.expected_embedding(model, normalise(text))
        ok = i < len(ids) and ids[i] == f"d{i}" and np.array_equal(row, expected)
        wrong += not ok
    return wrong


def summarise(profile: Profile, run: Run, shape: Shape = Shape()) -> dict[str, str]:
    """The figures of one run; limits and windows are the server's (``shape``'s)."""
    report = run.report
    tokens = sum(size for _, size in report.accepted)
    requests = len(report.accepted)
    window_s = shape.window_s
    tpm, rpm = server_tpm(profile, shape), server_rpm(profile, shape)
    limit = tpm if profile.bound == "tpm" else rpm
    ideal_s = (tokens if profile.bound == "tpm" else requests) / (limit / window_s)
    per_window = windows(report.accepted, window_s)
    shares = [(t if profile.bound == "tpm" else r) / limit for t, r in per_window[1:]]
    peak_tokens, peak_requests = max_sliding(report.accepted, window_s)
    peak = peak_tokens / tpm if profile.bound == "tpm" else peak_requests / rpm
    return {
        "whole-run ratio": f"{ideal_s / run.wall_s:.3f}",
        "wall s (ideal s)": f"{run.wall_s:.1f} ({ideal_s:.1f})",
        "windows after the first: min / mean": (
            f"{min(shares):.1%} / {statistics.fmean(shares):.1%}" if shares else "-"
        ),
        "each window": " ".join(f"{share:.0%}" for share in shares) or "-",
        "peak sliding window": f"{peak:.1%}",
        "429s": f"{report.rate_limited}",
        "requests seen": f"{report.requests:,}",
        "first request after start": f"{run.first_request_s:.2f} s",
        "rows wrong": f"{run.rows_wrong}",
        "exit code": f"{run.exit_code}",
        "peak RSS": f"{run.peak_rss_mb:.0f} MB",
        "client CPU": f"{run.cpu_s:.1f} s",
        "server tokens": f"{tokens:,}",
    }


def cpu_marginal(
    counts: list[int], options: tuple[str, ...], workdir: Path, repeat: int = 1, keep: bool = False
) -> None:
    """Client CPU of the command per million documents, from the difference of two job sizes
    (the least CPU of ``repeat`` runs of each: other work on the machine only ever adds)."""
    runs = []
    for count in counts:
        profile = Profile(
            f"cpu{count}", "BAAI/bge-m3", count, rpm=10**9, tpm=10**12, bound="tpm",
            latency=False, options=options,
        )  # fmt: skip
        texts = documents(profile)
        tries = [
            run_profile(profile, texts, workdir / f"cpu{count}", keep=keep) for _ in range(repeat)
        ]
        run = min(tries, key=lambda one: one.cpu_s)
        runs.append((count, run))
        each = ", ".join(f"{one.cpu_s:.2f}" for one in tries)
        print(f"{count:,} documents: CPU {run.cpu_s:.2f} s (of {each}), "
              f"wall {run.wall_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB, "
              f"rows wrong {run.rows_wrong}, exit {run.exit_code}", flush=True)  # fmt: skip
    (small, first), (large, last) = runs[0], runs[-1]
    per_million = (last.cpu_s - first.cpu_s) / (large - small) * 1_000_000
    print(f"marginal client CPU: {per_million:.1f} s per million documents ({' '.join(options)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="tpm,rpm,faults,large,long", help="comma-separated")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per profile (--cpu: per size, least kept)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/sfembed-bench-pacing"),
        help="folder of the runs' files, one sub-folder each (default: %(default)s)",
    )
    parser.add_argument("--cpu", action="store_true", help="measure the marginal client CPU")
    parser.add_argument(
        "--cpu-counts",
        default="20000,100000",
        help="job sizes for --cpu, comma-separated; each prints its peak RSS, and the marginal "
        "CPU is taken between the first and the last",
    )
    parser.add_argument("--no-cache", action="store_true", help="--cpu: run with --no-cache")
    parser.add_argument(
        "--trace", action="store_true", help="note the job's limiter and explain each 429"
    )
    parser.add_argument(
        "--shape",
        default="",
        help="the server's shape, comma-separated (see the module's docstring), e.g. "
        "'count=1.3,latency=0.3+0.02'; default: the profiles' own server",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep each run's folder whole (input, output, cache; gigabytes at 400,000 "
        "documents); by default only the logs of a traced or failed run are kept",
    )
    args = parser.parse_args()
    try:
        run_all(args)
    finally:
        if not args.keep:
            remove_if_empty(args.workdir)


def run_all(args: argparse.Namespace) -> None:
    if args.cpu:
        counts = [int(count) for count in args.cpu_counts.split(",")]
        options = ("--no-cache",) if args.no_cache else ()
        cpu_marginal(counts, options, args.workdir, args.repeat, args.keep)
        return
    results: list[tuple[str, dict[str, str]]] = []
    shape = parse_shape(args.shape)
    if args.shape:
        print(f"shape: {shape}", file=sys.stderr, flush=True)
    for name in args.profile.split(","):
        profile = shaped(PROFILES[name], shape)
        texts = documents(profile)
        for number in range(args.repeat):
            folder = args.workdir / f"{name}{number}"
            run = run_profile(profile, texts, folder, trace=args.trace, keep=args.keep, shape=shape)
            summary = summarise(profile, run, shape)
            results.append((f"{name}" + (f" #{number + 1}" if args.repeat > 1 else ""), summary))
            print(f"{name}: {summary}", file=sys.stderr, flush=True)
    figures = list(results[0][1])
    rows = [(figure, *(summary[figure] for _, summary in results)) for figure in figures]
    print(table(rows, ("", *(name for name, _ in results))))


if __name__ == "__main__":
    main()
