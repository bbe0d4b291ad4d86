"""Local replies: the one place a typed error becomes the response the proxy answers itself, for every codec.

Owns the shape of Envoy's local replies: status, `content-type: text/plain` body, `date`, `server`,
the mesh marks (`x-laneproxy-failed-hop` on an outbound listener's 5xx, `x-laneproxy-not-forwarded`
when nothing went further), and for a gRPC request (`content-type: application/grpc...`) Envoy's
"trailers-only" answer: HTTP 200 with `grpc-status` and `grpc-message` in the headers and no body
(Envoy's HTTP->gRPC status mapping: no route 12 UNIMPLEMENTED; no healthy upstream, connect failure,
overflow and the route timeout, a caller's `grpc-timeout` included, 14 UNAVAILABLE, as real Envoy 1.40
answers them in tests/component/test_grpc_local_replies.py). `LocalReply` is codec
neutral (status, headers, body); `http1` serialises it for HTTP/1.1 and `h2_headers` gives the
HTTP/2 header block. It never decides whether a request fails, never counts and never writes to a socket.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence
from urllib.parse import quote

from laneproxy.core import headers as h
from laneproxy.core.errors import LocalReplyError
from laneproxy.dataplane.codec import response_head

GRPC_CONTENT_TYPE = b"application/grpc"
GRPC_STATUS = b"grpc-status"
GRPC_MESSAGE = b"grpc-message"

# grpc/doc/statuscodes.md
OK, UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = (
    0, 2, 4, 7, 12, 13, 14, 16)

# Envoy's Grpc::Utility::httpToGrpcStatus (and the gRPC spec's HTTP to gRPC status table).
_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED,
                 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}


class LocalReply(NamedTuple):
    """A response written by the proxy: its status, its headers (no framing or connection headers), its body."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    grpc: bool = False  # a trailers-only gRPC answer: the status is in the headers, the body is empty


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A gRPC request: its content-type is application/grpc, maybe with a +codec or parameters."""
    for name, value in headers:
        if name == h.CONTENT_TYPE:
            return value[:16].lower() == GRPC_CONTENT_TYPE
    return False


def grpc_status(error: LocalReplyError) -> int:
    """The gRPC status Envoy answers a gRPC caller for this failure (a route timeout's 504 too: 14, not 4)."""
    return _HTTP_TO_GRPC.get(error.status, UNKNOWN)


def build(error: LocalReplyError, *, date: bytes, server: bytes, grpc: bool = False,
          marks: Sequence[tuple[bytes, bytes]] = ()) -> LocalReply:
    """The reply to `error`; `marks` are the mesh headers the listener adds (see the module docstring)."""
    body = error.body.encode()
    if grpc:
        headers = [(h.CONTENT_TYPE, GRPC_CONTENT_TYPE), (GRPC_STATUS, b"%d" % grpc_status(error))]
        if body:
            # grpc-message is percent-encoded (the gRPC HTTP/2 spec); Envoy writes the local reply's body there.
            headers.append((GRPC_MESSAGE, quote(error.body, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()))
        headers += [(h.DATE, date), (h.SERVER, server), *marks]
        return LocalReply(200, headers, b"", True)
    headers = [(h.CONTENT_LENGTH, b"%d" % len(body))]
    if body:
        headers.append((h.CONTENT_TYPE, b"text/plain"))
    headers += [(h.DATE, date), (h.SERVER, server), *marks]
    return LocalReply(error.status, headers, body)


def marks(error: LocalReplyError, *, about_later_hop: bool, edge_of_mesh: bool = False) -> tuple[tuple[bytes, bytes], ...]:
    """The mesh's marks on a local reply: whose failure it is (outbound listeners), and that nothing went on
    (never at the edge of the mesh: the gateway's clients are not proxies that could replay)."""
    flag = error.flag.encode()
    found: tuple[tuple[bytes, bytes], ...] = ()
    if error.status >= 500 and about_later_hop:
        found = ((h.X_LANEPROXY_FAILED_HOP, flag),)
    if error.forwarded_nothing and not edge_of_mesh:
        found += ((h.X_LANEPROXY_NOT_FORWARDED, flag),)
    return found


def http1(reply: LocalReply, *, close: bool) -> bytes:
    """The whole HTTP/1.1 response; a gRPC reply says `content-length: 0` (its status is in the headers)."""
    headers = reply.headers
    if reply.grpc:
        headers = [(h.CONTENT_LENGTH, b"0"), *headers]
    if close:
        headers = [*headers, (h.CONNECTION, b"close")]
    return response_head(reply.status, headers) + reply.body


def h2_headers(reply: LocalReply) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header block of the reply (`:status` first); its body, if any, goes in DATA frames."""
    return [(b":status", b"%d" % reply.status), *reply.headers]
