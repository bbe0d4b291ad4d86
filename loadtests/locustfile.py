"""locust users for lane isolation under load: base, canary and untagged traffic through the gateway.

Every request carries its own trace id and, for base and canary users, the lane's route header. Every
response body is checked against the chain its lane implies given the lane membership of that moment
(see `expectations.py`): a wrong version anywhere in the chain is a failure filed as `lane leak: ...`,
anything else that is not a chain (non-200, unreadable body, transport error) is an error. Request
names are per lane (`base /mock`, `canary /mock`, `untagged /mock`), so locust's statistics, CSV and
HTML report are per lane too; at the end a summary (requests, failures, leaks, p50/p95/p99 per lane)
is written as JSON and markdown, and the exit code is 1 on any leak or error.

Inputs (each option also reads the environment variable shown):

  --expectations FILE    LOADTEST_EXPECTATIONS  the deployment truth: chain and version per (service, lane)
  --lanes-admin URLS     LOADTEST_LANES_ADMIN   comma-separated admin base URLs polled for GET /lanes
  --lanes-file FILE      LOADTEST_LANES_FILE    a fixed /lanes document, when no admin is reachable
  --lanes-interval S     LOADTEST_LANES_INTERVAL seconds between polls (default 0.5)
  --lanes-grace S        LOADTEST_LANES_GRACE   window widening for proxies that are not polled (default 0)
  --mix SPEC             LOADTEST_MIX           user weights, e.g. base=2,canary=1,untagged=1
  --max-wait S           LOADTEST_WAIT          each user waits uniform(0, S) between requests (default 0)
  --summary FILE         LOADTEST_SUMMARY       summary JSON path; the markdown goes beside it

Example against a real gateway (only its admin polled, so give the sidecars a grace period):

  locust -f loadtests/locustfile.py --headless -u 30 -r 30 -t 2m --host https://gateway.example \\
      --expectations expectations.json --lanes-admin http://gateway-admin.example:15000 --lanes-grace 5 \\
      --summary loadtests/results/summary.json --csv loadtests/results/locust --html loadtests/results/report.html

Never imports laneproxy: the proxy is judged from the outside. Run single-process (or as a locust master
with workers: counts and percentiles are then complete, the chains-seen tallies are per worker).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

# locust puts only this file's directory on sys.path; the package lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
from locust import FastHttpUser, events, task  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402
from locust.stats import CSV_STATS_INTERVAL_SEC  # noqa: E402

from loadtests import report  # noqa: E402
from loadtests.expectations import (  # noqa: E402
    DEFAULT_ROUTE_HEADER, DEFAULT_TRACE_HEADER, Expectations, MembershipError, MembershipHistory, Verdict,
    expected_chains, format_chain, headers_of, judge,
)

log = logging.getLogger("loadtests")
LANES = ("base", "canary", "untagged")
POLL_TIMEOUT = 2.0


def parse_mix(spec: str) -> dict[str, int]:
    """`base=2,canary=1` -> {"base": 2, "canary": 1, "untagged": 0}; lanes not named get weight 0."""
    weights = dict.fromkeys(LANES, 0)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lane, _, weight = part.partition("=")
        if lane.strip() not in weights or not weight.strip().isdigit():
            raise ValueError(f"bad mix {spec!r}: expected lane=weight for lanes {', '.join(LANES)}")
        weights[lane.strip()] = int(weight)
    if not any(weights.values()):
        raise ValueError(f"bad mix {spec!r}: every weight is 0")
    return weights


class LaneCheck:
    """The run's shared state: expectations, the membership history and its poller, and the tallies."""

    def __init__(self, expectations: Expectations, sources: list[str], static: dict | None, interval: float,
                 grace: float, max_wait: float) -> None:
        self.expectations = expectations
        self.sources = sources
        self.static = static
        self.interval = interval
        self.max_wait = max_wait
        self.history = MembershipHistory(grace=grace)
        self.route_header = DEFAULT_ROUTE_HEADER
        self.trace_header = DEFAULT_TRACE_HEADER
        self.chains: dict[str, Counter] = {lane: Counter() for lane in LANES}
        self.across_change: Counter = Counter()
        self.changes: list[dict] = []
        self.polls = 0
        self.poll_errors = 0
        self.started_at = time.monotonic()
        self._poller: gevent.Greenlet | None = None
        self._traces = itertools.count(1)
        self._run = uuid.uuid4().hex[:8]

    def next_trace_id(self) -> str:
        return f"lt-{self._run}-{next(self._traces)}"

    def _fetch(self, source: str) -> dict:
        with urllib.request.urlopen(source.rstrip("/") + "/lanes", timeout=POLL_TIMEOUT) as response:
            return json.load(response)

    def poll_once(self) -> None:
        begun = time.monotonic()
        documents = []
        for source in self.sources:
            try:
                documents.append(self._fetch(source))
            except (OSError, ValueError) as exc:
                self.poll_errors += 1
                if self.poll_errors <= 5:
                    log.warning("GET %s/lanes failed: %s", source, exc)
        if self.static is not None:
            documents.append(self.static)
        states = []
        for document in documents:
            try:
                states.append(expected_chains(document, self.expectations))
            except MembershipError as exc:
                self.poll_errors += 1
                log.warning("unusable /lanes document: %s", exc)
        self.polls += 1
        if not states:
            return
        if not len(self.history):
            self.route_header, self.trace_header = headers_of(documents[0], self.expectations)
        ended = time.monotonic()
        if self.history.record(begun, ended, states):
            observed = self.history.latest.chains
            apps = self.expectations.apps()
            self.changes.append({"at_s": round(ended - self.started_at, 2), "chains": {
                lane: sorted(format_chain(apps, chain) for chain in chains) for lane, chains in observed.items()}})

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.poll_once()
        if not len(self.history):
            raise MembershipError(f"no lane membership from {self.sources or 'the lanes file'}")
        if self.static is None:
            self._poller = gevent.spawn(self._poll_forever)

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.kill(block=False)
            self._poller = None

    def _poll_forever(self) -> None:
        while True:
            begun = time.monotonic()
            self.poll_once()
            gevent.sleep(max(0.05, self.interval - (time.monotonic() - begun)))

    def check(self, lane: str, started: float, finished: float, status: int, body: str) -> Verdict:
        accepted = self.history.accepted(lane, started, finished)
        verdict = judge(self.expectations, status, body, accepted.hops)
        if verdict.outcome == "leak" and not accepted.complete and self.static is None:
            # The next poll may show a change the response already followed: wait for it, then decide.
            deadline = time.monotonic() + self.history.grace + self.interval + POLL_TIMEOUT * len(self.sources) + 1
            while not accepted.complete and time.monotonic() < deadline:
                gevent.sleep(0.05)
                accepted = self.history.accepted(lane, started, finished)
            verdict = judge(self.expectations, status, body, accepted.hops)
        if accepted.states > 1:
            self.across_change[lane] += 1
        if verdict.observed:
            self.chains[lane][verdict.observed] += 1
        return verdict

    def extra_summary(self) -> dict:
        return {
            "chains": {lane: dict(seen) for lane, seen in self.chains.items() if seen},
            "membership": {
                "sources": self.sources or ["lanes file"], "interval_s": self.interval, "grace_s": self.history.grace,
                "polls": self.polls, "poll_errors": self.poll_errors, "changes": self.changes,
                "checked_across_change": dict(self.across_change),
            },
        }


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("laneproxy lane check")
    group.add_argument("--expectations", env_var="LOADTEST_EXPECTATIONS", default="",
                       help="JSON: chain and version per (service, lane); see loadtests/expectations.py")
    group.add_argument("--lanes-admin", env_var="LOADTEST_LANES_ADMIN", default="",
                       help="comma-separated admin base URLs to poll for GET /lanes")
    group.add_argument("--lanes-file", env_var="LOADTEST_LANES_FILE", default="",
                       help="a fixed /lanes JSON document instead of polling")
    group.add_argument("--lanes-interval", env_var="LOADTEST_LANES_INTERVAL", type=float, default=0.5)
    group.add_argument("--lanes-grace", env_var="LOADTEST_LANES_GRACE", type=float, default=0.0)
    group.add_argument("--mix", env_var="LOADTEST_MIX", default="base=1,canary=1,untagged=1")
    group.add_argument("--max-wait", env_var="LOADTEST_WAIT", type=float, default=0.0)
    group.add_argument("--summary", env_var="LOADTEST_SUMMARY", default="")


