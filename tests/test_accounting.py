"""Every record accounted for: embedded rows + entries in the errors file = records in the input,
whatever mix of bad lines and server faults a job meets. A failed record keeps its row (NaN), and
its entry names its line, its id and the cause. Against LocalServer over real HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np
import orjson
import pytest

from sfembed import (
    BatchLimits,
    EmbeddingClient,
    IOSettings,
    RateLimits,
    RetryPolicy,
    Timeouts,
    load_settings,
)
from sfembed._job import run_job
from sfembed.testing import Faults, LocalServer, ServerConfig, expected_embedding

KEY = "sk-local-test"
VL = "Qwen/Qwen3-VL-Embedding-8B"
HUGE = 100 * 2**20  # a 100 MB line


def line(**fields: object) -> bytes:
    return orjson.dumps(fields)


def bad_lines(folder: Path) -> dict[int, tuple[bytes, str]]:
    """Bad records by the 1-based line they go on: (raw line, a word its reason must hold)."""
    photo = folder / "photo.png"
    photo.write_bytes(b"\x89PNG not really, but readable")
    return {
        3: (b'{"id": "broken", "text": ', "malformed JSON"),
        10: (line(id="no-text", body="words"), "missing text field"),
        17: (line(id="empty", text=""), "empty text"),
        24: (line(id="number", text=42), "not a string"),
        31: (b'{"id": "latin1", "text": "caf\xe9"}', "invalid UTF-8"),
        38: (b'{"id": "nul", "text": "a\x00b"}', "NUL"),
        45: (line(id="escaped-nul", text="a\u0000b"), "NUL"),
        52: (b'{"id": "huge", "text": "' + b"x" * HUGE + b'"}', "longer than"),
        59: (line(id="lost-photo", image=str(folder / "missing.png")), "cannot read image"),
        66: (line(id="refused", image="abcde"), "invalid"),  # the server refuses it, alone too
    }


#: Lines whose id cannot be read: their errors-file entry has a null id (never a made-up one).
UNPARSED = {3, 31, 38, 52}


def write_input(folder: Path, count: int) -> tuple[Path, list[str | None]]:
    """``count`` records, good ones interleaved with the bad; the text of each good one."""
    bad = bad_lines(folder)
    texts: list[str | None] = []
    path = folder / "in.jsonl"
    with open(path, "wb") as out:
        for number in range(1, count + 1):
            if number in bad:
                out.write(bad[number][0] + b"\n")
                texts.append(None)
            else:
                texts.append(f"record {number} of the mixed corpus")
                out.write(line(id=f"r{number}", text=texts[-1]) + b"\n")
    return path, texts


class ErrorEntry(TypedDict):
    """The fields of an errors-file line read here (a job over one input, whole records)."""

    id: str | None
    line: int
    reason: str


def read_errors(path: Path) -> list[ErrorEntry]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


@pytest.mark.parametrize("seed", [1, 2])
async def test_rows_plus_errors_equal_records_under_bad_input_and_faults(
    tmp_path: Path, seed: int
) -> None:
    source, texts = write_input(tmp_path, 400)
    faults = Faults(rate_503=0.03, rate_504=0.01, rate_reset=0.01, seed=seed)
    out = tmp_path / "out.npy"
    async with LocalServer(ServerConfig(faults=faults)) as server:
        settings = load_settings(
            model=VL,
            base_url=server.url,
            rate=RateLimits(rpm=10**7, tpm=10**10),
            retry=RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05),
            timeouts=Timeouts(read_s=5.0),
            batch=BatchLimits(max_items=8),
            io=IOSettings(image_field="image", cache=False),
        )
        async with EmbeddingClient(api_key=KEY, base_url=server.url) as client:
            summary = await run_job(source, out, settings, client=client)
        assert server.stats.by_status[503] + server.stats.resets > 0  # faults did happen
    rows = np.load(out)
    errors = read_errors(Path(f"{out}.errors.jsonl"))
    embedded = int((~np.isnan(rows).any(axis=1)).sum())
    assert len(rows) == len(texts) == summary.records
    assert embedded + len(errors) == len(texts)  # the invariant
    assert summary.failed == len(errors)
    bad = bad_lines(tmp_path)
    assert sorted(entry["line"] for entry in errors) == sorted(bad)
    for entry in errors:
        assert bad[entry["line"]][1] in entry["reason"], entry
        assert entry["id"] is None if entry["line"] in UNPARSED else entry["id"]
        assert np.isnan(rows[entry["line"] - 1]).all()  # row i is still record i
    for number, text in enumerate(texts):
        if text is not None:
            np.testing.assert_allclose(rows[number], expected_embedding(VL, text), atol=1e-6)
