"""HTTP/1.1 message heads on raw bytes: serialising request and response heads, chunk framing, dates.

Owns the wire format written by laneproxy. Parsing is httptools' (llhttp, strict); this module only
writes. Header names are handled lowercase, as Envoy forwards them.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Iterable, Mapping

from laneproxy.core import headers as h

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def connection_tokens(value: bytes) -> set[bytes]:
    """Header names listed in a Connection header value (hop-by-hop for this message only)."""
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def write_headers(
    parts: list[bytes],
    header_list: Iterable[tuple[bytes, bytes]],
    skip: frozenset[bytes] | set[bytes],
    overrides: Mapping[bytes, bytes],
) -> None:
    """Append `name: value\\r\\n` for every header not skipped or overridden, then the overrides."""
    for name, value in header_list:
        if name in skip or name in overrides:
            continue
        parts += (name, b": ", value, CRLF)
    for name, value in overrides.items():
        parts += (name, b": ", value, CRLF)


def chunk(data: bytes) -> list[bytes]:
    return [b"%x\r\n" % len(data), data, CRLF]


class DateCache:
    """The HTTP Date header value, formatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


def response_head(status: int, header_pairs: Iterable[tuple[bytes, bytes]], reason: bytes | None = None) -> bytes:
    parts = [b"HTTP/1.1 %d " % status, reason or reason_phrase(status), CRLF]
    for name, value in header_pairs:
        parts += (name, b": ", value, CRLF)
    parts.append(CRLF)
    return b"".join(parts)


def local_reply(status: int, body: bytes, *, date: bytes, server: bytes, close: bool, extra=()) -> bytes:
    """A complete response written by the proxy itself, shaped like Envoy's local replies."""
    pairs = [(h.CONTENT_LENGTH, b"%d" % len(body))]
    if body:
        pairs.append((h.CONTENT_TYPE, b"text/plain"))
    pairs += [(h.DATE, date), (h.SERVER, server), *extra]
    if close:
        pairs.append((h.CONNECTION, b"close"))
    return response_head(status, pairs) + body
