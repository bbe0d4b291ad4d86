"""What the admin server may see and do of the running proxy: a small interface, not the app object.

Owns the shape (`RunningProxy`, `ListenerControl`, `PoolNumbers`) the admin endpoints read and
call: the table store, the counters, the listeners' names, addresses and active requests, drain and
resume, quit. `laneproxy.app.ProxyApp` satisfies it structurally; tests may hand in anything that
does. It never imports the app, the data plane or the control plane (an import-linter contract
checks this), and holds no state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from laneproxy.core.balance import OutlierDetector
    from laneproxy.core.model import Route
    from laneproxy.core.propagation import TraceLaneTable
    from laneproxy.core.store import RouteTableStore
    from laneproxy.observability.istio import IstioMetrics
    from laneproxy.observability.stats import ListenerStats, ProxyStats
    from laneproxy.settings import ProxySettings


class RoleRoutes(Protocol):
    def static_routes(self) -> tuple[Route, ...]: ...


class ListenerControl(Protocol):
    """One listener as admin sees it: named, addressed, counted, drainable."""

    @property
    def name(self) -> str: ...
    @property
    def address_tag(self) -> str: ...
    @property
    def role(self) -> RoleRoutes: ...
    @property
    def stats(self) -> ListenerStats: ...

    def active_requests(self) -> int: ...
    def drain(self, *, close_idle: bool = True) -> None: ...
    def resume(self) -> None: ...


class PoolNumbers(Protocol):
    """One endpoint's connection pool numbers."""

    @property
    def open_count(self) -> int: ...


class Pools(Protocol):
    """The process's upstream pools, HTTP/1.1 and HTTP/2 summed per endpoint."""

    def find(self, host: str, port: int) -> PoolNumbers | None: ...  # None: no pool was ever used for it
    def reset_counters(self) -> None: ...


class RunningProxy(Protocol):
    """Everything admin endpoints read of, and do to, the running proxy."""

    @property
    def settings(self) -> ProxySettings: ...
    @property
    def store(self) -> RouteTableStore: ...
    @property
    def stats(self) -> ProxyStats: ...
    @property
    def istio(self) -> IstioMetrics: ...
    @property
    def traces(self) -> TraceLaneTable: ...
    @property
    def outliers(self) -> OutlierDetector: ...
    @property
    def pools(self) -> Pools: ...
    @property
    def listeners(self) -> Sequence[ListenerControl]: ...
    @property
    def bound(self) -> dict[str, int]: ...  # listener name -> the port it bound (port 0 asked: the one it got)
    @property
    def started_at(self) -> float: ...
    @property
    def state(self) -> str: ...  # LIVE, DRAINING, PRE_INITIALIZING (Envoy's server.state)

    healthcheck_failed: bool
    draining: bool

    def quit(self) -> None: ...
    def drain_listeners(self) -> None: ...
