"""Shared test settings: deterministic, CPU, float32 matmuls; hypothesis sized for a 2-core CI."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# One intra-op thread: tests use tiny tensors, where a second thread costs far more in
# synchronisation than it saves (measured: a tiny grouped conv2d ~30 ms with 2 threads, ~15 us with 1).
# pytest-xdist runs two workers instead.
torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
