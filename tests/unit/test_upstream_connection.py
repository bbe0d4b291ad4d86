"""UpstreamConnection's lending rules, fed byte strings through its real httptools parser.

The transport here is a stand-in, and only for this: a client's backpressure pausing the upstream
read inside exactly the read that also ends a response, or a retry taking a connection from the
pool while that connection's read is still being parsed, are timings real sockets cannot produce
on demand. Everything else (parser, pool, the connection's own logic) is the real code; the wire
behaviour is covered with real sockets in tests/component/test_upstream_safety.py.
"""

from __future__ import annotations

import asyncio

import pytest

from laneproxy.core.errors import UpstreamProtocolError
from laneproxy.dataplane.upstream import UpstreamConnection, UpstreamPool


class StandInTransport:
    """Records what the connection does to its socket: pause, resume, close. No socket behind it."""

    def __init__(self) -> None:
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_reading(self) -> bool:
        return not self.paused

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default=None):
        return default  # no socket to peek at: the kernel check on take has nothing to say


class Borrower:
    """What an exchange does with a lent connection, reduced to recording and giving back."""

    pending_head = None

    def __init__(self, connection: UpstreamConnection, *, pause_on_body: bool = False, after_give_back=None) -> None:
        self.connection = connection
        self.pause_on_body = pause_on_body
        self.after_give_back = after_give_back
        self.statuses: list[int] = []
        self.body = b""
        self.complete = 0
        self.errors: list[Exception] = []

    def on_response_head(self, status, reason, headers, keep_alive) -> None:
        self.statuses.append(status)

    def on_response_body(self, data: bytes) -> None:
        self.body += data
        if self.pause_on_body:
            self.connection.transport.pause_reading()  # what DownstreamConnection.pause_writing does

    def flush_head(self) -> None:
        pass

    def on_response_complete(self) -> None:
        if self.statuses and self.statuses[-1] < 200:
            return  # a 1xx ended; the exchange keeps the connection
        self.complete += 1
        self.connection.give_back(reusable=True)
        if self.after_give_back is not None:
            self.after_give_back()

    def on_upstream_error(self, error: Exception, received_any: bool) -> None:
        self.errors.append(error)

    def pause_upstream_writes(self) -> None:
        pass

    def resume_upstream_writes(self) -> None:
        pass


@pytest.fixture
def pool():
    loop = asyncio.new_event_loop()
    yield UpstreamPool("127.0.0.1", 1, loop, connect_timeout=1.0)
    loop.close()


def lent(pool: UpstreamPool, **borrower_options) -> tuple[UpstreamConnection, StandInTransport, Borrower]:
    connection = UpstreamConnection(pool)
    transport = StandInTransport()
    connection.connection_made(transport)
    borrower = Borrower(connection, **borrower_options)
    connection.lend(borrower)
    return connection, transport, borrower


FIRST = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"


def test_a_clean_response_gives_the_connection_back_to_the_pool(pool):
    connection, transport, borrower = lent(pool)
    connection.data_received(FIRST)
    assert (borrower.body, borrower.complete, borrower.errors) == (b"first", 1, [])
    assert pool.idle == [connection] and not transport.closed


def test_a_connection_given_back_while_paused_for_backpressure_is_pooled_reading_again(pool):
    connection, transport, borrower = lent(pool, pause_on_body=True)
    connection.data_received(FIRST)
    assert borrower.complete == 1
    assert pool.idle == [connection]
    assert not transport.paused, "pooled with reading paused: idle bytes and EOF would go unnoticed"


@pytest.mark.parametrize("extra", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nset-cookie: session=EVIL\r\n\r\nEVIL",
    b"HTTP/1.1 200 OK\r\nset-cookie: session=EVIL\r\ncontent-length: 30\r\n\r\n",
    b"Set-Cookie: session=EVIL\r\n",
    b"HTTP/1.1 2",
    b"\x00",
], ids=["second-response", "head-waiting-for-body", "set-cookie-line", "half-status-line", "nul"])
def test_bytes_after_the_response_in_the_same_read_close_the_connection_and_spare_the_exchange(pool, extra):
    connection, transport, borrower = lent(pool)
    connection.data_received(FIRST + extra)
    assert (borrower.body, borrower.complete, borrower.errors) == (b"first", 1, [])
    assert pool.idle == [] and transport.closed


