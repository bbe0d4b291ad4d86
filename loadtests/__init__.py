"""Load tests: lane isolation and latency per lane under load, with locust.

- `locustfile.py`  the users (base, canary, untagged), the membership watcher and the summary; usable
                   on its own against any gateway (`locust -f loadtests/locustfile.py --host ...`).
- `expectations.py` pure: what chain a lane must produce for a given `/lanes` document, and the verdict
                   on one response. No locust, no gevent, no sockets, so the suite can import it.
- `report.py`      pure: the summary (requests, failures, leaks, p50/p95/p99 per lane) as JSON and markdown.
- `run.py`         `make loadtest`: the demo chain, an optional membership change, locust headless, the
                   results under `loadtests/results/locust-*/`, and the exit code.
- `bench/`         the wrk benchmark against nginx and Envoy; separate from the above.

This package must never import `laneproxy` internals beyond the demo's public surface (`DemoCluster`,
`Pod`, `TOPOLOGY`): the load test judges the proxy from the outside, as a release engineer would.
"""