def _lanes_spec(weights: dict[str, int], path: str) -> dict[str, dict]:
    return {lane: {"request": f"{lane} {path}", "method": "GET", "weight": weights[lane]} for lane in LANES}


@events.init.add_listener
def _on_init(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:  # used as a library (locust's Environment without argv); the caller sets lane_check
        return
    if not options.expectations or not (options.lanes_admin or options.lanes_file):
        log.error("need --expectations and one of --lanes-admin / --lanes-file (see the locustfile's docstring)")
        sys.exit(2)
    weights = parse_mix(options.mix)
    for user_class in environment.user_classes:
        if getattr(user_class, "lane", None) in weights:
            user_class.weight = weights[user_class.lane]
    # A class with weight 0 would still get users; leave it out of the run instead.
    environment.user_classes[:] = [c for c in environment.user_classes if c.weight > 0]
    expectations = Expectations.load(options.expectations)
    static = json.loads(Path(options.lanes_file).read_text()) if options.lanes_file else None
    sources = [s.strip() for s in options.lanes_admin.split(",") if s.strip()]
    environment.lane_check = LaneCheck(expectations, sources, static, options.lanes_interval, options.lanes_grace,
                                       options.max_wait)
    environment.lane_weights = weights


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    check = getattr(environment, "lane_check", None)
    if check is None or isinstance(environment.runner, MasterRunner):
        return
    check.start()
    _write_summary(environment, state="running")


@events.test_stop.add_listener
def _on_test_stop(environment, **_kwargs) -> None:
    check = getattr(environment, "lane_check", None)
    if check is not None:
        check.stop()


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs) -> None:
    if getattr(environment, "lane_check", None) is None or isinstance(environment.runner, WorkerRunner):
        return
    if getattr(environment.parsed_options, "csv_prefix", None):
        # locust rewrites its CSV files once per CSV_STATS_INTERVAL_SEC and only flushes them at exit, so
        # the files would miss the last second of the run; let the writer take one more, final, turn.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
    summary = _write_summary(environment, state="done")
    log.info("\n%s", report.render_markdown(summary))
    if summary["verdict"] != "pass":
        environment.process_exit_code = 1


