"""Received HTTP/2 header blocks: every rule h2's inbound validation applied, and the same verdict as h2 on any block."""

from __future__ import annotations

import h2.exceptions
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from laneproxy.dataplane.http2_fields import fields_error

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a.example"), (b":path", b"/x")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


def h2_refuses(headers: list[tuple[bytes, bytes]], *, request: bool, trailers: bool) -> bool:
    flags = HeaderValidationFlags(is_client=not request, is_trailer=trailers,
                                  is_response_header=not request and not trailers, is_push_promise=False)
    try:
        list(validate_headers(headers, flags))
    except h2.exceptions.ProtocolError:
        return True
    return False


MALFORMED_REQUESTS = {
    "empty name": REQUEST + [(b"", b"v")],
    "uppercase name": REQUEST + [(b"X-Lane", b"v")],
    "space in name": REQUEST + [(b"x lane", b"v")],
    "non-ascii name": REQUEST + [(b"x-\xc3\xa9", b"v")],
    "colon inside name": REQUEST + [(b"x:lane", b"v")],
    "NUL in value": REQUEST + [(b"x", b"a\x00b")],
    "CR in value": REQUEST + [(b"x", b"a\rb")],
    "LF in value": REQUEST + [(b"x", b"a\nb")],
    "leading space": REQUEST + [(b"x", b" v")],
    "trailing tab": REQUEST + [(b"x", b"v\t")],
    "connection": REQUEST + [(b"connection", b"close")],
    "keep-alive": REQUEST + [(b"keep-alive", b"5")],
    "proxy-connection": REQUEST + [(b"proxy-connection", b"x")],
    "transfer-encoding": REQUEST + [(b"transfer-encoding", b"chunked")],
    "upgrade": REQUEST + [(b"upgrade", b"h2c")],
    "te gzip": REQUEST + [(b"te", b"gzip")],
    "repeated :path": REQUEST + [(b":path", b"/y")],
    "pseudo after regular": [*REQUEST[:3], (b"x", b"v"), REQUEST[3]],
    "unknown pseudo": REQUEST + [(b":lane", b"canary")],
    "no :method": REQUEST[1:],
    "no :scheme": [REQUEST[0], *REQUEST[2:]],
    "no :path": REQUEST[:3],
    "empty :path": [*REQUEST[:3], (b":path", b"")],
    ":status in a request": [*REQUEST, (b":status", b"200")],
    ":protocol without CONNECT": [*REQUEST, (b":protocol", b"websocket")],
    "plain CONNECT with :path": [(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/")],
    "no :authority nor host": REQUEST[:2] + REQUEST[3:],
    ":authority and host differ": REQUEST + [(b"host", b"b.example")],
    "two hosts": REQUEST[:2] + REQUEST[3:] + [(b"host", b"a"), (b"host", b"a")],
}
WELL_FORMED_REQUESTS = {
    "plain": REQUEST,
    "te trailers any case": REQUEST + [(b"te", b"Trailers")],
    "host only": REQUEST[:2] + REQUEST[3:] + [(b"host", b"a.example")],
    "host equal to authority": REQUEST + [(b"host", b"a.example")],
    "plain CONNECT": [(b":method", b"CONNECT"), (b":authority", b"a:1")],
    "extended CONNECT": [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
                         (b":path", b"/ws"), (b":authority", b"a")],
    "empty value": REQUEST + [(b"x", b"")],
    "inner space in value": REQUEST + [(b"x", b"a b")],
    "split cookies": REQUEST + [(b"cookie", b"a=1"), (b"cookie", b"b=2")],
}


@pytest.mark.parametrize("headers", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_a_malformed_request_block_is_refused_here_as_h2_refused_it(headers):
    assert h2_refuses(headers, request=True, trailers=False)
    assert fields_error(headers, request=True, trailers=False) is not None


@pytest.mark.parametrize("headers", WELL_FORMED_REQUESTS.values(), ids=WELL_FORMED_REQUESTS.keys())
def test_a_well_formed_request_block_passes_here_as_in_h2(headers):
    assert not h2_refuses(headers, request=True, trailers=False)
    assert fields_error(headers, request=True, trailers=False) is None


@pytest.mark.parametrize(("headers", "malformed"), [
    (RESPONSE, False),
    ([(b"content-type", b"text/plain")], True),  # no :status
    ([*RESPONSE, (b":path", b"/")], True),  # a request's pseudo-header
    ([(b":status", b"200"), (b":status", b"204")], True),
    ([*RESPONSE, (b"Content-Length", b"1")], True),
    ([*RESPONSE, (b"transfer-encoding", b"chunked")], True),
    ([*RESPONSE, (b"x", b"a\r\nset-cookie: s=1")], True),  # response splitting
])
def test_response_blocks_need_status_and_nothing_a_request_carries(headers, malformed):
    assert h2_refuses(headers, request=False, trailers=False) == malformed
    assert (fields_error(headers, request=False, trailers=False) is not None) == malformed


@pytest.mark.parametrize("request_side", [True, False])
@pytest.mark.parametrize(("headers", "malformed"), [
    ([(b"grpc-status", b"0"), (b"grpc-message", b"")], False),
    ([(b":status", b"200")], True),
    ([(b":path", b"/")], True),
    ([(b"grpc-status", b"0"), (b"connection", b"close")], True),
    ([(b"Grpc-Status", b"0")], True),
])
def test_trailers_carry_no_pseudo_headers_and_follow_the_field_rules(headers, malformed, request_side):
    assert h2_refuses(headers, request=request_side, trailers=True) == malformed
    assert (fields_error(headers, request=request_side, trailers=True) is not None) == malformed


_names = st.one_of(st.sampled_from([b":method", b":scheme", b":authority", b":path", b":status", b":protocol", b":x",
                                    b"host", b"te", b"connection", b"cookie", b"x-a", b"X-A", b"", b"a:b", b"a b"]),
                   st.binary(max_size=6))
_values = st.one_of(st.sampled_from([b"GET", b"CONNECT", b"http", b"/", b"", b"a", b"trailers", b"TRAILERS", b"gzip",
                                     b" a", b"a\t", b"a\nb", b"200"]), st.binary(max_size=6))
_blocks = st.lists(st.tuples(_names, _values), max_size=8)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(_blocks, st.builds(lambda extra: REQUEST + extra, _blocks)), st.booleans(), st.booleans())
def test_any_block_gets_the_same_verdict_here_as_from_h2(headers, request, trailers):
    assert (fields_error(headers, request=request, trailers=trailers) is not None) == \
        h2_refuses(headers, request=request, trailers=trailers)
