"""A stand-in for OpenKruise Rollout, used only by the cluster tier: Kruise cannot be built here (it is not in
Debian and Go modules are not reachable).

It watches `rollouts.kruise.io/v1beta1` `Rollout` objects (polling, every half second) and produces the object
sequence Kruise Rollout produces for a Deployment with `enableExtraWorkloadForCanary: true` and
`patchPodTemplateMetadata`, as the seed uses it (deploy/examples/seed/rollouts.yaml):

- a change of the workload's pod template pauses the stable Deployment (it keeps running the old template) and
  creates the canary Deployment `<workload>-<template hash>`: the new template with the patched labels and
  annotations, the replicas of the first step, and a selector that adds `rollouts-pod-template-hash` so the two
  Deployments do not share pods; the Rollout's status says `Progressing`, the step `StepPaused`;
- approve (`kubectl kruise rollout approve`: a status patch `canaryStatus.currentStepState: StepReady`) resumes
  the stable Deployment, which rolls to the new template; once it is available the canary Deployment is deleted
  and the new template is the stable revision;
- undo (`kubectl kruise rollout undo`: the workload's template back to the stable revision) deletes the canary
  Deployment and resumes the stable Deployment, which has nothing to roll.

Kruise's workload webhook pauses the Deployment in the same update that changes its template, so the stable
Deployment never starts the new version; there is no webhook here, so template changes go through
`update_template`, which sends `spec.paused: true` with the change as that webhook would add it (a plain patch
would let the Deployment controller start a new-version pod in the base lane before the stand-in pauses it).

Left out: traffic routing (the seed routes by lanes, not by Kruise), more than one step and step weights,
`replicas` as a percentage, pause durations, the Rollout's conditions and observedGeneration, rollback when the
canary fails, and workloads other than Deployment.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field

from tests.cluster.node import Cluster

# The stable template, kept on the Rollout: what undo goes back to and what a new template is compared with.
STABLE_TEMPLATE = "rollouts.kruise.io/stable-template"
CANARY_HASH_LABEL = "rollouts-pod-template-hash"

ROLLOUT_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "rollouts.rollouts.kruise.io"},
    "spec": {
        "group": "rollouts.kruise.io",
        "names": {"kind": "Rollout", "listKind": "RolloutList", "plural": "rollouts", "singular": "rollout"},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1beta1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}


def update_template(cluster: Cluster, namespace: str, deployment: str, template_patch: dict) -> None:
    """Change a Rollout-governed Deployment's pod template as Kruise's webhook admits it: paused in the same
    update (a strategic merge patch of spec.template)."""
    cluster.kubectl("patch", "deployment", deployment, "-n", namespace, "--type=strategic",
                    "-p", json.dumps({"spec": {"paused": True, "template": template_patch}}))


def template_hash(template: dict) -> str:
    """A pod template's identity as the Deployment controller sees it: without the ReplicaSet's own label and
    the creation timestamp (a template copied back from a ReplicaSet, as undo does, has both)."""
    normal = json.loads(json.dumps(template))
    metadata = normal.setdefault("metadata", {})
    metadata.pop("creationTimestamp", None)
    metadata.get("labels", {}).pop("pod-template-hash", None)
    return hashlib.sha256(json.dumps(normal, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class RolloutStandIn:
    cluster: Cluster
    namespace: str
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RolloutStandIn:
        self._thread = threading.Thread(target=self._run, name="rollout-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                rollouts = self.cluster.get_json("rollouts.rollouts.kruise.io", "-n", self.namespace)["items"]
                for rollout in rollouts:
                    self.reconcile(rollout)
            except Exception as exc:  # noqa: BLE001 - a controller keeps going; the test reads the errors
                self.errors.append(repr(exc))

    def reconcile(self, rollout: dict) -> None:
        ref = rollout["spec"]["workloadRef"]
        name = rollout["metadata"]["name"]
        stable = self.cluster.get_json("deployment", ref["name"], "-n", self.namespace)
        template = stable["spec"]["template"]
        annotations = rollout["metadata"].get("annotations", {})
        if STABLE_TEMPLATE not in annotations:
            self._annotate(name, json.dumps(template, sort_keys=True))
            self._status(name, {"phase": "Healthy", "stableRevision": template_hash(template)})
            return
        stable_template = json.loads(annotations[STABLE_TEMPLATE])
        status = rollout.get("status", {})
        canary_status = status.get("canaryStatus") or {}
        canary_name = canary_status.get("canaryWorkload")
        if template_hash(template) == template_hash(stable_template):
            if canary_name:  # undo, or the end of an approved rollout
                self._finish(name, ref["name"], canary_name, template)
            return
        if not canary_name:
            self._start_canary(rollout, stable, template)
            return
        if canary_status.get("currentStepState") == "StepReady":  # approved
            self.cluster.kubectl("patch", "deployment", ref["name"], "-n", self.namespace, "--type=merge",
                                 "-p", json.dumps({"spec": {"paused": False}}))
            if _available(self.cluster.get_json("deployment", ref["name"], "-n", self.namespace)):
                self._annotate(name, json.dumps(template, sort_keys=True))
                self._finish(name, ref["name"], canary_name, template)
            return
        canary = self.cluster.kubectl("get", "deployment", canary_name, "-n", self.namespace, "-o", "json",
                                      check=False)
        if canary.returncode == 0 and _available(json.loads(canary.stdout)) and \
                canary_status.get("currentStepState") != "StepPaused":
            self._status(name, {"canaryStatus": {**canary_status, "currentStepState": "StepPaused"}})

    def _start_canary(self, rollout: dict, stable: dict, template: dict) -> None:
        canary_spec = rollout["spec"]["strategy"]["canary"]
        patch = canary_spec.get("patchPodTemplateMetadata", {})
        steps = canary_spec.get("steps") or [{"replicas": 1}]
        digest = template_hash(template)
        workload = stable["metadata"]["name"]
        self.cluster.kubectl("patch", "deployment", workload, "-n", self.namespace, "--type=merge",
                             "-p", json.dumps({"spec": {"paused": True}}))
        canary_template = json.loads(json.dumps(template))
        metadata = canary_template.setdefault("metadata", {})
        metadata.setdefault("labels", {}).update(patch.get("labels", {}))
        metadata["labels"][CANARY_HASH_LABEL] = digest
        metadata.setdefault("annotations", {}).update(patch.get("annotations", {}))
        selector = json.loads(json.dumps(stable["spec"]["selector"]))
        selector.setdefault("matchLabels", {})[CANARY_HASH_LABEL] = digest
        canary_name = f"{workload}-{digest}"
        canary = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": canary_name, "namespace": self.namespace,
                         "labels": {**stable["metadata"].get("labels", {}), CANARY_HASH_LABEL: digest,
                                    "rollouts.kruise.io/canary-deployment": workload}},
            "spec": {"replicas": int(steps[0].get("replicas", 1)), "selector": selector,
                     "template": canary_template},
        }
        self.cluster.kubectl("apply", "-f", "-", stdin=json.dumps(canary))
        self._status(rollout["metadata"]["name"], {"phase": "Progressing", "canaryStatus": {
            "canaryWorkload": canary_name, "canaryRevision": digest, "currentStepIndex": 1,
            "currentStepState": "StepUpgrade"}})

    def _finish(self, name: str, workload: str, canary_name: str, template: dict) -> None:
        self.cluster.kubectl("patch", "deployment", workload, "-n", self.namespace, "--type=merge",
                             "-p", json.dumps({"spec": {"paused": False}}))
        self.cluster.kubectl("delete", "deployment", canary_name, "-n", self.namespace, "--ignore-not-found",
                             "--wait=false")
        self._status(name, {"phase": "Healthy", "stableRevision": template_hash(template), "canaryStatus": None})

    def _annotate(self, name: str, template: str) -> None:
        self.cluster.kubectl("annotate", "--overwrite", "rollouts.rollouts.kruise.io", name, "-n", self.namespace,
                             f"{STABLE_TEMPLATE}={template}")

    def _status(self, name: str, status: dict) -> None:
        # kubectl 1.20 has no `patch --subresource`: read the object, change its status, PUT it to /status.
        current = self.cluster.get_json("rollouts.rollouts.kruise.io", name, "-n", self.namespace)
        merged = {**current.get("status", {}), **status}
        current["status"] = {k: v for k, v in merged.items() if v is not None}
        self.cluster.kubectl("replace", "--raw",
                             f"/apis/rollouts.kruise.io/v1beta1/namespaces/{self.namespace}/rollouts/{name}/status",
                             "-f", "-", stdin=json.dumps(current))


def _available(deployment: dict) -> bool:
    spec, status = deployment["spec"], deployment.get("status", {})
    replicas = spec.get("replicas", 1)
    return (status.get("observedGeneration", 0) >= deployment["metadata"]["generation"]
            and status.get("updatedReplicas", 0) == replicas and status.get("availableReplicas", 0) == replicas
            and status.get("replicas", 0) == replicas)
