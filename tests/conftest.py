"""Unit-test fixtures (shared helpers live in ``rule_helpers.py``)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
