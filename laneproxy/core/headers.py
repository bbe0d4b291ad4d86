"""Every HTTP header name laneproxy reads or writes, as lowercase bytes constants.

Owns the spelling of header names; nothing else in the project writes a header name literally.
The swimlane route and trace header names are configurable and come from the route table instead.
"""

HOST = b"host"
CONNECTION = b"connection"
CONTENT_LENGTH = b"content-length"
TRANSFER_ENCODING = b"transfer-encoding"
KEEP_ALIVE = b"keep-alive"
PROXY_CONNECTION = b"proxy-connection"
TE = b"te"
TRAILER = b"trailer"
UPGRADE = b"upgrade"
BAGGAGE = b"baggage"
TRACEPARENT = b"traceparent"
CONTENT_TYPE = b"content-type"
DATE = b"date"
SERVER = b"server"
X_REQUEST_ID = b"x-request-id"
X_FORWARDED_FOR = b"x-forwarded-for"
X_FORWARDED_PROTO = b"x-forwarded-proto"

# Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded; names listed in Connection are added per message.
HOP_BY_HOP = frozenset({CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE})

DEFAULT_ROUTE_HEADER = "x-asm-prefer-tag"
DEFAULT_TRACE_HEADER = "my-request-id"
TRAFFIC_TAG_LABEL = "ASM_TRAFFIC_TAG"
