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
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def connection_tokens(value: bytes) -> set[bytes]:
    """Header names listed in a Connection header value (hop-by-hop for this message only).

    Framing headers and Host are left out whatever the value says (headers.CONNECTION_CANNOT_REMOVE).
    """
    tokens = {token.strip().lower() for token in value.split(b",")}
    tokens.discard(b"")
    return tokens - h.CONNECTION_CANNOT_REMOVE


def header_value(header_list: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lowercase), or None."""
    for key, value in header_list:
        if key == name:
            return value
    return None


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


def write_response_headers(parts: list[bytes], header_list: list[tuple[bytes, bytes]],
                           overrides: Mapping[bytes, bytes], dropped: frozenset[bytes] = h.NOT_FORWARDED) -> bool:
    """One pass over an upstream response's headers: drop `dropped` (hop-by-hop and per-hop ones), apply
    overrides; True if it has a length.

    A Connection header that names other headers (rare: nearly always `keep-alive` or `close`) makes
    those hop-by-hop too, and the head is written again with them skipped.
    """
    start = len(parts)
    has_length = False
    named: set[bytes] | None = None
    hop_by_hop = dropped
    for name, value in header_list:
        if name in hop_by_hop:
            if name == h.CONNECTION and value not in _PLAIN_CONNECTION:
                tokens = connection_tokens(value) - hop_by_hop
                if tokens:
                    named = tokens if named is None else named | tokens
            continue
        if name == h.CONTENT_LENGTH:
            has_length = True
        if name not in overrides:
            parts += (name, b": ", value, CRLF)
    if named is not None:
        del parts[start:]
        write_headers(parts, header_list, hop_by_hop | named, overrides)
        return has_length
    for name, value in overrides.items():
        parts += (name, b": ", value, CRLF)
    return has_length


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
