"""admin.exposition: the streamed /stats equals the plain renderers byte for byte, yields while it writes, and
reads the running table's clusters from a catalog built once per published table."""

from __future__ import annotations

import asyncio

import pytest

from laneproxy.admin.exposition import JsonFormat, Pacer, PrometheusFormat, Selection, TextFormat, write_stats
from laneproxy.admin.stats import reference_body
from laneproxy.core.model import Endpoint
from laneproxy.core.propagation import TraceTableCounters
from laneproxy.core.store import RouteTableStore
from laneproxy.observability.inventory import CatalogCache, ClusterCatalog, ProcessView
from laneproxy.observability.stats import ProxyStats

from .manifests import build, endpoints_body, seed_bodies

CANARY_A = "outbound|8000|canary|mocka.default.svc.cluster.local"
BASE_B = "outbound|8000|base|mockb.default.svc.cluster.local"
GONE = "outbound|8000|base|retired.default.svc.cluster.local"  # served traffic under an earlier table


def table(services: int = 3):
    bodies = seed_bodies()
    lanes = {f"default/mock{chr(ord('a') + i)}" if i < 3 else f"default/extra{i}":
             {"base": [f"10.0.{i}.1:8000", f"10.0.{i}.2:8000"][: 1 + i % 2], "canary": [f"10.0.{i}.3:8000"]}
             for i in range(services)}
    bodies["endpoints"] = endpoints_body(lanes)
    return build(bodies)


def traffic() -> ProxyStats:
    stats = ProxyStats()
    for name, codes in ((CANARY_A, {200: 3, 503: 1}), (BASE_B, {204: 2}), (GONE, {404: 1})):
        cluster = stats.cluster(name)
        cluster.rq_total = cluster.cx_total = sum(codes.values())
        cluster.rq_by_code.update(codes)
        cluster.rq_time.record(3.0)
        cluster.rq_time.record(700.0)
        cluster.host(Endpoint("10.0.0.1", 8000)).rq_total = 2
    listener = stats.listener("outbound")
    listener.rq_total, listener.cx_total, listener.cx_active = 4, 1, 1
    listener.rq_by_class.update({2: 3, 5: 1})
    listener.rq_time.record(5.0)
    stats.lanes.requests.update({"canary": 4, "base": 2})
    return stats


def view(stats: ProxyStats | None = None, services: int = 3) -> ProcessView:
    return ProcessView(stats=traffic() if stats is None else stats, table=table(services), state="LIVE",
                       uptime_seconds=3, trace_counters=TraceTableCounters(hits=2), trace_table_size=1)


class Collected:
    """Stands in for the StreamResponse: keeps every write."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.chunks.append(data)


def streamed(output: str, query: dict, process: ProcessView, slice_seconds: float = 1.0) -> tuple[str, Pacer]:
    selection = Selection.from_query(query)
    fmt = {"text": TextFormat, "prometheus": PrometheusFormat}.get(output) or (lambda: JsonFormat(process.table.version))
    pacer = Pacer(Collected(), slice_seconds)  # type: ignore[arg-type]
    asyncio.run(write_stats(fmt(), selection, process, ClusterCatalog(process.table), pacer))
    return b"".join(pacer.response.chunks).decode(), pacer  # type: ignore[union-attr]


QUERIES = [{}, {"usedonly": ""}, {"filter": "canary"}, {"filter": "canary", "invert_filter": ""},
           {"filter": "upstream_rq_(time|2)"}, {"type": "Counters"}, {"type": "Gauges", "usedonly": ""},
           {"type": "Histograms"}, {"type": "TextReadouts"}, {"filter": "^nothing-matches$"},
           {"filter": "retired", "usedonly": ""}]


@pytest.mark.parametrize("output", ["text", "json", "prometheus"])
@pytest.mark.parametrize("query", QUERIES, ids=[str(q) for q in QUERIES])
def test_streamed_stats_equal_the_plain_renderers_byte_for_byte(output, query):
    process = view()
    expected = reference_body(output, Selection.from_query(query), process, ClusterCatalog(process.table))
    assert streamed(output, query, process)[0] == expected


@pytest.mark.parametrize("output", ["text", "json", "prometheus"])
def test_a_process_without_any_cluster_streams_the_same_as_the_plain_renderers(output):
    process = ProcessView(stats=ProxyStats(), table=table(0), state="LIVE", uptime_seconds=1)
    expected = reference_body(output, Selection(), process, ClusterCatalog(process.table))
    assert streamed(output, {}, process)[0] == expected


def test_a_large_table_is_written_in_many_chunks_with_the_loop_let_run_between_them():
    process = view(services=150)  # 300 clusters
    text, pacer = streamed("prometheus", {}, process, slice_seconds=0.0)
    assert pacer.writes > 10 and pacer.yields >= pacer.writes - 1
    assert text == reference_body("prometheus", Selection(), process, ClusterCatalog(process.table))


def test_other_coroutines_run_while_a_scrape_is_written():
    process = view(services=150)
    ran_during = []

    async def scrape_and_count():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        await write_stats(TextFormat(), Selection(), process, ClusterCatalog(process.table),
                          Pacer(Collected(), 0.0))  # type: ignore[arg-type]
        ran_during.append(ticks - before)
        task.cancel()

    asyncio.run(scrape_and_count())
    assert ran_during[0] > 5


def test_catalog_is_built_once_per_published_table_and_forgotten_on_publish():
    store, cache = RouteTableStore(), CatalogCache()
    store.subscribe(cache.invalidate)
    first = table()
    store.publish(first)
    catalog = cache.catalog(store.current)
    assert cache.catalog(store.current) is catalog and cache.builds == 1
    assert CANARY_A in catalog.members and list(catalog.names) == sorted(catalog.members)
    store.publish(table(4))
    rebuilt = cache.catalog(store.current)
    assert rebuilt is not catalog and cache.builds == 2 and len(rebuilt.names) > len(catalog.names)


def test_catalog_of_another_table_is_never_served_even_without_a_publish_notice():
    cache = CatalogCache()
    one, other = table(), table(4)
    assert cache.catalog(one).table is one
    assert cache.catalog(other).table is other
