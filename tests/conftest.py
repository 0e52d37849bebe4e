"""Fixtures shared by test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (a second OpenMP thread only adds fork/join waits, and on a
    shared 2-core box far worse), restored after: later tests compare in-process runs with subprocesses that take the
    machine's default, and a leaked count changes float sums (it failed test_trainer's resume parity in CI)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
