"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread(request):
    """Tensors this small train faster on one thread, and far faster when other jobs share the CPU. Applies to the
    modules marked ``pytestmark = pytest.mark.single_torch_thread``, before any of their own fixtures build a model
    (autouse fixtures come first within a scope)."""
    if request.node.get_closest_marker("single_torch_thread") is None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
