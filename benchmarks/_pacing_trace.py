"""Why a 429 came: the server's sliding window at that moment beside the job's own limiter.

``bench_pacing.py --trace`` runs the server with :func:`serve_traced` (every request the quota
refused is noted with its arrival time and the server's count) and the job through
:data:`BOOT`, which notes each admission, settlement and loss of the job's limiter. Both use
``time.monotonic()`` (the event loop's clock is the same), so the two records line up.

:func:`explain` then rebuilds, for each refusal, the server's window (what it held and the
refused request) and, for every request in it, what the job's log held for it when the refused
request was admitted: its charge then (the estimate if not yet answered), or nothing if it had
already left the log.
"""

from __future__ import annotations

import asyncio
import json
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _harness import _report

from sfembed import testing

# Run as ``python -c BOOT TRACE_FILE -m sfembed ARGS...``: notes the limiter's decisions, then
# runs the command line as ``python -m sfembed ARGS...`` would.
BOOT = """
import atexit, json, runpy, sys
from sfembed import _limiter as L
path, sys.argv = sys.argv[1], sys.argv[3:]
events = []
admit, settle, refund = L.RateLimiter._admit, L.RateLimiter.settle, L.RateLimiter._refund
unanswered, limited = L.RateLimiter.unanswered, L.RateLimiter.on_rate_limited
def _admit(self, tokens, now, late_s=0.0):
    ticket = admit(self, tokens, now, late_s)
    log = self._allowance.log
    events.append(("admit", ticket.id, now, tokens, late_s, log.tokens, len(log.entries)))
    return ticket
async def _settle(self, ticket, used):
    events.append(("settle", ticket.id, self._clock.now(), used))
    await settle(self, ticket, used)
def _refund(self, ticket):
    events.append(("refund", ticket.id, self._clock.now(), 0))
    refund(self, ticket)
async def _unanswered(self, ticket):
    events.append(("unanswered", ticket.id, self._clock.now(), 0))
    await unanswered(self, ticket)
async def _limited(self, limit=None, retry_after_s=None):
    events.append(("429", "", self._clock.now(), 0))
    await limited(self, limit, retry_after_s)
L.RateLimiter._admit, L.RateLimiter.settle, L.RateLimiter._refund = _admit, _settle, _refund
L.RateLimiter.unanswered, L.RateLimiter.on_rate_limited = _unanswered, _limited
def _write():
    with open(path, "w") as out:
        json.dump(events, out)
atexit.register(_write)
runpy.run_module("sfembed", run_name="__main__", alter_sys=True)
"""


def serve_traced(config: testing.ServerConfig, conn: Connection) -> None:
    """The harness's server, with every refusal noted: (time.monotonic(), tokens, limit)."""
    from sfembed._testing import quota

    refusals: list[tuple[float, int, str]] = []
    refusal = quota.Quota.refusal

    def noted(self: quota.Quota, call: Any) -> str | None:
        limit = refusal(self, call)
        if limit is not None:
            refusals.append((time.monotonic(), call.tokens, limit))
        return limit

    quota.Quota.refusal = noted  # type: ignore[method-assign]

    async def run() -> None:
        async with testing.LocalServer(config) as server:
            conn.send(server.url)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            conn.send((_report(server.stats), refusals))

    asyncio.run(run())


def _tickets(events: list[list[Any]]) -> dict[str, dict[str, Any]]:
    tickets: dict[str, dict[str, Any]] = {}
    for kind, ident, at, *rest in events:
        if kind == "admit":
            tokens, late_s, log_tokens, log_entries = rest
            tickets[ident] = {"at": at, "charge": tokens, "late": late_s, "log": log_tokens}
            tickets[ident]["entries"] = log_entries
        elif kind != "429":
            tickets[ident].setdefault("end", (kind, at, rest[0]))
    return tickets


def _match(tickets: dict[str, dict[str, Any]], accepted: list[tuple[float, int]]) -> None:
    """Pair each request the server accepted with the settled ticket of the same count whose
    admission is the latest before its arrival and whose answer came after it."""
    settled = sorted(
        (t for t in tickets.values() if t.get("end", ("",))[0] == "settle"), key=lambda t: t["at"]
    )
    for arrival, tokens in accepted:
        for ticket in settled:
            end = ticket["end"]
            if "arrival" not in ticket and end[2] == tokens and ticket["at"] <= arrival <= end[1]:
                ticket["arrival"] = arrival
                break


