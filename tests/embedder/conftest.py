"""Fixtures of the Ray tests in tests/embedder/ and tests/embedder/runners/."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 3 logical CPUs for the module; yields its address (for drivers in subprocesses).

    Module scope, not session: a cluster left up after its module would be the connected one in
    modules that must find none (``ray.is_initialized()`` false) or that start their own multi-node
    cluster (tests/embedder/runners/ray_nodes.py).
    """
    import ray

    ray.init(num_cpus=3, object_store_memory=1_000_000_000, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
