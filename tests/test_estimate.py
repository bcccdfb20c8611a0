"""The dry run counts the requests the job will send: it packs with the job's own packer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import orjson
import pytest
from hostile import KEY, write_lines

from sfembed import DEFAULT_CATALOG, EmbeddingClient, IOSettings, RateLimits, load_settings
from sfembed._estimate import dry_run
from sfembed._job import run_job
from sfembed.testing import LocalServer, synthetic_corpus


@pytest.mark.parametrize(
    ("model", "long_every", "tpm"),
    [
        ("BAAI/bge-m3", 0, 500_000),  # the defaults: requests capped at 1/32 of the quota
        ("BAAI/bge-m3", 0, 100_000_000),  # a large quota: the batch caps decide
        ("BAAI/bge-large-en-v1.5", 25, 500_000),  # long texts cut into pieces
    ],
)
async def test_a_dry_run_counts_the_requests_the_job_sends(
    server: LocalServer, tmp_path: Path, model: str, long_every: int, tpm: int
) -> None:
    # Texts of some hundreds of tokens: 64 of them are more than a request may hold at the
    # default limits, so the token cap, not the item cap, closes requests.
    texts = list(synthetic_corpus(2400, seed=8, long_every=long_every * 6, long_chars=6000))
    joined = [" ".join(texts[i : i + 6]) for i in range(0, len(texts), 6)]
    lines = [orjson.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(joined)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    settings = load_settings(
        model=model,
        base_url=server.url,
        io=IOSettings(cache=False),
        rate=RateLimits(tpm=tpm, rpm=10**7),
    )
    plan = dry_run(source, settings, DEFAULT_CATALOG[model], 0.0)

    async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
        await run_job(source, tmp_path / "out.npy", settings, client=client)

    assert plan.records == 400
    answered = server.stats.by_status[200]
    if not long_every:
        assert plan.requests == server.stats.requests == answered
    else:
        # The chunker cuts at sentence ends, and the server refuses a few near-limit pieces
        # (each then halved and sent again): neither can be known without sending.
        assert abs(plan.requests - answered) <= 0.05 * answered
    assert dataclasses.asdict(plan)["tokens"] > 0
