"""The provider's error answers (bodies and content types) and the rejection of an invalid
request."""

from __future__ import annotations

import orjson

JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


def _provider_error(code: int, message: str) -> bytes:
    return orjson.dumps({"code": code, "message": message, "data": None})


def _rate_limited(limit: str) -> bytes:
    message = (
        "Request was rejected due to rate limiting. If you want more, please contact "
        f"contact@siliconflow.cn. Details:{limit} limit reached."
    )
    return orjson.dumps({"message": message, "data": None})


_INVALID = _provider_error(20015, "The parameter is invalid. Please check again.")
NO_MODEL = _provider_error(20012, "Model does not exist. Please check it carefully.")
_OVERLOADED = _provider_error(50505, "Model service overloaded. Please try again later.")
OVER_TPM = _rate_limited("TPM")
OVER_RPM = _rate_limited("RPM")
NOT_FOUND = b"404 page not found"
_GATEWAY_TIMEOUT = b"upstream request timeout"
_HTML = "text/html; charset=utf-8"
_BAD_GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
REDIRECT_TO = "https://api.example.com/v1/embeddings"

# (status, body, content type) of the outcomes that need nothing from the request.
STATIC: dict[str, tuple[int, bytes, str]] = {
    "400": (400, _INVALID, JSON),
    "model": (400, NO_MODEL, JSON),
    "401": (401, b'"Invalid token"', JSON),
    "403": (403, b'"Forbidden"', JSON),
    "404": (404, NOT_FOUND, TEXT),
    "429-tpm": (429, OVER_TPM, JSON),
    "429-rpm": (429, OVER_RPM, JSON),
    "503": (503, _OVERLOADED, JSON),
    "504": (504, _GATEWAY_TIMEOUT, TEXT),
    "405": (405, b"405 method not allowed", TEXT),
    "redirect": (301, b"", TEXT),
    "html-502": (502, _BAD_GATEWAY_PAGE, _HTML),
    "html-200": (200, _BAD_GATEWAY_PAGE, _HTML),
    "error-200": (200, _OVERLOADED, JSON),
    "429-hour": (429, OVER_TPM, JSON),
    "429-date": (429, OVER_TPM, JSON),
}


class Reject(ValueError):
    """An invalid request: ``status`` and ``body`` are the answer, the message says why."""

    def __init__(self, reason: str, status: int = 400, body: bytes = _INVALID) -> None:
        super().__init__(reason)
        self.status = status
        self.body = body


def batch_too_large(items: int, maximum: int) -> Reject:
    message = f"input batch size {items} > maximum allowed batch size {maximum}"
    return Reject(message, 413, _provider_error(20042, message))
