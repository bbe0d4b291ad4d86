"""The cluster tier's fixtures: one single-node cluster per run of this package (behind a machine-wide lock), the
project's image imported into it, and a namespace per test.

The session's teardown fails the run when the cluster left anything on the host or when the firewall counted a
packet to the link-local range or of the cluster's ranges leaving the machine (tests/cluster/node.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.cluster.node import WORKDIR, Cluster, ensure_built, machine_lock  # noqa: E402
from tests.image.hosttools import build_image  # noqa: E402


# Package scope: the cluster (about 700 MiB, and kubelet's housekeeping) is gone before the rest of the suite runs.
@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    cache = ensure_built()
    image = build_image()
    with machine_lock():
        node = Cluster(cache).start()
        try:
            archive = WORKDIR / "laneproxy-image.tar"
            # Built again and saved under the image lock: another checkout may have tagged its own build since.
            image = build_image(save_to=archive)
            node.import_image(archive)
            archive.unlink()
            node.image = image.name
            sys.stderr.write(f"\n[cluster] started in {node.timings['start_s']:.1f}s, "
                             f"control plane and runtime RSS {node.rss_mib():.0f} MiB\n")
            yield node
        finally:
            counts = node.firewall_counts()
            rss = node.rss_mib()
            leftovers = node.stop(check=False)
            sys.stderr.write(f"\n[cluster] RSS before teardown {rss:.0f} MiB, teardown "
                             f"{node.timings['teardown_s']:.1f}s, firewall counts {json.dumps(counts)}\n")
            problems = []
            if leftovers:
                problems.append(f"left on the host after teardown: {json.dumps(leftovers, indent=2)}")
            if any(counts.values()):
                problems.append(f"packets that must never be sent: {counts}")
            if problems:
                pytest.fail("\n".join(problems))


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
