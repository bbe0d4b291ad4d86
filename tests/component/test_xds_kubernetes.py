"""`laneproxy controller --source kubernetes` against a real kube-apiserver: the watcher's table, served over xDS.

The controller runs with the deploy/rbac ServiceAccount's token (the same source and RBAC as a sidecar's
direct watch). A pod's readiness change reaches a subscribed stream as that service's assignment, and
nothing else is pushed.
"""

from __future__ import annotations

from pathlib import Path

from envoy.config.endpoint.v3 import endpoint_pb2

from test_kubernetes_source import Cluster, cluster, kubeconfig, start_seed  # noqa: F401 (fixtures)
from tests.kube.fixtures import kube_apiserver  # noqa: F401
from xdsrig import ASSIGNMENT, CLUSTER, AdsStream, ControllerProcess, fqdn, names, wait_for

BASE = {"mocka": "10.1.0.1", "mockb": "10.1.0.2", "mockc": "10.1.0.3"}


def addresses(response) -> dict[str, list[str]]:
    return {resource.name: sorted(f"{e.endpoint.address.socket_address.address}:"
                                  f"{e.endpoint.address.socket_address.port_value}"
                                  for locality in endpoint_pb2.ClusterLoadAssignment.FromString(
                                      resource.resource.value).endpoints
                                  for e in locality.lb_endpoints)
            for resource in response.resources}


async def test_a_pods_readiness_change_reaches_a_subscribed_stream_as_its_services_assignment_only(
        cluster: Cluster, kubeconfig: Path) -> None:
    await start_seed(cluster, BASE)
    await cluster.create_pod("mocka-canary", app="mocka", tag="canary", version="v2", ip="10.1.0.11", ready=True)
    controller = ControllerProcess(extra=("--source", "kubernetes", "--kubeconfig", str(kubeconfig))).start()
    sidecar = AdsStream(controller.xds_port)
    try:
        whole = f"outbound|8000||{fqdn('mocka')}"

        sidecar.send(type_url=CLUSTER)
        served = sidecar.receive()
        assert {f"outbound|8000|{lane}|{fqdn(app)}" for app in BASE for lane in ("", "base", "canary")} <= names(served)
        sidecar.ack(served)
        sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=[whole])
        first = sidecar.receive()
        sidecar.ack(first)
        both = sorted(["10.1.0.1:8000", "10.1.0.11:8000"])
        if addresses(first).get(whole) != both:  # the controller's first table was taken before the canary was ready
            update = sidecar.receive()
            sidecar.ack(update)
            assert addresses(update)[whole] == both
        before = controller.stats()

        await cluster.set_status("mocka-canary", ip="10.1.0.11", ready=False)
        update = sidecar.receive()
        sidecar.ack(update)
        assert update.type_url == ASSIGNMENT and addresses(update) == {whole: ["10.1.0.1:8000"]}
        after = wait_for(lambda: (s := controller.stats())["controller.table.tables"] > before["controller.table.tables"]
                           and s, "the controller's table after the change")
        assert after["controller.xds.cluster_load_assignment.resources_sent"] - \
            before["controller.xds.cluster_load_assignment.resources_sent"] == 1
        assert after["controller.xds.cluster.pushes"] == before["controller.xds.cluster.pushes"]
        assert after["controller.xds.cluster_load_assignment.nacks"] == 0
    finally:
        sidecar.close()
        controller.stop()
