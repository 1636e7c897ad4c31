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


def pytest_terminal_summary(terminalreporter) -> None:
    """After a run that included tests/test_docs.py: how many documentation code blocks ran."""
    marker = "test_docs.py::test_page_code_blocks_run["
    passed = {r.nodeid.split(marker, 1)[1][:-1] for r in terminalreporter.stats.get("passed", [])
              if marker in getattr(r, "nodeid", "") and r.when == "call"}  # fmt: skip
    if not passed:
        return
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("_docs_blocks", os.path.join(os.path.dirname(__file__), "test_docs.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    terminalreporter.write_line(module.block_summary(passed))
