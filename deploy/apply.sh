#!/usr/bin/env bash
# Apply a kustomization of deploy/ in one step: its CustomResourceDefinitions first, then, once the API server
# serves them (condition Established), everything; then, when it holds the controller, wait until a replica is
# ready: sidecars and the gateway get their tables from it and report ready only after their first one. Applying both at once fails on a fresh cluster with
# `no matches for kind "ASMSwimLane"` (kubectl maps every kind before the CRDs exist) until applied again.
#
# Usage: deploy/apply.sh DIR [kubectl options...]      e.g. deploy/apply.sh deploy/examples/seed-local --context kind
# Needs kubectl 1.21 or later (kustomize v4+: the seed uses `replacements`); KUBECTL names another binary.
set -euo pipefail
dir="${1:?usage: deploy/apply.sh DIR [kubectl options...]}"
shift
kubectl=("${KUBECTL:-kubectl}" "$@")

rendered="$(mktemp)"
trap 'rm -f "$rendered" "$rendered.crds"' EXIT
"${kubectl[@]}" kustomize "$dir" > "$rendered"
# The documents whose top-level kind is CustomResourceDefinition.
awk 'BEGIN { RS = "\n---\n" } /(^|\n)kind: CustomResourceDefinition\n/ { printf "---\n%s\n", $0 }' "$rendered" \
    > "$rendered.crds"
if [[ -s "$rendered.crds" ]]; then
    "${kubectl[@]}" apply -f "$rendered.crds"
    "${kubectl[@]}" wait --for condition=established --timeout=60s -f "$rendered.crds"
fi
# PodDisruptionBudget is policy/v1 from Kubernetes 1.21; older servers serve only policy/v1beta1 (same fields).
if ! "${kubectl[@]}" api-versions | grep -qx 'policy/v1'; then
    sed -i 's#^apiVersion: policy/v1$#apiVersion: policy/v1beta1#' "$rendered"
fi
"${kubectl[@]}" apply -f "$rendered"
if awk 'BEGIN { RS = "\n---\n" } /(^|\n)kind: Deployment\n/ && /\n  name: laneproxy-controller\n/ { found = 1 }
        END { exit !found }' "$rendered"; then
    "${kubectl[@]}" --namespace laneproxy-system rollout status deployment/laneproxy-controller --timeout=300s
fi
