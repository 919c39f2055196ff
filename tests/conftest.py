"""Fixtures for every test: the synthetic dataset, offline hub and W&B, and (with DISTCIFAR_REQUIRE_ALL=1,
as .ci/run sets it) no silent skips. Shared helpers live in support/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from support import write_parquet_dataset


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("synthetic") / "cifar10")


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = os.environ.get("DISTCIFAR_TEST_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip(
            "set DISTCIFAR_TEST_DATA to a local CIFAR-10 copy (train.parquet, test.parquet) for real-data tests"
        )
    return Path(path)


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path_factory):
    # One thread for whatever a test launches (a test that is about threads sets its own): .ci/run's test
    # workers share the cores, and OpenMP threads spinning on an oversubscribed core slowed launched runs several-fold
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("DISTCIFAR_CACHE", str(tmp_path_factory.getbasetemp() / "decoded-cache"))


# .ci/run hands whole files to its workers in collection order (--no-loadscope-reorder): the longest files go first
# so that the short ones fill the gaps at the end (per-file times: tests/README.md)
LONGEST_FIRST = [
    "test_train.py",
    "test_faults.py",
    "test_slurm.py",
    "test_cpu_recipe.py",
    "test_distributed.py",
    "test_checkpoint_runs.py",
    "test_restarts.py",
    "test_export.py",
]


def pytest_collection_modifyitems(items):
    def order(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=order)  # a stable sort: each file's tests keep their order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With DISTCIFAR_REQUIRE_ALL=1 (.ci/run sets it) a skipped test fails: CI must not turn green
    with the Slurm cluster, the real data or a slow test missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("DISTCIFAR_REQUIRE_ALL") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped, but DISTCIFAR_REQUIRE_ALL=1 requires it to run: {reason}"


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a test that builds its own Accelerator in the pytest process
    starts from, and leaves, a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def isolated_wandb_env(tmp_path, monkeypatch):
    """No W&B credentials or mode from the machine; HOME and W&B's own folders under tmp_path. The tracking
    tests use it for every test (pytestmark = pytest.mark.usefixtures("isolated_wandb_env"))."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_BASE_URL",
        "NETRC",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_NAME",
        "WANDB_RUN_GROUP",
        "WANDB_TAGS",
        "WANDB_RESUME",
        "WANDB_DIR",
    ):
        monkeypatch.delenv(name, raising=False)  # runs go to OUTPUT_DIR/wandb unless a test sets WANDB_DIR
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's captured stdout/stderr unwrapped
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    if "wandb" in sys.modules:  # wandb caches its settings (the mode too) process-wide until teardown
        sys.modules["wandb"].teardown()


@pytest.fixture
def offline_wandb(monkeypatch):
    """W&B in offline mode (with isolated_wandb_env, which clears the machine's WANDB_MODE)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
