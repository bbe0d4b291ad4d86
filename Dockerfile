# laneproxy: one image for every role. The entrypoint is `laneproxy`; the arguments choose the role:
#   run (gateway or sidecar), capture --apply (the init container), webhook, mock, inject, validate, crds,
#   demo (the local full chain; --network=host, and a tmpfs on /tmp for its endpoints file with --read-only).
#
# The build needs no network: it installs from build/wheelhouse, a directory of wheels (laneproxy's own and
# every dependency, pinned to the versions of the development environment) that tests/image/build_image.sh
# makes on the host with pip. Build with:   tests/image/build_image.sh            (podman, or TOOL=docker)
#
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 (and python3-venv); iptables is installed from its
# package sources when missing. The tests use a debootstrap-made Debian 12 base that already has it.
#
# At run time: uid 1337 (the uid the capture rules exempt), nothing written to the root filesystem
# (bytecode is compiled at build time), so `readOnlyRootFilesystem: true` / `--read-only` works.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS install
ARG LANEPROXY_VERSION=0.1.0
COPY build/wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/laneproxy \
    && /opt/laneproxy/bin/python -m pip install --no-cache-dir --no-index --find-links=/wheelhouse \
        "laneproxy[kubernetes,otlp,xds]==${LANEPROXY_VERSION}" \
    && /opt/laneproxy/bin/python -m pip install --no-cache-dir --no-index --find-links=/wheelhouse \
        --no-deps --force-reinstall /wheelhouse/opentelemetry_proto-*.whl \
    && /opt/laneproxy/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && /opt/laneproxy/bin/python -m compileall -q /opt/laneproxy/lib

FROM ${BASE_IMAGE}
# hadolint ignore=DL3008
RUN if ! command -v iptables-restore >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends iptables \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 1337 laneproxy \
    && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin laneproxy
COPY --from=install /opt/laneproxy /opt/laneproxy
ENV PATH=/opt/laneproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1337:1337
# admin (loopback unless told otherwise), outbound, inbound, the mock's and the gateway's usual ports, webhook
EXPOSE 15000 15001 15006 8000 8080 9443
ENTRYPOINT ["laneproxy"]
CMD ["--help"]
