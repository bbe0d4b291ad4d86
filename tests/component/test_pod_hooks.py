"""The lifecycle port's stop wait (the preStop hooks injection gives a pod), against a real `laneproxy run`.

The sidecar's own address is played by 127.0.0.1: an endpoint of mockb on 127.0.0.1 in the endpoints file is
"this pod in the endpoints"; rewriting the file without it is the pod leaving them, as a deletion does.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from laneproxy.control.own_pod import ended
from tests.component.proxyrig import SWIMLANES, ProxyProcess, UpstreamThread, endpoints_file, free_port


def wait_for_stop(port: int, query: str = "", path: str = "/wait-for-stop") -> tuple[float, dict]:
    began = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}{query}", timeout=30) as response:
        return time.monotonic() - began, json.loads(response.read())


def kubelet_1_20_hook(port: int, path: str) -> tuple[float, bytes]:
    """An HTTP lifecycle hook as kubelet 1.20 sends it: the URL is `"http://%s/%s" % (host:port, path)`, so a
    path `/x` goes out as `//x`, and any answer counts as the hook's success (kubelet's runHTTPHandler)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(b"GET /%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: Go-http-client/1.1\r\n"
                           b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n" % (path.encode(), port))
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return time.monotonic() - began, answer


def test_the_stop_wait_runs_when_the_kubelet_asks_for_the_hook_path_with_two_slashes(tmp_path):
    """The injected hook's path is `/wait-for-stop?app=1`; kubelet 1.20 asks for `//wait-for-stop?app=1`. Were it
    a 404, the kubelet would stop the pod at once (it takes any answer as done) while callers still send."""
    with UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        lifecycle = free_port()
        proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=(
            "--lifecycle", f"127.0.0.1:{lifecycle}", "--pod-ip", "127.0.0.1", "--stop-margin", "0.5",
            "--stop-max", "20")).start()
        try:
            answered: list[tuple[float, bytes]] = []
            waiter = threading.Thread(target=lambda: answered.append(kubelet_1_20_hook(lifecycle, "/wait-for-stop")),
                                      daemon=True)
            waiter.start()
            time.sleep(1.5)
            assert not answered, f"the hook returned while this pod was still an endpoint: {answered}"
            endpoints_file(endpoints, {"default/mockb": {"base": []}})
            waiter.join(timeout=15)
            _, ready = kubelet_1_20_hook(lifecycle, "/ready")
        finally:
            proxy.stop()
    assert answered, "the hook never returned after the pod left the endpoints"
    seconds, answer = answered[0]
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert seconds >= 1.5 and b'"timed_out": false' in answer, answer
    assert ready.startswith(b"HTTP/1.1 200 "), ready[:200]


def test_the_stop_wait_returns_only_after_the_pod_left_the_endpoints_and_the_margin(tmp_path):
    with UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        lifecycle = free_port()
        proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=(
            "--lifecycle", f"127.0.0.1:{lifecycle}", "--pod-ip", "127.0.0.1", "--stop-margin", "1",
            "--stop-max", "20")).start()
        try:
            answered: list[tuple[float, dict]] = []
            waiter = threading.Thread(target=lambda: answered.append(wait_for_stop(lifecycle)), daemon=True)
            waiter.start()
            time.sleep(2.0)
            assert not answered, "returned while this pod was still an endpoint"
            left = time.monotonic()
            endpoints_file(endpoints, {"default/mockb": {"base": []}})
            waiter.join(timeout=15)
            assert answered, "never returned after the pod left the endpoints"
            waited_after_leaving = time.monotonic() - left
            report = answered[0][1]
            assert report["timed_out"] is False
            assert report["left_endpoints_s"] >= 2.0
            # The margin: at least a second more after the table lost the address.
            assert report["inbound_idle_s"] - report["left_endpoints_s"] >= 1.0
            assert waited_after_leaving >= 1.0
        finally:
            proxy.stop()


