"""A SiliconFlow-compatible embeddings server on 127.0.0.1, for tests, benchmarks and demos.

:class:`LocalServer` answers ``POST /v1/embeddings`` over real HTTP with the provider's statuses,
error bodies and ``x-siliconcloud-trace-id`` header. It returns deterministic unit vectors
(:func:`expected_embedding` computes the same arrays), counts tokens with its own deterministic
tokenizer (:func:`count_tokens`), enforces per-model RPM/TPM limits over a sliding window, and
misbehaves on demand, randomly with a seed (:class:`Faults`) or scripted
(:meth:`LocalServer.inject`), so a client's retries, pacing and ordering can be tested without a
network or an API key::

    async with LocalServer(ServerConfig(limits={"BAAI/bge-m3": ModelLimits(rpm=60)})) as server:
        ...  # point a client at server.url with the key "sk-local-test"

Only ``sfembed._models`` (the catalogue) and ``sfembed._types`` (wire types) come from the engine,
so the server stays an independent judge of what a client sends. Its parts live in the private
package ``sfembed._testing``, one module each; this module offers their public names.
"""

from ._corpus import synthetic_corpus
from ._testing.expected import WireItem, count_tokens, expected_embedding
from ._testing.redis_server import RedisServer
from ._testing.server import LocalServer, serve
from ._testing.settings import (
    IMAGE_TOKENS,
    INJECT_KINDS,
    TRACE_HEADER,
    Faults,
    ModelLimits,
    ServerConfig,
    ServerStats,
)

__all__ = [
    "IMAGE_TOKENS",
    "INJECT_KINDS",
    "TRACE_HEADER",
    "Faults",
    "LocalServer",
    "ModelLimits",
    "RedisServer",
    "ServerConfig",
    "ServerStats",
    "WireItem",
    "count_tokens",
    "expected_embedding",
    "serve",
    "synthetic_corpus",
]
