#!/usr/bin/env bash
# Give the injector its serving certificate: a private CA and a certificate for
# laneproxy-webhook.laneproxy-system.svc, stored as the Secret laneproxy-webhook-tls, and the CA as the
# caBundle of both webhooks in the MutatingWebhookConfiguration laneproxy. Run it once after the first
# `kubectl apply -k`, and again to rotate (the webhook reloads the files; no restart).
#
# Usage: deploy/base/webhook/certs.sh [kubectl options...]      e.g. --kubeconfig FILE --context NAME
# Needs openssl and kubectl. DAYS (default 365) sets the validity.
#
# With cert-manager instead: a Certificate writing the Secret laneproxy-webhook-tls (dnsNames as below) and
# the annotation `cert-manager.io/inject-ca-from: laneproxy-system/laneproxy-webhook` on the
# MutatingWebhookConfiguration; then this script is not needed.
set -euo pipefail
NAMESPACE=laneproxy-system
SERVICE=laneproxy-webhook
SECRET=laneproxy-webhook-tls
CONFIGURATION=laneproxy
DAYS="${DAYS:-365}"
kubectl=(kubectl "$@")

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days "$DAYS" -subj "/CN=laneproxy-webhook-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new "${ec[@]}" -keyout tls.key -out tls.csr -subj "/CN=${SERVICE}.${NAMESPACE}.svc" 2>/dev/null
printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=DNS:${SERVICE}.${NAMESPACE}.svc,DNS:${SERVICE}.${NAMESPACE}.svc.cluster.local" > tls.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$DAYS" -extfile tls.ext \
    -out tls.crt 2>/dev/null

"${kubectl[@]}" --namespace "$NAMESPACE" create secret tls "$SECRET" --cert tls.crt --key tls.key \
    --dry-run=client --output yaml | "${kubectl[@]}" apply -f -
bundle="$(base64 -w0 ca.crt)"
"${kubectl[@]}" patch mutatingwebhookconfiguration "$CONFIGURATION" --type json --patch \
    "[{\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"${bundle}\"},
      {\"op\": \"add\", \"path\": \"/webhooks/1/clientConfig/caBundle\", \"value\": \"${bundle}\"}]"
echo "certs.sh: Secret ${NAMESPACE}/${SECRET} written, caBundle of ${CONFIGURATION} set (valid ${DAYS} days)"