def test_bytes_while_idle_close_the_connection(pool):
    connection, transport, _ = lent(pool)
    connection.data_received(FIRST)
    connection.data_received(b"HTTP/1.1 200 OK\r\n")
    assert pool.idle == [] and transport.closed


def test_a_retry_in_the_same_read_never_takes_the_connection_still_being_parsed(pool):
    """A discarded 503 given back and retried at once: the rest of that read may still spoil the connection."""
    taken = []
    connection, transport, _ = lent(pool, after_give_back=lambda: taken.append(pool.take_idle()))
    connection.data_received(FIRST + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL")
    assert taken == [None]
    assert transport.closed


def test_a_1xx_and_the_final_response_in_one_read_are_one_exchange(pool):
    connection, transport, borrower = lent(pool)
    connection.data_received(b"HTTP/1.1 100 Continue\r\n\r\n" + FIRST)
    assert (borrower.statuses, borrower.body, borrower.errors) == ([100, 200], b"first", [])
    assert pool.idle == [connection]


def test_an_unterminated_header_is_cut_at_the_limit_while_it_arrives(pool):
    connection, transport, borrower = lent(pool)
    start = b"HTTP/1.1 200 OK\r\nx-endless: "
    connection.data_received(start)
    fed = len(start)
    while not borrower.errors and fed < 1 << 20:
        connection.data_received(b"a" * 1000)
        fed += 1000
    assert isinstance(borrower.errors[0], UpstreamProtocolError)
    assert pool.max_head_bytes < fed <= pool.max_head_bytes + 1000, "cut within one read past the limit"
    assert transport.closed


def test_a_head_under_the_limit_arriving_in_small_reads_is_accepted(pool):
    """The raw count of an unfinished head and the parsed count of finished lines never add up twice."""
    head = (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
            + b"".join(b"x-h%02d: %s\r\n" % (i, b"v" * 8090) for i in range(10)) + b"\r\nok")
    assert 79 * 1024 < len(head) < 80 * 1024
    connection, _, borrower = lent(pool)
    for start in range(0, len(head), 100):
        connection.data_received(head[start:start + 100])
    assert (borrower.statuses, borrower.body, borrower.errors) == ([200], b"ok", [])


def test_an_unsolicited_101_is_a_protocol_error(pool):
    connection, transport, borrower = lent(pool)
    connection.data_received(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nxx")
    assert [type(error) for error in borrower.errors] == [UpstreamProtocolError]
    assert transport.closed and pool.idle == []


def test_request_headers_sent_upstream_over_http2_keep_per_call_values_out_of_the_shared_hpack_table():
    """A value a peer may refuse (a bad grpc-timeout) must never enter the upstream connection's HPACK table:
    every later call on it would decode wrongly. Sent by the upstream connection's own h2 state (its encoder and
    settings) and read by a real h2 server, in both builds; the server's dynamic table stays empty."""
    import asyncio

    import h2.config
    import h2.connection
    import h2.events

    from laneproxy.dataplane.http2_upstream import Http2Pool, Http2UpstreamConnection

    loop = asyncio.new_event_loop()
    try:
        client = Http2UpstreamConnection(Http2Pool("127.0.0.1", 9, loop, connect_timeout=1.0)).h2
    finally:
        loop.close()
    client.initiate_connection()
    pseudo = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"mockc:50051"), (b":path", b"/Echo/Unary")]
    fields = [(b"grpc-timeout", b"zz"), (b"content-type", b"application/grpc"), (b"authorization", b"Bearer t")]
    client.send_headers(1, pseudo + fields)
    client.send_headers(3, pseudo + fields)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    requests = [event for event in server.receive_data(client.data_to_send())
                if isinstance(event, h2.events.RequestReceived)]
    assert [list(event.headers) for event in requests] == [pseudo + fields] * 2
    assert list(server.decoder.header_table.dynamic_entries) == []
    assert server.decoder.header_table_size == 0  # the first block said so: nothing is owed when the server shrinks it
