"""The fast layer's one setting of its own: each in-process test computes with one torch thread.

Its networks and batches are tiny, so a second thread buys nothing; on a machine whose cores are busy (another
test run, a launch) torch's spinning worker threads made tests/unit 2-2.5x slower, and the timing check of
test_engine.py fail. The thread count is restored after each test; what a test launches gets one thread from
tests/conftest.py's OMP_NUM_THREADS."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
