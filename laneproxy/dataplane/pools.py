"""The process's upstream connection pools as one: its HTTP/1.1 pools and its HTTP/2 pools, shared by its listeners.

Owns what the admin and the stats read of an endpoint's connections (open, pending, bytes both ways,
closes by side), summed over the endpoint's HTTP/1.1 and HTTP/2 pools, so a gRPC upstream's connections
count in `/clusters` and `cluster.*.upstream_cx_*` as an HTTP/1.1 one's do; resetting the counters and
closing every pool at shutdown. It never creates a pool (reading a stat must not), and never picks one for a
request: the exchange does.
"""

from __future__ import annotations

from dataclasses import dataclass

from laneproxy.dataplane.http2_upstream import Http2Pools
from laneproxy.dataplane.upstream import UpstreamPools


@dataclass(slots=True)
class EndpointPoolNumbers:
    """One endpoint's numbers, summed over its pools."""

    open_count: int = 0
    pending: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    destroyed_local: int = 0
    destroyed_remote: int = 0


class ProcessPools:
    """Every upstream pool of this process: `http1` (UpstreamPools) and `http2` (Http2Pools)."""

    __slots__ = ("http1", "http2")

    def __init__(self, http1: UpstreamPools, http2: Http2Pools) -> None:
        self.http1 = http1
        self.http2 = http2

    def find(self, host: str, port: int) -> EndpointPoolNumbers | None:
        """The endpoint's numbers, or None if no pool of either protocol was ever used for it."""
        pools = [pool for pool in (self.http1.find(host, port), self.http2.find(host, port)) if pool is not None]
        if not pools:
            return None
        numbers = EndpointPoolNumbers()
        for pool in pools:
            numbers.open_count += pool.open_count
            numbers.pending += pool.pending
            numbers.rx_bytes += pool.rx_bytes
            numbers.tx_bytes += pool.tx_bytes
            numbers.destroyed_local += pool.destroyed_local
            numbers.destroyed_remote += pool.destroyed_remote
        return numbers

    def reset_counters(self) -> None:
        self.http1.reset_counters()
        self.http2.reset_counters()

    def close(self) -> None:
        self.http1.close()
        self.http2.close()
