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
EXPECT = b"expect"
CONTENT_TYPE = b"content-type"
DATE = b"date"
SERVER = b"server"
X_REQUEST_ID = b"x-request-id"
X_FORWARDED_FOR = b"x-forwarded-for"
X_FORWARDED_PROTO = b"x-forwarded-proto"
USER_AGENT = b"user-agent"

# Envoy's own headers (source/common/http/headers.h); a gateway strips every X_ENVOY_PREFIX header a client sends.
X_ENVOY_PREFIX = b"x-envoy-"
X_ENVOY_UPSTREAM_SERVICE_TIME = b"x-envoy-upstream-service-time"
X_ENVOY_EXPECTED_RQ_TIMEOUT_MS = b"x-envoy-expected-rq-timeout-ms"
X_ENVOY_UPSTREAM_RQ_TIMEOUT_MS = b"x-envoy-upstream-rq-timeout-ms"
X_ENVOY_MAX_RETRIES = b"x-envoy-max-retries"
X_ENVOY_ATTEMPT_COUNT = b"x-envoy-attempt-count"
X_ENVOY_RETRY_ON = b"x-envoy-retry-on"

# laneproxy's own: on a 5xx, "a later hop failed, not the one that answers" (value: that failure's Envoy
# response flags, `-` for a 5xx the later hop's app returned); callers' outlier detection skips it.
X_LANEPROXY_FAILED_HOP = b"x-laneproxy-failed-hop"
# On a local reply for a request the proxy never sent on (no healthy upstream, connect failure, overflow):
# the caller may send it elsewhere whatever its method, as it would after its own connect failure.
X_LANEPROXY_NOT_FORWARDED = b"x-laneproxy-not-forwarded"

# Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded; names listed in Connection are added per message.
HOP_BY_HOP = frozenset({CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE})

# Never made hop-by-hop by naming them in Connection (`Connection: keep-alive, Content-Length`): the token
# is ignored and the message keeps its framing and Host, as Envoy does. Removing them would leave a body
# the next hop reads as a second, unseen request (smuggling), or an HTTP/1.1 request without Host.
CONNECTION_CANNOT_REMOVE = frozenset({CONTENT_LENGTH, TRANSFER_ENCODING, HOST})

DEFAULT_ROUTE_HEADER = "x-asm-prefer-tag"
DEFAULT_TRACE_HEADER = "my-request-id"
TRAFFIC_TAG_LABEL = "ASM_TRAFFIC_TAG"

# laneproxy's own per-hop headers, consumed by the next proxy and never passed on by it.
# The workload a sidecar speaks for, sent upstream on requests and back on responses (Istio's
# metadata exchange, as one plain header): each side's metrics can then name the other.
X_LANEPROXY_PEER = b"x-laneproxy-peer"
# The opt-in "where did this request go" header: on a request, asks for the hops (the gateway accepts
# it only with the configured token); on a response, lists them as `service:lane-asked>lane-used`.
X_LANEPROXY_ROUTE = b"x-laneproxy-route"
# Hop-by-hop headers and laneproxy's per-hop ones: what a proxy never forwards as it received it (it
# writes its own value of a per-hop header where it has one, so a client cannot forge either).
NOT_FORWARDED: frozenset[bytes] = HOP_BY_HOP | {X_LANEPROXY_PEER, X_LANEPROXY_ROUTE}
# The mesh-internal failure marks: meant for the callers inside the mesh, so the gateway never sends them on
# to its own clients (nor puts them on its local replies).
MESH_MARKS: frozenset[bytes] = frozenset({X_LANEPROXY_FAILED_HOP, X_LANEPROXY_NOT_FORWARDED})
NOT_FORWARDED_TO_CLIENTS: frozenset[bytes] = NOT_FORWARDED | MESH_MARKS
