"""One local Ray cluster (2 CPUs = 2 workers) shared by every Ray test of the session; import the fixture
(`from conftest_ray import ray_session`) until it moves into tests/conftest.py."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)  # a local cluster, never someone else's
    from i2l.cluster import ensure_ray

    ray = ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
