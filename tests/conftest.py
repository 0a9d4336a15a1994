"""Under CI (CI=true) a skipped test fails the run: a skip of the SLURM, Horovod or ArviZ
tests there means a missing install step, which a green run must not hide."""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") == "true" and _skipped and exitstatus == 0:
        print(f"\nCI: {len(_skipped)} test(s) skipped, which CI counts as failures: {', '.join(_skipped)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
