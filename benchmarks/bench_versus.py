"""sfembed against openai-python and langchain-openai: one corpus, one rate-limited server.

    python benchmarks/bench_versus.py [--documents 9000] [--windows 5] [--window-s 6] [--cap-s 300]

Each client embeds the same corpus (short and medium documents only, so that none needs
splitting) against a fresh local server in its own process that enforces the same RPM/TPM over a
sliding window, and runs in a fresh process of its own (its peak RSS is its own):

* sfembed: ``embed(...)`` given the same limits, ``errors="nan"``;
* openai-python: ``AsyncOpenAI`` with its defaults (2 retries), batches of 64 under
  ``asyncio.gather`` and ``Semaphore(16)``, a failed batch caught and its rows counted lost;
* langchain-openai: ``OpenAIEmbeddings(check_embedding_ctx_length=False, chunk_size=64)
  .aembed_documents`` with its defaults otherwise.

TPM is the corpus's server-counted tokens / ``--windows``, so a client at the limit needs that
many windows; RPM does not bind. Every row is checked against the server's vector for its text
(atol 1e-5); a missing row is lost. Prints a Markdown table and draws accepted tokens per second
(and 429s) for each client to ``benchmarks/versus.png``. Needs ``openai``, ``langchain-openai``
and ``matplotlib`` (benchmark-only).
"""

from __future__ import annotations

import argparse
import time
from importlib import metadata
from pathlib import Path

from _harness import max_sliding, table, windows
from _versus_clients import (
    MODEL,
    RUNNERS,
    Job,
    Outcome,
    ServerLog,
    client_process,
    sampled_server,
)

from sfembed import DEFAULT_CATALOG, testing

PICTURE = Path(__file__).with_name("versus.png")
SEED = 2


def _corpus_tokens(documents: int) -> int:
    spec = DEFAULT_CATALOG[MODEL]
    corpus = testing.synthetic_corpus(documents, seed=SEED, long_every=0)
    return sum(testing.count_tokens(text, spec) for text in corpus)


def _run(client: str, args: argparse.Namespace, rpm: int, tpm: int) -> tuple[Outcome, ServerLog]:
    limits = testing.ModelLimits(rpm=rpm, tpm=tpm)
    config = testing.ServerConfig(window_s=args.window_s, default_limits=limits)
    with sampled_server(config) as (url, box):
        job = Job(client, url, args.documents, SEED, rpm, tpm, args.window_s, args.cap_s)
        outcome = client_process(job)
    return outcome, box[0]


def _origin(outcome: Outcome, log: ServerLog) -> float:
    """The run's first request as the server saw it (the client's start if it saw none)."""
    firsts = [t for t, _ in log.accepted[:1]] + log.limited_at[:1]
    return min(firsts) if firsts else outcome.started


def _row(outcome: Outcome, log: ServerLog, tpm: int, window_s: float) -> tuple[str, ...]:
    shares = [tokens / tpm for tokens, _ in windows(log.accepted, window_s)[1:]]
    accepted = sum(tokens for _, tokens in log.accepted)
    overall = accepted / (tpm * outcome.wall_s / window_s)
    peak, _ = max_sliding(log.accepted, window_s)
    sent = sum(log.by_status.values())
    lost = f"{outcome.lost:,}"
    if outcome.misplaced:
        lost += f" + {outcome.misplaced:,} misplaced"
    return (
        outcome.client,
        f"{outcome.wall_s:.1f} s",
        f"{sum(shares) / len(shares):.1%} / {min(shares):.1%}" if shares else "-",
        f"{overall:.1%}",
        f"{peak / tpm:.1%}",
        f"{len(log.limited_at):,} of {sent:,}",
        lost,
        f"{outcome.rss_mb:.0f}" if outcome.rss_mb else "-",
        _verdict(outcome),
    )


def _verdict(outcome: Outcome) -> str:
    """How the run ended, in a few words."""
    if outcome.error is not None:
        ended = f"raised {outcome.error}"
        return ended + ("; no rows" if not outcome.returned else "")
    failed = outcome.notes.get("failed_batches")
    if failed:
        errors = "/".join(outcome.notes.get("errors", {}))
        return f"returned; {failed} of {outcome.notes['batches']} batches raised {errors}"
    if outcome.lost or outcome.misplaced:
        return "returned, with bad rows"
    return "returned, every row correct"


def _details(outcome: Outcome, log: ServerLog) -> tuple[str, ...]:
    notes = ", ".join(f"{key}={value}" for key, value in outcome.notes.items())
    swapped = f"{outcome.swapped:,} of {outcome.misplaced:,}" if outcome.misplaced else "-"
    return (
        outcome.client,
        f"{outcome.returned:,}",
        swapped,
        str(dict(sorted(log.by_status.items()))),
        notes or "-",
    )


