"""deploy/crds on a real kube-apiserver: what `laneproxy validate` rejects, `kubectl --dry-run=server` rejects too,
and the seed's manifests pass both exactly as they are.

Each document goes through `kubectl create --dry-run=server --validate=strict` (the request carries dryRun=All,
so nothing is stored). This tier's kube-apiserver is 1.20: it has no server-side field validation (beta in
1.25), so kubectl checks unknown fields against the schema the server publishes from the installed CRDs, and
the server itself prunes them; a test below shows that pruning, so the CRDs' schema is what decides either
way. On 1.25 and later the same kubectl command has the server reject them. Wrong types and values are
rejected by the server itself on every version.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from laneproxy.core.build import ConfigDocument
from tests.image.hosttools import kubectl
from tests.unit.manifests import ROOT, SWIMLANES, documents, problems, seed_bodies
from tests.unit.typos import CASES, Typo

CRDS = ROOT / "deploy" / "crds"
SEED_FILES = [ROOT / SWIMLANES, ROOT / "deploy" / "examples" / "seed" / "swimlanes.yaml"]


def _kubectl(kube, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl(), "--kubeconfig", str(kube.kubeconfig_path), *args], input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def dry_run(kube, text: str, *, validate: str = "strict", output: str | None = None) -> subprocess.CompletedProcess:
    extra = ["-o", output] if output else []
    return _kubectl(kube, "create", "--dry-run=server", f"--validate={validate}", *extra, "-f", "-", stdin=text)


@pytest.fixture(scope="module")
def kube(kube_apiserver):
    """The API server with deploy/crds installed and established."""
    for args in (("apply", "-k", str(CRDS)),
                 ("wait", "--for", "condition=established", "--timeout", "60s",
                  "crd/asmswimlanegroups.istio.alibabacloud.com", "crd/asmswimlanes.istio.alibabacloud.com")):
        result = _kubectl(kube_apiserver, *args)
        assert result.returncode == 0, result.stderr
    # kubectl reads the published OpenAPI document; the CRDs' schemas join it shortly after Established.
    for _ in range(100):
        if "isPermissive" in _kubectl(kube_apiserver, "explain", "asmswimlanegroup.spec").stdout:
            break
        time.sleep(0.1)
    return kube_apiserver


@pytest.mark.parametrize("path", SEED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_seed_swimlanes_pass_server_side_dry_run_and_validate_as_they_are(kube, path):
    text = path.read_text(encoding="utf-8")
    result = dry_run(kube, text)
    assert result.returncode == 0, result.stderr
    stored = [doc for doc in yaml.safe_load_all(dry_run(kube, text, output="yaml").stdout) if doc]
    sent = [doc for doc in yaml.safe_load_all(text) if doc]
    assert [doc["spec"] for doc in stored] == [doc["spec"] for doc in sent]  # nothing pruned: every field is known
    assert problems([ConfigDocument(path.name, body) for body in sent]) == []


SWIMLANE_CASES = [case for case in CASES if case.values[0].role != "endpoints"]  # LaneEndpoints is no CRD


@pytest.mark.parametrize("typo", SWIMLANE_CASES)
def test_a_document_validate_rejects_for_an_unknown_field_is_rejected_by_the_crds(kube, typo: Typo):
    bodies = seed_bodies()
    typo.apply(bodies[typo.role])
    assert typo.line in problems(documents(bodies))
    result = dry_run(kube, yaml.safe_dump(bodies[typo.role]))
    assert result.returncode != 0, result.stdout
    assert f'unknown field "{typo.wrong}"' in result.stderr


def test_without_client_validation_this_server_prunes_the_unknown_field_rather_than_store_it(kube):
    bodies = seed_bodies()
    spec = bodies["group"]["spec"]
    spec["isPermisive"] = spec.pop("isPermissive")
    result = dry_run(kube, yaml.safe_dump(bodies["group"]), validate="false", output="yaml")
    assert result.returncode == 0, result.stderr
    stored = yaml.safe_load(result.stdout)["spec"]
    assert "isPermisive" not in stored and stored["autoUpdate"] is True


WRONG_VALUES = [
    pytest.param("group", ("spec", "autoUpdate"), 3, "spec.autoUpdate", id="boolean-as-integer"),
    pytest.param("group", ("spec", "ingress", "ingressRouting", "ingressRoutingStrategy"), "round_robin",
                 "ingressRoutingStrategy", id="unknown-strategy"),
    pytest.param("base", ("spec", "ingressWeight", "weight"), -1, "spec.ingressWeight.weight", id="negative-weight"),
    pytest.param("canary", ("spec", "labelSelector"), ["ASM_TRAFFIC_TAG"], "spec.labelSelector", id="selector-as-list"),
    pytest.param("canary", ("spec", "ingressRules", 0, "hosts"), "*", "hosts", id="hosts-as-string"),
]


@pytest.mark.parametrize("role, path, value, field", WRONG_VALUES)
def test_a_wrong_type_or_value_is_rejected_by_validate_and_by_the_server_itself(kube, role, path, value, field):
    bodies = seed_bodies()
    node = bodies[role]
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    assert any(field.split(".")[-1] in line for line in problems(documents(bodies)))
    result = dry_run(kube, yaml.safe_dump(bodies[role]), validate="false")
    assert result.returncode != 0, result.stdout
    assert "is invalid" in result.stderr and field in result.stderr
