"""Fixtures of the probes tests: a small Sequential, a HookedRootModule policy, a bridge."""

from __future__ import annotations

import pytest
from torch import nn

from tests.probes.helpers import make_bridge, make_policy, make_sequential


@pytest.fixture
def seq() -> nn.Sequential:
    return make_sequential()


@pytest.fixture
def policy() -> nn.Module:
    return make_policy()


@pytest.fixture(scope="session")
def bridge() -> nn.Module:
    return make_bridge()
