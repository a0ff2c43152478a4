import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests run many small kernels: intra-op threads only add wake-up latency (and stall on a
    loaded 2-core machine). Each module runs on one thread and restores the setting after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
