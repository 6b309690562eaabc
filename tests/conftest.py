import os
import socket

import torch
import torch.distributed as dist

# Kernel tests run the real Triton kernels through the interpreter when there is no GPU. Triton
# reads this when a kernel is defined, so it must be set before the kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from sparo_fast_kernels.testing.interpreter_trace import sanitize_if_interpreting  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=False)
# many more random examples, for measuring the accuracy criterion (see tests/accuracy.py)
settings.register_profile("calibrate", deadline=None, max_examples=200, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _sanitize_interpreter_kernels():
    """Every test: an unmasked interpreter load/store outside the launch's tensors fails the test."""
    with sanitize_if_interpreting():
        yield


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank gloo process group on a free local port, for trainer pieces tested in-process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()