def _picture(runs: list[tuple[Outcome, ServerLog]], tpm: int, window_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    span = max(outcome.finished - _origin(outcome, log) for outcome, log in runs)
    edges = np.arange(0, int(span) + 2)
    figure, axes = plt.subplots(
        len(runs), 1, figsize=(10, 2.6 * len(runs) + 0.6), sharex=True, squeeze=False
    )
    for ax, (outcome, log) in zip(axes[:, 0], runs, strict=True):
        origin = _origin(outcome, log)
        times = np.array([t - origin for t, _ in log.accepted])
        sizes = np.array([size for _, size in log.accepted], dtype=float)
        per_s, _ = np.histogram(times, bins=edges, weights=sizes)
        ax.set_ylim(0, max(float(per_s.max(initial=0)), tpm / window_s) * 1.7)
        ax.grid(axis="y", alpha=0.3)
        ax.bar(edges[:-1], per_s, width=1.0, align="edge", color="tab:blue", alpha=0.8,
               label="tokens accepted per second")  # fmt: skip
        ax.axhline(tpm / window_s, color="black", linestyle="--", linewidth=1,
                   label=f"TPM limit ({tpm / window_s:,.0f} tokens/s)")  # fmt: skip
        ax.axvline(outcome.finished - origin, color="tab:green", linewidth=1.2,
                   label=f"client done ({outcome.wall_s:.1f} s wall)")  # fmt: skip
        limited, _ = np.histogram(np.array(log.limited_at) - origin, bins=edges)
        twin = ax.twinx()
        marks = limited > 0
        twin.plot(edges[:-1][marks] + 0.5, limited[marks], "x", color="tab:red", markersize=5,
                  label=f"429s per second ({len(log.limited_at):,} in all)")  # fmt: skip
        twin.set_ylim(0, max(10, int(limited.max(initial=0) * 1.15) + 1))
        twin.set_ylabel("429s / s", color="tab:red")
        twin.tick_params(axis="y", colors="tab:red")
        ax.set_title(
            f"{outcome.client}: {_verdict(outcome)}; {outcome.lost:,} rows lost, "
            f"{outcome.misplaced:,} misplaced",
            fontsize=10,
            loc="left",
        )
        ax.set_ylabel("tokens / s")
        handles = ax.get_legend_handles_labels()
        extra = twin.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the run's first request (1 s bins)")
    axes[-1, 0].set_xlim(0, edges[-1])
    figure.suptitle(
        f"Same corpus, same server limits (TPM {tpm:,} per {window_s:g} s sliding window); "
        "each panel has its own y scale",
        fontsize=11,
    )
    figure.tight_layout()
    figure.savefig(PICTURE, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--documents", type=int, default=9000)
    parser.add_argument("--windows", type=float, default=5.0, help="TPM = corpus tokens / this")
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--rpm", type=int, default=100_000, help="requests per window")
    parser.add_argument("--cap-s", type=float, default=300.0, help="time cap per client")
    parser.add_argument("--clients", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    args = parser.parse_args()

    total = _corpus_tokens(args.documents)
    tpm = int(total / args.windows)
    versions = {name: metadata.version(name) for name in ("openai", "langchain-openai")}
    print(
        f"\n{args.documents:,} documents (synthetic_corpus seed={SEED}, long_every=0), "
        f"{total:,} tokens as the server counts them; limits per {args.window_s:g} s sliding "
        f"window: TPM {tpm:,}, RPM {args.rpm:,}; cap {args.cap_s:g} s per client. "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
    )
    runs = []
    for client in args.clients:
        began = time.monotonic()
        outcome, log = _run(client, args, args.rpm, tpm)
        print(f"  {client}: {time.monotonic() - began:.1f} s", flush=True)
        runs.append((outcome, log))

    print()
    header = (
        "client",
        "wall time",
        "TPM share, windows 2..n (mean / min)",
        "TPM used over the wall time",
        "peak sliding window / TPM",
        "429s of answers",
        "rows lost",
        "peak RSS MB",
        "outcome",
    )
    print(table([_row(outcome, log, tpm, args.window_s) for outcome, log in runs], header))
    print(
        f"\nTPM used over the wall time = tokens accepted / (TPM x wall / {args.window_s:g} s); "
        "a run shorter than two windows can pass 100%, since the server's window starts empty "
        "and the first one admits a full TPM at once."
    )
    print()
    more = ("client", "rows returned", "misplaced in own 64-block", "answers", "client notes")
    print(table([_details(outcome, log) for outcome, log in runs], more))
    _picture(runs, tpm, args.window_s)
    print(f"\npicture: {PICTURE}")


if __name__ == "__main__":
    main()