def test_requests_still_arriving_after_the_pod_left_the_endpoints_keep_the_app_alive(tmp_path):
    with UpstreamThread() as app, UpstreamThread() as other:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [other.port]}})
        lifecycle = free_port()
        # Not in the endpoints from the start (the pod address is not 127.0.0.1 here): the wait is the quiet one.
        proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=app.port, extra=(
            "--lifecycle", f"127.0.0.1:{lifecycle}", "--pod-ip", "192.0.2.1", "--stop-margin", "1.5",
            "--stop-max", "20")).start()
        try:
            answered: list[tuple[float, dict]] = []

            def wait() -> None:
                report = wait_for_stop(lifecycle)[1]
                answered.append((time.monotonic(), report))

            waiter = threading.Thread(target=wait, daemon=True)
            waiter.start()
            last = time.monotonic()
            while len(app.received) < 8:  # a lagging caller: one request every 0.4 s, for longer than the margin
                with urllib.request.urlopen(f"http://127.0.0.1:{proxy.inbound_port}/late", timeout=5) as response:
                    assert response.status == 200
                last = time.monotonic()
                assert not answered, "returned while requests were still arriving"
                time.sleep(0.4)
            waiter.join(timeout=15)
            assert answered and answered[0][1]["timed_out"] is False
            assert answered[0][0] - last >= 1.4  # the margin counted from the last request
        finally:
            proxy.stop()


def test_the_sidecars_stop_wait_also_waits_for_the_app_to_close_its_port(tmp_path):
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(8)
    app_port = app.getsockname()[1]
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [free_port()]}})
    lifecycle = free_port()
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=app_port, extra=(
        "--lifecycle", f"127.0.0.1:{lifecycle}", "--stop-margin", "0.2", "--stop-max", "20")).start()
    try:
        answered: list[tuple[float, dict]] = []
        waiter = threading.Thread(target=lambda: answered.append(wait_for_stop(lifecycle, "?app=1")), daemon=True)
        waiter.start()
        time.sleep(2.0)
        assert not answered, "returned while the app still listened"
        app.close()
        waiter.join(timeout=15)
        assert answered and answered[0][1]["app_stopped_s"] >= 2.0 and answered[0][1]["timed_out"] is False
    finally:
        app.close()
        proxy.stop()


def test_the_stop_wait_ends_at_its_limit_whatever_happens(tmp_path):
    with UpstreamThread() as upstream:
        endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [upstream.port]}})
        lifecycle = free_port()
        proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, extra=(
            "--lifecycle", f"127.0.0.1:{lifecycle}", "--pod-ip", "127.0.0.1", "--stop-max", "1.5")).start()
        try:
            seconds, report = wait_for_stop(lifecycle)
            assert report["timed_out"] is True and seconds < 10
        finally:
            proxy.stop()


def test_the_readiness_probe_answers_200_only_once_the_app_accepts_connections(tmp_path):
    app_port = free_port()
    endpoints = endpoints_file(tmp_path / "endpoints.yaml", {"default/mockb": {"base": [free_port()]}})
    lifecycle = free_port()
    proxy = ProxyProcess(SWIMLANES, endpoints, outbound=True, inbound_app=app_port, extra=(
        "--lifecycle", f"127.0.0.1:{lifecycle}")).start()
    app = None
    try:
        def ready() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{lifecycle}/ready", timeout=5) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert ready() == 503  # the proxy is ready, the app is not listening yet
        app = socket.socket()
        app.bind(("127.0.0.1", app_port))
        app.listen(8)
        assert ready() == 200
    finally:
        if app is not None:
            app.close()
        proxy.stop()


@pytest.mark.parametrize("statuses, expected", [
    ([], False),  # the kubelet has not reported yet
    ([{"name": "app", "state": {"running": {}}}, {"name": "laneproxy", "state": {"running": {}}}], False),
    ([{"name": "app", "state": {"terminated": {"exitCode": 0}}}, {"name": "laneproxy", "state": {"running": {}}}],
     True),
    ([{"name": "app", "state": {"terminated": {"exitCode": 1}}}], True),  # a failed app ends the Job's pod too
    ([{"name": "app", "state": {"terminated": {}}}, {"name": "other", "state": {"running": {}}}], True),
])
def test_a_jobs_sidecar_sees_the_app_ended_only_when_every_named_container_has_terminated(statuses, expected):
    pod = {"status": {"containerStatuses": statuses}}
    assert ended(pod, ("app",)) is expected
    assert ended(pod, ("app", "other")) is (expected and any(s["name"] == "other" and "terminated" in s["state"]
                                                              for s in statuses))
