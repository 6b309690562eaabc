"""The interpreter address sanitizer (kernels/testing/interpreter_trace.py) on toy kernels."""
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the sanitizer hooks the Triton CPU interpreter")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sparo_fast_kernels.testing.interpreter_trace import (OutOfBoundsAccess, Recorder, address_runs,  # noqa: E402
                                                         distinct_bytes, listening, sanitize)


@triton.jit
def _copy_kernel(X, Y, n, EXTRA: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        # lanes past n are masked: their (out-of-bounds) addresses must not be checked
        v = tl.load(X + offs + EXTRA, mask=offs + EXTRA < n, other=0.0)
        tl.store(Y + offs, v, mask=offs < n)
    else:
        v = tl.load(X + offs + EXTRA)  # reads EXTRA elements past the end of X in the last block
        tl.store(Y + offs, v)


def _run(n, block, extra, masked):
    # views with a gap after them, so that an overrun cannot land inside the other argument
    x = torch.randn(n + 64)[:n]
    y = torch.empty(n + 64)[:n]
    _copy_kernel[(triton.cdiv(n, block),)](x, y, n, EXTRA=extra, MASKED=masked, BLOCK=block)
    return x, y


def _cause(exc: BaseException) -> str:
    """The message, with the interpreter's wrapping (it re-raises as InterpreterError(repr(e)))."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__
    return " | ".join(parts)


def test_out_of_bounds_load_is_caught_with_kernel_argument_and_offset():
    block = 2 ** int(torch.randint(4, 7, ()).item())
    n = 4 * block
    extra = int(torch.randint(1, 4, ()).item())
    with sanitize(), pytest.raises(Exception) as info:
        _run(n, block, extra, masked=False)
    msg = _cause(info.value)
    assert "out-of-bounds load" in msg and "_copy_kernel" in msg
    # the first bad lane is element n of X: named with its byte and element offset
    assert f"argument 'X' offset {4 * n} bytes ({n} elements), past its end" in msg
    assert f"{extra} unmasked lane(s)" in msg
    assert isinstance(info.value, OutOfBoundsAccess) or "OutOfBoundsAccess" in msg


def test_out_of_bounds_names_the_program():
    n = 64
    with sanitize(), pytest.raises(Exception) as info:
        _run(n, 16, 16, masked=False)  # the whole last block (program 3) reads X[64:80]
    assert "program (3, 0, 0)" in _cause(info.value)


def test_in_bounds_kernel_passes_and_is_correct():
    n = int(torch.randint(10, 200, ()).item())
    print(f"n = {n}")
    with sanitize():
        x, y = _run(n, 32, 0, masked=True)
    assert torch.equal(y, x)  # a copy: the same bits


def test_masked_lanes_are_not_checked():
    n = int(torch.randint(10, 200, ()).item())
    extra = int(torch.randint(1, 8, ()).item())
    print(f"n = {n}, extra = {extra}")
    with sanitize():  # masked lanes compute addresses up to X + n + BLOCK: not checked
        x, y = _run(n, 32, extra, masked=True)
    assert torch.equal(y[: n - extra], x[extra:])  # a shifted copy: the same bits


def test_a_view_bounds_are_its_own_not_its_storage():
    base = torch.randn(96)
    x, y = base[16:48], torch.empty(32)
    with sanitize(), pytest.raises(Exception) as info:
        _copy_kernel[(1,)](x, y, 32, EXTRA=8, MASKED=False, BLOCK=32)  # reads base[56:...] outside the view
    assert "out-of-bounds load" in _cause(info.value)


def test_recorder_counts_unmasked_lanes_and_distinct_bytes():
    n = int(torch.randint(33, 200, ()).item())
    with listening(Recorder()) as rec:
        _run(n, 32, 0, masked=True)
    (launch,) = rec.launches
    assert launch.kernel == "_copy_kernel"
    assert launch.load_bytes == 4 * n and launch.store_bytes == 4 * n
    assert launch.distinct_bytes == 8 * n
    assert launch.programs == triton.cdiv(n, 32)


def test_distinct_bytes_of_address_runs_are_the_bytes_touched():
    """Runs of consecutive elements (the recorder's compression) give the union of the bytes the
    lanes touch, whatever the overlaps, gaps, repeats and element sizes of the accesses."""
    seed = int(torch.randint(0, 2**31, ()).item())
    print("seed", seed)
    rng = np.random.default_rng(seed)
    touched, starts, ends = set(), [], []
    for _ in range(20):
        size = int(rng.choice([1, 2, 4, 8]))
        addrs = size * rng.integers(0, 200, int(rng.integers(1, 60)))  # repeats and gaps
        s, e = address_runs(addrs.astype(np.uint64), size)
        assert np.all(s[1:] > e[:-1])  # maximal runs: none touches the next
        starts.append(s)
        ends.append(e)
        touched.update(b for a in addrs.tolist() for b in range(a, a + size))
    assert distinct_bytes(np.concatenate(starts), np.concatenate(ends)) == len(touched)


def test_sanitizer_is_on_in_every_test():
    with pytest.raises(Exception) as info:  # the autouse fixture of tests/conftest.py
        _run(64, 64, 1, masked=False)
    assert "out-of-bounds load" in _cause(info.value)
