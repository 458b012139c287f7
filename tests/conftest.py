"""Shared fixtures (small random layer problems of awkward sizes, in float64) and the
``missing`` marker of :func:`helpers.needs`."""

from __future__ import annotations

import pytest

from hasslefree.hessian import prepare_hessian

from helpers import correlated_problem




@pytest.fixture
def problem():
    weight, hessian = correlated_problem(37, 48)
    return weight, hessian, prepare_hessian(hessian)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "missing(reason): a required resource is missing; the test fails")
    config.addinivalue_line("markers", "needs_ok: a resource the test needs is present")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("missing")
    if marker is not None:
        pytest.fail(f"{marker.args[0]} (HASSLEFREE_REQUIRE_DATA=1: the resource is required here)", pytrace=False)
