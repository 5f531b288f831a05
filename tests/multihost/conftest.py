"""A cluster of 2 network-namespace hosts for this directory's tests (tests/multihost/cluster.py).

Skipped where network namespaces cannot be made (not root, no iproute2), unless ECDIT_REQUIRE_NETNS=1
(CI sets it), which turns that into a failure."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, can_make_namespaces  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    reason = can_make_namespaces()
    if reason:
        if os.environ.get("ECDIT_REQUIRE_NETNS") == "1":
            pytest.fail(f"ECDIT_REQUIRE_NETNS=1 but {reason}")
        pytest.skip(f"multi-host tests skipped: {reason}")
    with Cluster(2, prefix=f"ecmh{os.getpid() % 10000}") as c:
        yield c