def _write_summary(environment, state: str) -> dict:
    check: LaneCheck = environment.lane_check
    options = environment.parsed_options
    extra = {"state": state, "host": environment.host, "users": getattr(options, "num_users", None),
             "mix": options.mix, "duration_s": round(time.monotonic() - check.started_at, 1)}
    if not isinstance(environment.runner, MasterRunner):
        extra.update(check.extra_summary())
    summary = report.build_summary(environment.stats, _lanes_spec(environment.lane_weights, check.expectations.path),
                                   extra)
    if options.summary:
        report.write_summary(summary, options.summary)
    return summary


class LaneUser(FastHttpUser):
    """One user of one lane: a request with a fresh trace id, then the check of its chain."""

    abstract = True
    lane = ""

    def wait_time(self) -> float:
        return random.uniform(0, self.environment.lane_check.max_wait)

    @task
    def call_chain(self) -> None:
        check: LaneCheck = self.environment.lane_check
        path = check.expectations.path
        headers = {check.trace_header: check.next_trace_id()}
        tag = check.expectations.tags.get(self.lane)
        if tag is not None:
            headers[check.route_header] = tag
        started = time.monotonic()
        with self.client.get(path, headers=headers, name=f"{self.lane} {path}", catch_response=True) as response:
            finished = time.monotonic()
            if not response.status_code:  # transport error: locust files the exception itself
                response.failure(response.error)
                return
            verdict = check.check(self.lane, started, finished, response.status_code, response.text or "")
            if verdict.failure is None:
                response.success()
            else:
                response.failure(verdict.failure)


class BaseUser(LaneUser):
    lane = "base"


class CanaryUser(LaneUser):
    lane = "canary"


class UntaggedUser(LaneUser):
    lane = "untagged"
