"""The rules a received HTTP/2 header block must follow (RFC 9113 8.2 and 8.3), checked in one compiled pass.

Owns what `h2`'s inbound validation checked (its `validate_headers` pipeline, which both HTTP/2 codecs now
turn off because it was a tenth of the CPU of a proxied stream), rule for rule, so a block `h2` refused
is refused here: field names non-empty, lowercase, without controls, spaces, DEL or non-ASCII, and with a
colon only as a pseudo-header's first character; values without NUL, CR or LF and not starting or ending
with a space or tab; no connection-specific field (connection, proxy-connection, keep-alive,
transfer-encoding, upgrade); `te` only as `trailers`; pseudo-headers known, not repeated, before every
regular field, never in trailers, and the right ones for a request (:method, and :scheme and :path unless
it is a plain CONNECT; no :status; :protocol only with CONNECT) or a response (:status, nothing a request
carries); a request's :authority or Host present, equal when both are, Host at most once; :path not empty.

`fields_error` returns what is wrong (the codecs end the connection with PROTOCOL_ERROR, as `h2` did) or
None. Must never: change, reorder or join fields (the codecs join cookies), or know what a route is.
"""

from __future__ import annotations

from typing import Sequence

CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"})
PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":status", b":protocol"})
REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_COLON, _SPACE, _TAB = 0x3A, 0x20, 0x09
_TE, _TRAILERS, _HOST = b"te", b"trailers", b"host"
_METHOD, _SCHEME, _AUTHORITY, _PATH, _STATUS, _PROTOCOL = (b":method", b":scheme", b":authority", b":path", b":status",
                                                           b":protocol")


def _name_error(name: bytes) -> str | None:
    if not name:
        return "a field name is empty"
    for position, c in enumerate(name):
        if 0x41 <= c <= 0x5A:
            return f"uppercase field name {name!r}"
        if c <= 0x20 or c >= 0x7F:
            return f"illegal character in field name {name!r}"
        if c == _COLON and position:
            return f"':' inside field name {name!r}"
    return None


def _value_error(value: bytes) -> str | None:
    if not value:
        return None
    if b"\x00" in value or b"\r" in value or b"\n" in value:
        return f"NUL, CR or LF in field value {value!r}"
    first, last = value[0], value[-1]
    if first == _SPACE or first == _TAB or last == _SPACE or last == _TAB:
        return f"field value surrounded by whitespace {value!r}"
    return None


def fields_error(headers: Sequence[tuple[bytes, bytes]], *, request: bool, trailers: bool) -> str | None:
    """What makes this received block malformed, or None. `request`: a client's block (else a server's)."""
    pseudo: set[bytes] = set()
    regular_seen = False
    method: bytes | None = None
    authority: bytes | None = None
    host: bytes | None = None
    for name, value in headers:
        error = _name_error(name)
        if error is None:
            error = _value_error(value)
        if error is not None:
            return error
        if name[0] == _COLON:
            if name in pseudo:
                return f"repeated pseudo-header {name!r}"
            pseudo.add(name)
            if regular_seen:
                return f"pseudo-header {name!r} after a regular field"
            if name not in PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name == _METHOD:
                method = value
            elif name == _AUTHORITY:
                authority = value
            elif name == _PATH and not value and request and not trailers:
                return "empty :path"
            continue
        regular_seen = True
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific field {name!r}"
        if name == _TE and value.lower() != _TRAILERS:
            return f"te other than trailers: {value!r}"
        if name == _HOST and request and not trailers:
            if host is not None:
                return "more than one Host"
            host = value
    if trailers:
        return f"pseudo-headers in trailers: {sorted(pseudo)!r}" if pseudo else None
    if not request:
        if _STATUS not in pseudo:
            return "a response without :status"
        if pseudo & REQUEST_PSEUDO:
            return f"request pseudo-headers in a response: {sorted(pseudo & REQUEST_PSEUDO)!r}"
        return None
    if _METHOD not in pseudo:
        return "a request without :method"
    connect = method == b"CONNECT"
    if not (connect and _PROTOCOL not in pseudo):  # all but a plain CONNECT carry :scheme and :path
        if _SCHEME not in pseudo or _PATH not in pseudo:
            return "a request without :scheme or :path"
    elif _SCHEME in pseudo or _PATH in pseudo:
        return "a plain CONNECT with :scheme or :path"
    if _STATUS in pseudo:
        return "a request with :status"
    if not connect and _PROTOCOL in pseudo:
        return ":protocol without CONNECT"
    if authority is None and host is None:
        return "a request without :authority or Host"
    if authority is not None and host is not None and authority != host:
        return "a request whose :authority and Host differ"
    return None
