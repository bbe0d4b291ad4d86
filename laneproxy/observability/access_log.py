"""The access log: one entry per finished exchange, in Envoy's default format or as JSON, with its lanes.

Owns the entry's fields and both formats, and where lines go (stdout or a file). It is an exchange
observer: it reads a finished exchange and never changes it. Lines are batched and written once per
event-loop turn, so a burst of requests costs one write call. Response flags are Envoy's: the local
reply's flag (NR, UH, UF, UO, UT, UC, UPE, DPE), DC when the client left before a response, `-` otherwise.

The text format is Envoy's default line with two fields appended, the lane asked and the lane used:

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE%
    %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%
    "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"
    "<lane asked>" "<lane used>"

Byte counts are body bytes, as Envoy counts them: the request body as decoded, the response body
as proxied (or the local reply's body).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, TextIO

from laneproxy.core import headers as h
from laneproxy.observability.recorder import response_flags

if TYPE_CHECKING:
    import asyncio

    from laneproxy.observability.recorder import FinishedExchange, PassedConnectionFacts

FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """The fields of one line; names are those of Istio's JSON access log where one exists."""

    start_time: str
    method: str
    path: str
    protocol: str
    response_code: int
    response_flags: str
    bytes_received: int | None
    bytes_sent: int | None
    duration: int
    upstream_service_time: int | None
    x_forwarded_for: str | None
    user_agent: str | None
    request_id: str | None
    authority: str | None
    upstream_host: str | None
    upstream_cluster: str | None
    lane_asked: str | None
    lane_used: str | None
    lane_source: str | None
    listener: str
    requested_server_name: str | None = None  # a passed-through TLS connection's SNI




def envoy_time(epoch_seconds: float) -> str:
    """Envoy's %START_TIME% default: UTC, milliseconds, `Z`."""
    whole = int(epoch_seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % int((epoch_seconds - whole) * 1000)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def access_entry(exchange: FinishedExchange, *, wall_now: float, loop_now: float) -> AccessEntry:
    """The entry of a finished exchange; `wall_now`/`loop_now` are the same instant on both clocks."""
    routed = exchange.routed
    overrides = routed.overrides if routed is not None else {}
    headers = exchange.headers
    error = exchange.error

    def sent_or_received(name: bytes) -> str | None:
        value = overrides.get(name)
        return _text(value if value is not None else _header(headers, name))

    bytes_received = exchange.request_bytes
    bytes_sent = exchange.response_bytes if exchange.response_started else (len(error.body) if error is not None else 0)
    route = routed.route if routed is not None else None
    if routed is not None:
        path = routed.path
    else:
        path = exchange.target
    authority = overrides.get(h.HOST) or exchange.host
    request_id = routed.request_id if routed is not None and routed.request_id is not None else _header(headers, h.X_REQUEST_ID)
    return AccessEntry(
        start_time=envoy_time(wall_now - (loop_now - exchange.start)),
        method=exchange.method.decode("latin-1"),
        path=path.decode("latin-1"),
        protocol=exchange.protocol,
        response_code=exchange.response_status,
        response_flags=response_flags(exchange),
        bytes_received=bytes_received,
        bytes_sent=bytes_sent,
        duration=int((loop_now - exchange.start) * 1000),
        upstream_service_time=routed.service_time_ms if routed is not None else None,
        x_forwarded_for=sent_or_received(h.X_FORWARDED_FOR),
        user_agent=_text(_header(headers, h.USER_AGENT)),
        request_id=_text(request_id),
        authority=_text(authority),
        upstream_host=routed.endpoint.address if routed is not None else None,
        upstream_cluster=route.cluster if route is not None else None,
        lane_asked=route.lane_asked if route is not None else None,
        lane_used=route.lane_used if route is not None else None,
        lane_source=routed.lane_source.value if routed is not None and routed.lane_source is not None else None,
        listener=exchange.listener.name,
    )


def connection_entry(connection: PassedConnectionFacts, *, wall_now: float) -> AccessEntry:
    """The line of a connection passed through as TCP or TLS (no request: method, path and code are Envoy's `-`/0).

    The SNI stands where a request's authority does in the text format, as the name the client asked for.
    """
    return AccessEntry(
        start_time=envoy_time(wall_now - connection.duration), method="-", path="-",
        protocol=connection.protocol.upper(), response_code=0, response_flags=connection.flags,
        bytes_received=connection.received, bytes_sent=connection.sent, duration=int(connection.duration * 1000),
        upstream_service_time=None, x_forwarded_for=connection.client, user_agent=None, request_id=None,
        authority=connection.sni, upstream_host=connection.upstream, upstream_cluster=connection.cluster,
        lane_asked=None, lane_used=None, lane_source=None, listener=connection.listener,
        requested_server_name=connection.sni)


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def format_text(entry: AccessEntry) -> str:
    return (
        f'[{entry.start_time}] "{entry.method} {entry.path} {entry.protocol}" {entry.response_code} '
        f"{entry.response_flags} {_dash(entry.bytes_received)} {_dash(entry.bytes_sent)} {entry.duration} "
        f'{_dash(entry.upstream_service_time)} "{_dash(entry.x_forwarded_for)}" "{_dash(entry.user_agent)}" '
        f'"{_dash(entry.request_id)}" "{_dash(entry.authority)}" "{_dash(entry.upstream_host)}" '
        f'"{_dash(entry.lane_asked)}" "{_dash(entry.lane_used)}"\n'
    )


def format_json(entry: AccessEntry) -> str:
    return json.dumps(asdict(entry), separators=(",", ":")) + "\n"


class AccessLog:
    """Writes one line per finished exchange to `sink`; register `record` as an exchange observer."""

    def __init__(self, sink: TextIO, loop: asyncio.AbstractEventLoop, *, log_format: str = "text",
                 wall_clock: Callable[[], float] = time.time, close_sink: bool = False) -> None:
        if log_format not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
        self.sink = sink
        self.loop = loop
        self.format = format_json if log_format == "json" else format_text
        self.wall_clock = wall_clock
        self.close_sink = close_sink
        self.pending: list[str] = []

    @classmethod
    def open(cls, destination: str, loop: asyncio.AbstractEventLoop, *, log_format: str = "text") -> AccessLog:
        """`stdout`, `stderr` or a file path (appended to)."""
        if destination in ("stdout", "-"):
            return cls(sys.stdout, loop, log_format=log_format)
        if destination == "stderr":
            return cls(sys.stderr, loop, log_format=log_format)
        return cls(open(destination, "a", encoding="utf-8"), loop, log_format=log_format, close_sink=True)

    def record(self, exchange: FinishedExchange) -> None:
        entry = access_entry(exchange, wall_now=self.wall_clock(), loop_now=self.loop.time())
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(self.format(entry))

    def record_connection(self, connection: PassedConnectionFacts) -> None:
        """A passed-through connection's line (register as a listener's connection observer)."""
        if not connection.closed:
            return  # one line per connection, when it ends
        entry = connection_entry(connection, wall_now=self.wall_clock())
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(self.format(entry))

    def flush(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self.sink.write("".join(lines))
            self.sink.flush()

    def close(self) -> None:
        self.flush()
        if self.close_sink:
            self.sink.close()
