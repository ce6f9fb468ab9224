"""Shared fixtures of the NAT tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .topology import Topology, TopologyUnavailable


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    """The namespace topology (home behind NAT, the internet, a relay), one per test module, removed after it
    even when a test failed; the module is skipped where namespaces cannot be made (not root)."""
    yield from namespace_topology(Topology())


def namespace_topology(topology: Topology) -> Iterator[Topology]:
    """For a module fixture: ``topology`` created, yielded, and removed even when a test failed; the module is
    skipped (with the reason) where namespaces cannot be made."""
    try:
        topo = topology.create()
    except TopologyUnavailable as exc:
        pytest.skip(f"NAT namespace test skipped: {exc}")
    try:
        yield topo
    finally:
        topo.remove()
