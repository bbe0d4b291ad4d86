"""The load test's summary: requests, failures, leaks, errors and p50/p95/p99 per lane, as JSON and markdown.

Owns the shape of `summary.json` / `summary.md` and the pass/fail rule (no leak, no error, every lane
with a weight got traffic). Counts and percentiles come from locust's own statistics, so the summary
agrees with locust's CSV and HTML report (and is complete on a locust master in distributed mode);
locust keeps response times rounded to whole milliseconds below 100 ms, and so does this summary.
Reads locust's stats objects by duck typing and never imports locust, so the suite can use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

LEAK_PREFIX = "lane leak"
PERCENTILES = (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99))


def failure_text(error: object) -> str:
    """The text locust files a failure under: the string itself, or the exception's repr()."""
    return error if isinstance(error, str) else repr(error)


def entry_figures(entry) -> dict:
    """Figures of one locust StatsEntry (None: no request of that name was made)."""
    if entry is None or entry.num_requests == 0:
        return {"requests": 0, "failures": 0, "rps": 0.0, "avg_ms": 0.0, "max_ms": 0.0,
                **{key: 0.0 for key, _ in PERCENTILES}}
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.total_rps, 1),
        "avg_ms": round(entry.avg_response_time, 1),
        "max_ms": round(entry.max_response_time, 1),
        **{key: entry.get_response_time_percentile(q) for key, q in PERCENTILES},
    }


def build_summary(stats, lanes: Mapping[str, Mapping], extra: Mapping | None = None) -> dict:
    """The summary of a run from locust's RequestStats.

    `lanes`: lane -> {"request": request name, "method": "GET", "weight": int}; `extra` is merged in
    (host, users, membership observations, chains seen per lane, ...).
    """
    errors = list(stats.errors.values())
    summary_lanes: dict[str, dict] = {}
    for lane, spec in lanes.items():
        figures = entry_figures(stats.entries.get((spec["request"], spec.get("method", "GET"))))
        lane_errors = [e for e in errors if e.name == spec["request"]]
        figures["leaks"] = sum(e.occurrences for e in lane_errors if failure_text(e.error).startswith(LEAK_PREFIX))
        figures["errors"] = figures["failures"] - figures["leaks"]
        figures["weight"] = spec.get("weight", 1)
        figures["request"] = spec["request"]
        summary_lanes[lane] = figures
    total = entry_figures(stats.total)
    total["leaks"] = sum(lane["leaks"] for lane in summary_lanes.values())
    total["errors"] = total["failures"] - total["leaks"]
    failures = sorted(
        ({"request": e.name, "failure": failure_text(e.error), "occurrences": e.occurrences} for e in errors),
        key=lambda f: -f["occurrences"])
    summary = {"lanes": summary_lanes, "total": total, "failures": failures}
    summary.update(extra or {})
    problems = verdict_problems(summary)
    summary["verdict"] = "fail" if problems else "pass"
    summary["problems"] = problems
    return summary


def verdict_problems(summary: Mapping) -> list[str]:
    """Why a run fails; empty when it passes."""
    problems = []
    total = summary["total"]
    if total["requests"] == 0:
        problems.append("no requests were made")
    if total["leaks"]:
        problems.append(f"{total['leaks']} lane leak(s)")
    if total["errors"]:
        problems.append(f"{total['errors']} error(s)")
    for lane, figures in summary["lanes"].items():
        if figures["weight"] > 0 and figures["requests"] == 0 and total["requests"]:
            problems.append(f"lane {lane} got no requests")
    return problems


def render_markdown(summary: Mapping) -> str:
    lines = [f"# Load test summary: {summary['verdict'].upper()}", ""]
    labels = {"host": "host {}", "users": "{} users", "mix": "mix {}", "duration_s": "{} s"}
    context = [label.format(summary[key]) for key, label in labels.items() if summary.get(key) is not None]
    if context:
        lines += [", ".join(context), ""]
    lines += ["| lane | requests | failures | leaks | errors | req/s | p50 ms | p95 ms | p99 ms | max ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = list(summary["lanes"].items()) + [("all", summary["total"])]
    for lane, f in rows:
        lines.append(f"| {lane} | {f['requests']} | {f['failures']} | {f['leaks']} | {f['errors']} | {f['rps']} "
                     f"| {_ms(f['p50_ms'])} | {_ms(f['p95_ms'])} | {_ms(f['p99_ms'])} | {_ms(f['max_ms'])} |")
    chains = summary.get("chains") or {}
    if chains:
        lines += ["", "Chains seen per lane:", ""]
        for lane, seen in chains.items():
            for chain, count in sorted(seen.items(), key=lambda item: -item[1]):
                lines.append(f"- {lane}: `{chain}` x {count}")
    if summary.get("script"):
        lines += ["", "Membership script:", ""]
        lines += [f"- at +{step['at_s']} s: {step['action']}" for step in summary["script"]]
    membership = summary.get("membership")
    if membership:
        lines += ["", f"Membership: {membership.get('polls', 0)} polls of {len(membership.get('sources', []))} "
                      f"source(s), {membership.get('poll_errors', 0)} poll error(s), "
                      f"grace {membership.get('grace_s', 0)} s."]
        for change in membership.get("changes", []):
            described = "; ".join(f"{lane}: {' or '.join(c)}" for lane, c in change["chains"].items())
            lines.append(f"- at +{change['at_s']} s: {described}")
        across = membership.get("checked_across_change") or {}
        if any(across.values()):
            lines.append("Requests in flight during a change, checked against either state per hop: "
                         + ", ".join(f"{lane} {n}" for lane, n in across.items()))
    if summary.get("failures"):
        lines += ["", "| request | failure | count |", "|---|---|---:|"]
        for failure in summary["failures"]:
            text = failure["failure"].replace("|", "/")
            lines.append(f"| {failure['request']} | {text} | {failure['occurrences']} |")
    if summary.get("problems"):
        lines += ["", "Problems: " + "; ".join(summary["problems"])]
    return "\n".join(lines) + "\n"


def _ms(value: float) -> str:
    return f"{value:g}"


def write_summary(summary: Mapping, path: str | Path) -> tuple[Path, Path]:
    """Write `path` (JSON) and the same name with `.md`; returns both paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".json.tmp")
    staged.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    staged.replace(path)  # the runner polls this file; never let it read half of it
    markdown = path.with_suffix(".md")
    if summary.get("state") != "running":
        markdown.write_text(render_markdown(summary))
    return path, markdown
