"""Typed errors of laneproxy, each carrying the HTTP status, Envoy response flag and body of its local reply.

Owns the mapping from failure to (status, flag, body). It never formats an HTTP response itself:
the data plane's local reply module does that, from these attributes only.
"""

from __future__ import annotations

from dataclasses import dataclass

_RESET_PREFIX = "upstream connect error or disconnect/reset before headers. reset reason: "
_RETRIED_PREFIX = "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: "


class LaneProxyError(Exception):
    """Base of every error laneproxy raises on purpose."""


class LocalReplyError(LaneProxyError):
    """A request-level failure answered by the proxy itself instead of an upstream."""

    status: int = 500
    flag: str = "-"
    body: str = ""
    forwarded_nothing: bool = False  # the request never went further: safe to send elsewhere, whatever its method

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.body or self.flag)
        self.detail = detail

    def after_retries(self) -> LocalReplyError:
        """The same failure once the retry limit is spent: Envoy adds URX to the flags and says it retried."""
        self.flag = f"URX,{self.flag}"
        if self.body.startswith(_RESET_PREFIX):
            self.body = _RETRIED_PREFIX + self.body[len(_RESET_PREFIX):]
        return self

    def with_cause(self, cause: BaseException) -> LocalReplyError:
        """Chain a translated third-party exception when the error is handed on rather than raised."""
        self.__cause__ = cause
        return self


class NoRouteError(LocalReplyError):
    status, flag, body = 404, "NR", ""


class NoHealthyUpstreamError(LocalReplyError):
    status, flag, body = 503, "UH", "no healthy upstream"
    forwarded_nothing = True


class UpstreamConnectError(LocalReplyError):
    status, flag, body = 503, "UF", _RESET_PREFIX + "connection failure"
    forwarded_nothing = True


class UpstreamResetError(LocalReplyError):
    status, flag, body = 503, "UC", _RESET_PREFIX + "connection termination"


class UpstreamOverflowError(LocalReplyError):
    status, flag, body = 503, "UO", _RESET_PREFIX + "overflow"
    forwarded_nothing = True


class UpstreamTimeoutError(LocalReplyError):
    status, flag, body = 504, "UT", "upstream request timeout"


class UpstreamProtocolError(LocalReplyError):
    status, flag, body = 502, "UPE", _RESET_PREFIX + "protocol error"


class StreamIdleTimeoutError(LocalReplyError):
    """Nothing moved on a request for the stream idle timeout, after the request was complete."""

    status, flag, body = 504, "SI", "stream timeout"


class RequestTimeoutError(LocalReplyError):
    """The client did not finish sending its request (head or body) in time."""

    status, flag, body = 408, "SI", "request timeout"


class EgressBlockedError(LocalReplyError):
    """A host outside the mesh under the REGISTRY_ONLY outbound traffic policy: Istio's BlackHoleCluster
    answers 502 with a direct response (no response flag); the body says why."""

    status, flag, body = 502, "-", "egress to a host outside the mesh is blocked (outbound traffic policy REGISTRY_ONLY)"


class DownstreamProtocolError(LocalReplyError):
    status, flag, body = 400, "DPE", "Bad Request"


class HeadersTooLargeError(DownstreamProtocolError):
    status, body = 431, "Request Header Fields Too Large"


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration input: where (file and dotted field path) and why."""

    source: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.reason}"


class ConfigInvalidError(LaneProxyError):
    """A configuration was rejected; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
