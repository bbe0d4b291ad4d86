"""/config_dump: the running configuration, in Envoy's ConfigDump shape plus laneproxy's swimlane section.

Owns how the running RouteTable reads to tools that know Envoy: a BootstrapConfigDump (node, admin
address), a ClustersConfigDump (every lane cluster with its endpoints and their lane labels), a
ListenersConfigDump, and a `laneproxy.admin.v1.SwimLaneConfigDump` with the lanes, groups and
fallbacks (the /lanes document), the table's version and the count of accepted and rejected updates.
`?resource=` picks one section by its short name (`clusters`, `listeners`, `swimlanes`, `bootstrap`).
"""

from __future__ import annotations

import json
import time

from laneproxy.admin import web
from laneproxy.admin.endpoint import AdminEndpoint, context, text
from laneproxy.admin.lanes import lanes_document
from laneproxy.admin.listeners import listener_addresses
from laneproxy.core.headers import TRAFFIC_TAG_LABEL
from laneproxy.observability.inventory import cluster_members

_TYPE = "type.googleapis.com/"


def rfc3339(epoch_seconds: float) -> str:
    whole = int(epoch_seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + ".%03dZ" % int((epoch_seconds - whole) * 1000)


def _socket(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def config_dump_document(proxy, table_updated_at: float) -> dict:
    table = proxy.store.current
    version = table.version
    updated = rfc3339(table_updated_at)
    settings = proxy.settings
    dynamic = settings.source != "files"
    static = tuple(route for listener in proxy.listeners for route in listener.role.static_routes())
    clusters = []
    for name, endpoints in sorted(cluster_members(table, static).items()):
        lb_endpoints = []
        for endpoint in endpoints:
            entry = {"endpoint": {"address": _socket(endpoint.host, endpoint.port)}}
            lane = endpoint.labels.get(TRAFFIC_TAG_LABEL)
            if lane is not None:
                entry["metadata"] = {"filter_metadata": {"istio": {"lane": lane}}}
            lb_endpoints.append(entry)
        cluster = {"@type": _TYPE + "envoy.config.cluster.v3.Cluster", "name": name, "type": "STATIC",
                   "connect_timeout": f"{settings.timeouts.connect:g}s",
                   "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}}
        clusters.append({"version_info": version, "cluster": cluster, "last_updated": updated})
    listeners = [{"listener": {"@type": _TYPE + "envoy.config.listener.v3.Listener", "name": name,
                               "address": _socket(host, port)}, "last_updated": rfc3339(proxy.started_at)}
                 for name, host, port in listener_addresses(proxy)]
    admin = settings.admin
    bootstrap = {"node": {"id": "", "cluster": "", "user_agent_name": "laneproxy"},
                 "admin": {"address": _socket(admin.host, proxy.bound.get("admin", admin.port))} if admin else {}}
    error = proxy.store.last_error
    return {"configs": [
        {"@type": _TYPE + "envoy.admin.v3.BootstrapConfigDump", "bootstrap": bootstrap,
         "last_updated": rfc3339(proxy.started_at)},
        {"@type": _TYPE + "envoy.admin.v3.ClustersConfigDump", "version_info": version,
         ("dynamic_active_clusters" if dynamic else "static_clusters"): clusters},
        {"@type": _TYPE + "envoy.admin.v3.ListenersConfigDump", "static_listeners": listeners},
        {"@type": _TYPE + "laneproxy.admin.v1.SwimLaneConfigDump", "version_info": version, "last_updated": updated,
         "source": settings.source, "update_success": proxy.store.accepted, "update_rejected": proxy.store.rejected,
         "last_rejection": str(error) if error is not None else None, **lanes_document(table)},
    ]}


_RESOURCES = {"bootstrap": "BootstrapConfigDump", "clusters": "ClustersConfigDump",
              "listeners": "ListenersConfigDump", "swimlanes": "SwimLaneConfigDump"}


async def config_dump(request: web.Request) -> web.Response:
    admin = context(request)
    document = config_dump_document(admin.proxy, admin.table_updated_at)
    resource = request.query.get("resource")
    if resource:
        wanted = _RESOURCES.get(resource)
        if wanted is None:
            return text(f"{resource} not found in config dump; one of: {', '.join(_RESOURCES)}\n", status=404)
        document = {"configs": [c for c in document["configs"] if c["@type"].endswith("." + wanted)]}
    return web.Response(text=json.dumps(document, indent=1), content_type="application/json")


ENDPOINTS = (
    AdminEndpoint("/config_dump", "dump current configs: clusters, listeners and the swimlane table, with its version",
                  config_dump, params=(("resource", "One of bootstrap, clusters, listeners, swimlanes"),)),
)
