"""`make loadtest`: the local demo chain under locust, with a lane membership change in the middle of the run.

Owns the orchestration around the locustfile: start `DemoCluster`; for the `membership` scenario also
start a mockb v2 pod with its sidecar, labelled canary but not yet in the endpoints file; write the
expectations (the version each (service, lane) runs, from the pods started here) and run locust headless
as a subprocess, polling every proxy's admin `/lanes`. At one third of the run the extra pod's endpoint is
added to the canary lane through the endpoints file (canary requests now go mocka v2 -> mockb v2 ->
mockc v2), at two thirds it is removed again (back to mockb v1). Results land in
`loadtests/results/locust-<time>-<scenario>/`: locust's CSV files and HTML report, `summary.json`,
`summary.md`, `expectations.json` and `locust.log`.

Exit status: 0 only when locust exited 0, the summary has no leak and no error, every lane with a
weight got traffic and, in the membership scenario, canary traffic followed both memberships.
Only ever talks to 127.0.0.1; never edits laneproxy's own configuration beyond the demo's endpoints file.

    python -m loadtests.run [--time 30s] [--users 30] [--mix base=1,canary=1,untagged=1]
                            [--scenario membership|steady] [--wait 0.1] [--out DIR]

Each option defaults to an environment variable: LOADTEST_TIME, LOADTEST_USERS, LOADTEST_MIX,
LOADTEST_SCENARIO, LOADTEST_WAIT, LOADTEST_OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from laneproxy.demo import TOPOLOGY, DemoCluster, Pod

from loadtests import report

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
RESULTS = HERE / "results"
ENTRY_PATH = "/mock"


def parse_duration(text: str) -> float:
    """`30`, `30s`, `2m`, `1m30s` -> seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not match or not any(match.groups()):
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 2m, 1m30s")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def expectations_for(pods: Sequence[Pod], path: str = ENTRY_PATH, namespace: str = "default") -> dict:
    """The deployment truth of the pods this runner started: chain order and version per (service, lane).

    The chain is followed from the app nobody calls (the gateway's destination) along `upstream`.
    """
    upstream = {app: up for app, _, _, up in TOPOLOGY}
    called = {up for up in upstream.values() if up}
    entry = [app for app in upstream if app not in called]
    if len(entry) != 1:
        raise ValueError(f"the demo topology has no single entry service: {entry}")
    chain, app = [], entry[0]
    while app:
        chain.append(f"{namespace}/{app}")
        app = upstream.get(app)
    versions: dict[str, dict[str, str]] = {}
    for pod in pods:
        lanes = versions.setdefault(f"{namespace}/{pod.app}", {})
        if lanes.setdefault(pod.lane, pod.version) != pod.version:
            raise ValueError(f"{pod.app} runs two versions in lane {pod.lane}; a lane must have one")
    return {"path": path, "chain": chain, "versions": versions}


def _child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    environment.update(extra or {})
    return environment


def admin_urls(cluster: DemoCluster, extra: Sequence[Pod] = ()) -> list[str]:
    """Every proxy's admin: the gateway's and each sidecar's, so the oracle sees every table swap."""
    return [cluster.gateway_admin_url, *(f"http://127.0.0.1:{p.admin_port}" for p in [*cluster.pods, *extra])]


