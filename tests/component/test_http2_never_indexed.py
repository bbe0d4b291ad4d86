"""A field a peer marked "never indexed" (RFC 7541 7.1.3) keeps that mark across the proxy, both ways.

An intermediary must forward such a field with the same representation, so no later hop's compression
table ever holds it. Both ends are the `h2` library (python-hyper) speaking real HTTP/2 to a real
`laneproxy run`; each reads the raw decoded fields, where the mark is the field's type.
"""

from __future__ import annotations

import socket

import h2.config
import h2.connection
import h2.events
from hpack import NeverIndexedHeaderTuple

from proxyrig import SWIMLANES, Http2Origin, ProxyProcess, endpoints_file


class MarkingServer(Http2Origin):
    """An HTTP/2 server (h2) that keeps each request's decoded fields and answers 200 with one field marked
    never indexed (x-reply-secret) and one not (x-reply-plain)."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[bytes, bytes]]] = []
        self.start_serving()

    def on_event(self, conn, event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests.append(list(event.headers))
            conn.send_headers(event.stream_id, [(b":status", b"200"), NeverIndexedHeaderTuple(b"x-reply-secret", b"r1"),
                                                (b"x-reply-plain", b"r2")], end_stream=True)


def call(port: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """One HTTP/2 request; the response's decoded fields as the client library hands them over."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while chunk := sock.recv(65536):
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    return list(event.headers)
            sock.sendall(conn.data_to_send())
    raise AssertionError("the connection closed before a response")


def marked(fields: list[tuple[bytes, bytes]]) -> dict[bytes, bool]:
    return {field[0]: isinstance(field, NeverIndexedHeaderTuple) for field in fields}


def test_never_indexed_fields_keep_their_mark_upstream_and_back(tmp_path):
    server = MarkingServer()
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [server.port]}})
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True).start()
    try:
        response = call(proxy.outbound_port, [
            (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"mockb:8000"), (b":path", b"/n"),
            NeverIndexedHeaderTuple(b"x-request-secret", b"s1"), (b"x-request-plain", b"s2")])
    finally:
        proxy.stop()
        server.close()
    [request] = server.requests
    assert dict(request)[b"x-request-secret"] == b"s1"
    assert marked(request)[b"x-request-secret"] and not marked(request)[b"x-request-plain"]
    assert dict(response)[b":status"] == b"200" and dict(response)[b"x-reply-secret"] == b"r1"
    assert marked(response)[b"x-reply-secret"] and not marked(response)[b"x-reply-plain"]
