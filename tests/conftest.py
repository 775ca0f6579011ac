"""Shared pytest setup: CPU-friendly defaults and a seeded RNG."""
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# idle OpenMP threads sleep instead of spinning: small CPU ops stay fast on a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def seed() -> int:
    """Seed torch's global RNG for a reproducible test; returns the seed."""
    torch.manual_seed(0)
    return 0