def _value_at(ticket: dict[str, Any], when: float, window_s: float, unanswered_s: float) -> int:
    """What the job's log held for ``ticket`` at ``when``: its charge until answered, the
    server's count once settled, nothing once refunded or gone from the log."""
    if ticket["at"] > when:
        return 0
    kind, ended, used = ticket.get("end", ("", float("inf"), 0))
    if ended > when:
        return ticket["charge"] if when < ticket["at"] + unanswered_s else 0
    if kind == "settle":
        return used if when < ended + window_s else 0
    if kind == "refund":
        return 0
    return ticket["charge"] if when < ticket["at"] + unanswered_s else 0


def explain(
    trace: Path, accepted: list[tuple[float, int]], refusals: list[tuple[float, int, str]],
    window_s: float, tpm: int, headroom: float = 0.02, closest: int = 2,
) -> list[str]:  # fmt: skip
    """Lines that say, for each refusal and for the ``closest`` accepted requests that came
    nearest the limit, what the server's window held and what the job's log held for the same
    requests at its last admission before that moment."""
    tickets = _tickets(json.loads(trace.read_text()))
    _match(tickets, accepted)
    by_arrival = {t["arrival"]: t for t in tickets.values() if "arrival" in t}
    lines = [f"trace: {len(tickets)} admissions, {len(refusals)} refusals"]
    cases: list[tuple[float, int, str, dict[str, Any]]] = []
    for at, tokens, limit in refusals:
        # The refused ticket: the latest admitted before the refusal that no answer settled.
        refused = max(
            (t for t in tickets.values() if t["at"] <= at and t.get("end", ("",))[0] != "settle"),
            key=lambda t: t["at"],
        )
        cases.append((at, tokens, f"429 {limit}", refused))
    ends = [(arrival, _window(accepted, arrival - window_s, arrival)) for arrival, _ in accepted]
    for arrival, total in sorted(ends, key=lambda end: -end[1])[:closest]:
        if arrival in by_arrival:
            tokens = by_arrival[arrival]["end"][2]
            cases.append((arrival, tokens, f"closest ({total:,})", by_arrival[arrival]))
    for at, tokens, label, ticket in cases:
        lines += _case(tickets, accepted, by_arrival, at, tokens, label, ticket, window_s, headroom)
    return lines


def _window(accepted: list[tuple[float, int]], after: float, until: float) -> int:
    return sum(n for arrival, n in accepted if after < arrival <= until)


def _case(
    tickets: dict[str, dict[str, Any]], accepted: list[tuple[float, int]],
    by_arrival: dict[float, dict[str, Any]], at: float, tokens: int, label: str,
    ticket: dict[str, Any], window_s: float, headroom: float,
) -> list[str]:  # fmt: skip
    """The server's window just before ``at`` plus ``ticket`` (counted ``tokens``), beside the
    job's log at its last admission before ``at``."""
    unanswered_s = window_s * (1 + headroom / 2)
    last = max((t for t in tickets.values() if t["at"] <= at), key=lambda t: t["at"])
    when = last["at"]
    held = [(arrival, n) for arrival, n in accepted if at - window_s < arrival < at]
    server = sum(n for _, n in held)
    lines = [
        f"{label} at {at:.3f}: server window {server:,} + this {tokens:,} = {server + tokens:,}; "
        f"this admitted {ticket['at'] - at:+.3f} s (late {ticket['late']:.3f} s) charged "
        f"{ticket['charge']:,} (server x{tokens / max(1, ticket['charge']):.3f}); last admission "
        f"{when - at:+.3f} s, job's log then {last['log']:,} in {last['entries']} entries"
    ]
    short = gone = unmatched = 0
    in_window = {id(ticket)}
    for arrival, n in held:
        other = by_arrival.get(arrival)
        if other is None:
            unmatched += n
            continue
        in_window.add(id(other))
        value = _value_at(other, when, window_s, unanswered_s)
        if value == 0:
            gone += n
            lines.append(
                f"  not in the log: {n:,} admitted {other['at'] - at:+.3f} arrived "
                f"{arrival - at:+.3f} answered {other['end'][1] - at:+.3f}"
            )
        elif value < n:
            short += n - value
            lines.append(
                f"  in flight at {value:,}, server {n:,} (x{n / value:.3f}): admitted "
                f"{other['at'] - at:+.3f} arrived {arrival - at:+.3f} answered "
                f"{other['end'][1] - at:+.3f}"
            )
    short += max(0, tokens - ticket["charge"])
    others = (t for t in tickets.values() if id(t) not in in_window)
    slack = sum(_value_at(t, when, window_s, unanswered_s) for t in others)
    lines.append(
        f"  log under the server: {short:,} in flight (this one included), {gone:,} gone from "
        f"the log; {unmatched:,} unmatched; log entries the server no longer held: {slack:,}"
    )
    return lines
