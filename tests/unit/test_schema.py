"""One schema for the validator and the CRDs: unknown fields are reported with file, path and a suggestion,
are warnings when lenient, deploy/crds is what the schema renders, and inputs that change nothing get notices.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from laneproxy.cli import main
from laneproxy.core.build import ConfigDocument, build, parse_yaml
from laneproxy.core.errors import ConfigInvalidError
from laneproxy.core.schema import crd_files

from .manifests import ROOT, SWIMLANES, documents, problems, seed_bodies, seed_text
from .typos import CASES, Typo

SEED_ARTICLE = Path(__file__).with_name("full-chain-gray-release.txt")


def spoiled(typo: Typo) -> list[ConfigDocument]:
    bodies = seed_bodies()
    typo.apply(bodies[typo.role])
    return documents(bodies)


@pytest.mark.parametrize("typo", CASES)
def test_an_unknown_field_is_an_error_naming_file_path_and_the_field_meant(typo):
    reported = [line for line in problems(spoiled(typo)) if "unknown field" in line]
    assert reported == [typo.line]


@pytest.mark.parametrize("typo", CASES)
def test_with_lenient_an_unknown_field_is_a_warning_and_nothing_else_changes_about_it(typo):
    docs = spoiled(typo)
    try:
        built = build(docs, version="test", lenient=True)
    except ConfigInvalidError as exc:
        # The typo took a field away (a rule's online flag, a lane's selector): what that causes is still an error.
        assert all("unknown field" not in str(problem) for problem in exc.problems)
        return
    assert [str(warning) for warning in built.warnings] == [typo.line]


def test_the_issues_typos_no_longer_turn_a_permissive_group_strict_without_a_word():
    bodies = seed_bodies()
    spec = bodies["group"]["spec"]
    spec["isPermisive"] = spec.pop("isPermissive")
    pmc = spec["permissiveModeConfiguration"]
    pmc["traceHeadr"] = pmc.pop("traceHeader")
    assert sorted(problems(documents(bodies))) == [
        "config/swimlanes.yaml: ASMSwimLaneGroup(rollout).spec.isPermisive: unknown field (did you mean isPermissive?)",
        "config/swimlanes.yaml: ASMSwimLaneGroup(rollout).spec.permissiveModeConfiguration.traceHeadr: "
        "unknown field (did you mean traceHeader?)",
    ]
    built = build(documents(bodies), version="test", lenient=True)
    assert len(built.warnings) == 2
    assert built.table.groups["rollout"].permissive is False  # what lenient keeps: the typo is ignored, and said


def test_metadata_and_status_are_the_api_servers_to_check():
    bodies = seed_bodies()
    bodies["canary"]["metadata"]["annotations"] = {"laneproxy.dev/anything": "x"}
    bodies["canary"]["status"] = {"anything": {"goes": 1}}
    assert problems(documents(bodies)) == []


def test_the_seed_manifests_build_with_no_warning_and_no_notice():
    docs = parse_yaml(SWIMLANES, seed_text(SWIMLANES))
    built = build(docs, version="test", sources=[SWIMLANES])
    assert (built.warnings, built.notices) == ((), ())


def test_the_seed_overlay_and_article_are_the_swimlanes_config_holds_line_for_line():
    """The article flattened the indentation; every line, in order, is still the one config/swimlanes.yaml has."""
    article = SEED_ARTICLE.read_text(encoding="utf-8")
    start = article.index("3. Deploy ASM swimlane group and swimlanes") + len("3. Deploy ASM swimlane group and swimlanes")
    lines = [line.strip() for line in article[start:article.index("4. Deploy Kruise Rollout")].strip().splitlines()]
    config = [line.strip() for line in seed_text(SWIMLANES).splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert lines == config
    overlay = "deploy/examples/seed/swimlanes.yaml"
    assert list(yaml.safe_load_all(seed_text(overlay))) == list(yaml.safe_load_all(seed_text(SWIMLANES)))
    assert build(parse_yaml(overlay, seed_text(overlay)), version="test").warnings == ()


def test_the_committed_crds_are_the_ones_the_schema_renders():
    """Regenerate with `make crds` (laneproxy crds --write deploy/crds) after changing core/schema.py."""
    committed = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "deploy" / "crds").glob("asm*.yaml")}
    assert committed == crd_files()


def test_the_crds_no_longer_accept_any_spec():
    for text in crd_files().values():
        version = yaml.safe_load(text)["spec"]["versions"][0]
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert "x-kubernetes-preserve-unknown-fields" not in spec and spec["properties"]


def test_kinds_laneproxy_does_not_read_and_files_without_swimlanes_get_notices():
    gateway = {"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway", "metadata": {"name": "ingressgateway"}}
    rule = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule", "metadata": {"name": "mocka"}}
    docs = [*parse_yaml(SWIMLANES, seed_text(SWIMLANES)), ConfigDocument(SWIMLANES, gateway),
            ConfigDocument("rules.yaml", rule)]
    built = build(docs, version="test", sources=[SWIMLANES, "rules.yaml", "empty.yaml"])
    assert [str(notice) for notice in built.notices] == [
        "config/swimlanes.yaml: Gateway(ingressgateway): ignored: laneproxy does not read "
        "networking.istio.io/v1beta1 Gateway",
        "rules.yaml: file: no swimlane objects (ASMSwimLaneGroup, ASMSwimLane, LaneEndpoints); "
        "ignored: DestinationRule(mocka)",
        "empty.yaml: file: no swimlane objects (ASMSwimLaneGroup, ASMSwimLane, LaneEndpoints)",
    ]


def test_validate_prints_errors_or_with_lenient_warnings_and_says_ok(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / SWIMLANES).read_text().replace("isPermissive", "isPermisive")
    Path("swimlanes.yaml").write_text(text)
    Path("gateway.yaml").write_text(yaml.safe_dump({"apiVersion": "networking.istio.io/v1beta1", "kind": "Gateway",
                                                    "metadata": {"name": "ingressgateway"}}))
    line = "swimlanes.yaml: ASMSwimLaneGroup(rollout).spec.isPermisive: unknown field (did you mean isPermissive?)"
    assert main(["validate", "swimlanes.yaml", "gateway.yaml"]) == 1
    assert capsys.readouterr().out.splitlines() == [line]
    assert main(["validate", "--lenient", "swimlanes.yaml", "gateway.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{line} (ignored: --lenient)",
                       "gateway.yaml: file: no swimlane objects (ASMSwimLaneGroup, ASMSwimLane, LaneEndpoints); "
                       "ignored: Gateway(ingressgateway)"]
    assert out[2].startswith("ok with 1 warning(s): 1 group(s), 2 lane(s), 3 service(s)")


def test_laneproxy_crds_writes_what_make_crds_commits(tmp_path, capsys):
    assert main(["crds", "--write", str(tmp_path)]) == 0
    assert {path.name: path.read_text(encoding="utf-8") for path in tmp_path.iterdir()} == crd_files()
    capsys.readouterr()
    assert main(["crds"]) == 0
    kinds = [doc["spec"]["names"]["kind"] for doc in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["ASMSwimLaneGroup", "ASMSwimLane"]