def fetch_lanes(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/lanes", timeout=2) as response:
        return json.load(response)


def wait_for_lanes(urls: Sequence[str], predicate: Callable[[dict], bool], timeout: float = 15.0) -> None:
    """Block until every admin's /lanes satisfies `predicate` (a reload has reached every proxy)."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        try:
            if predicate(fetch_lanes(pending[0])):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{pending[0]}/lanes did not reach the expected membership in {timeout}s")
        time.sleep(0.1)


@dataclass
class Step:
    """A membership change at `at` seconds after the load started."""

    at: float
    label: str
    action: Callable[[], None]


@dataclass
class LocustRun:
    returncode: int
    summary: dict
    out_dir: Path
    script: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.problems


def run_locust(*, host: str, sources: Sequence[str], expectations: dict, out_dir: Path, users: int = 30,
               run_time: float = 30.0, mix: str = "base=1,canary=1,untagged=1", max_wait: float = 0.0,
               interval: float = 0.5, steps: Sequence[Step] = (), quiet: bool = False) -> LocustRun:
    """Run the locustfile headless against `host` (bounded in time and users) and collect its summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    expectations_file = out_dir / "expectations.json"
    expectations_file.write_text(json.dumps(expectations, indent=2) + "\n")
    summary_file = out_dir / "summary.json"
    summary_file.unlink(missing_ok=True)
    seconds = max(1, round(run_time))
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--stop-timeout", "2",
               "--host", host, "--csv", str(out_dir / "locust"), "--html", str(out_dir / "report.html"),
               "--expectations", str(expectations_file), "--lanes-admin", ",".join(sources),
               "--lanes-interval", str(interval), "--mix", mix, "--max-wait", str(max_wait),
               "--summary", str(summary_file)]
    log_path = out_dir / "locust.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=_child_environment(), cwd=HERE.parent, start_new_session=True)
        script: list[dict] = []
        problems: list[str] = []
        try:
            started = _wait_started(process, summary_file, timeout=60)
            pending = sorted(steps, key=lambda s: s.at)
            while process.poll() is None:
                if pending and time.monotonic() - started >= pending[0].at:
                    step = pending.pop(0)
                    step.action()
                    script.append({"at_s": round(time.monotonic() - started, 2), "action": step.label})
                    if not quiet:
                        print(f"+{script[-1]['at_s']}s {step.label}", flush=True)
                elif time.monotonic() - started > seconds + 60:
                    raise TimeoutError(f"locust still running {seconds + 60}s after the load started")
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as exc:
            problems.append(f"{exc}; see {log_path}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=15)
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        summary = {}
    if summary.get("state") != "done":
        problems.append(f"no final summary; see {log_path}")
    problems += summary.get("problems", [])
    if len(script) < len(steps):
        problems.append(f"only {len(script)} of {len(steps)} membership steps ran before locust ended")
    if summary and script:
        summary["script"] = script
        report.write_summary(summary, summary_file)
    return LocustRun(process.returncode, summary, out_dir, script, problems)


def _wait_started(process: subprocess.Popen, summary_file: Path, timeout: float) -> float:
    """The moment locust's test started: it writes a `running` summary right after its first /lanes poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"locust exited with {process.returncode} before the load started")
        try:
            if json.loads(summary_file.read_text()).get("state") in ("running", "done"):
                return time.monotonic()
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"locust did not start within {timeout}s")


def canary_followed_both(summary: dict, expectations: dict, extra: Pod) -> list[str]:
    """Problems if canary traffic did not see both the extra pod's version and the fallback's at its hop."""
    chain = [service.rsplit("/", 1)[-1] for service in expectations["chain"]]
    hop = chain.index(extra.app)
    seen = {chain_text.split(" -> ")[hop] for chain_text in summary.get("chains", {}).get("canary", {})}
    wanted = {f"{extra.app} {extra.version}", f"{extra.app} {expectations['versions'][f'default/{extra.app}']['base']}"}
    missing = wanted - seen
    return [f"canary traffic never reached {', '.join(sorted(missing))}: the membership change was not exercised"] \
        if missing else []


@dataclass
class LoadSettings:
    run_time: float = 30.0
    users: int = 30
    mix: str = "base=1,canary=1,untagged=1"
    scenario: str = "membership"
    max_wait: float = 0.1
    out_dir: Path | None = None
    quiet: bool = False


def run_demo(settings: LoadSettings) -> LocustRun:
    """Start the demo chain (plus the extra pod for the membership scenario), run locust, stop everything."""
    out_dir = settings.out_dir or RESULTS / f"locust-{datetime.now():%Y%m%d-%H%M%S}-{settings.scenario}"
    with DemoCluster(log_level="warning") as cluster:
        extra_pods: list[Pod] = []
        steps: list[Step] = []
        if settings.scenario == "membership":
            extra_pods = [Pod("mockb", "v2", "canary", "mockc")]
            cluster.start_pod(extra_pods[0])  # started, not yet published: the first step publishes it
            address = f"127.0.0.1:{extra_pods[0].inbound_port}"
            steps = [
                Step(settings.run_time / 3, f"add canary mockb v2 {address} to the endpoints file",
                     lambda: cluster.write_endpoints([*cluster.pods, *extra_pods])),
                Step(2 * settings.run_time / 3, f"remove canary mockb v2 {address} from the endpoints file",
                     lambda: cluster.write_endpoints(cluster.pods)),
            ]
        elif settings.scenario != "steady":
            raise ValueError(f"unknown scenario {settings.scenario!r}: membership or steady")
        try:
            expectations = expectations_for([*cluster.pods, *extra_pods])
            run = run_locust(host=cluster.gateway_url, sources=admin_urls(cluster, extra_pods),
                             expectations=expectations, out_dir=out_dir, users=settings.users,
                             run_time=settings.run_time, mix=settings.mix, max_wait=settings.max_wait, steps=steps,
                             quiet=settings.quiet)
            if extra_pods and run.summary:
                run.problems += canary_followed_both(run.summary, expectations, extra_pods[0])
        finally:
            for pod in extra_pods:
                cluster.stop_pod(pod)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", default=env("LOADTEST_TIME", "30s"), help="run time, e.g. 30s, 2m (LOADTEST_TIME)")
    parser.add_argument("--users", type=int, default=int(env("LOADTEST_USERS", "30")), help="users (LOADTEST_USERS)")
    parser.add_argument("--mix", default=env("LOADTEST_MIX", "base=1,canary=1,untagged=1"), help="lane weights")
    parser.add_argument("--scenario", choices=("membership", "steady"), default=env("LOADTEST_SCENARIO", "membership"))
    parser.add_argument("--wait", type=float, default=float(env("LOADTEST_WAIT", "0.1")),
                        help="max seconds a user waits between requests (LOADTEST_WAIT)")
    parser.add_argument("--out", type=Path, default=Path(env("LOADTEST_OUT")) if env("LOADTEST_OUT") else None)
    args = parser.parse_args(argv)
    if not 1 <= args.users <= 200:
        parser.error("--users must be between 1 and 200")
    settings = LoadSettings(parse_duration(args.time), args.users, args.mix, args.scenario, args.wait, args.out)
    run = run_demo(settings)
    markdown = run.out_dir / "summary.md"
    if markdown.exists():
        print(markdown.read_text())
    for problem in run.problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if run.returncode != 0:
        print(f"FAIL: locust exited with {run.returncode}; see {run.out_dir / 'locust.log'}", file=sys.stderr)
    print(f"results: {run.out_dir}")
    return 0 if run.passed else 1


if __name__ == "__main__":
    sys.exit(main())
