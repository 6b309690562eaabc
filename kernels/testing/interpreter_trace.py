"""Hooks on the Triton CPU interpreter's memory operations: an address sanitizer and a recorder.

Under ``TRITON_INTERPRET=1`` every ``tl.load``/``tl.store`` (plain, masked, through a tensor
descriptor) ends in ``InterpreterBuilder.create_masked_load/create_masked_store``, and every
launch in ``GridExecutor.__call__``, which first makes host copies of the tensor arguments
(``_init_args_hst``); the interpreter's pointers are those copies' addresses. We wrap these
methods (once, on first use) and hand each launch's tensors and each access's *unmasked*
addresses to the active listeners:

* :func:`sanitize` (a context manager) checks that every unmasked address of a load, store or
  atomic lies inside one of the tensors passed to the launch, and otherwise fails with the
  kernel, the nearest argument, the offset and the program id.
* :class:`Recorder` collects per launch: requested bytes (every unmasked access), distinct
  bytes (the union of the byte ranges touched), ``tl.dot`` FLOPs and the launch grid; ``bench/traffic.py`` uses it.
* :func:`sampling` runs a chosen subset of a launch's programs (``access_stream`` records the
  per-program access streams of a few programs and translates them to the rest).

With no listener active the wrappers cost one list test per access. The check is "inside some
argument", not "inside the argument the pointer came from": the interpreter does not track a
pointer's provenance.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ..sparo_readout_common import DISCARD_ASM, interpreter_discards

_listeners: list = []
_lock = threading.Lock()
_installed = False


class OutOfBoundsAccess(RuntimeError):
    """An unmasked interpreter load/store outside every tensor argument of its launch."""


@dataclass
class _Arg:
    name: str
    lo: int      # first byte of the tensor's view
    hi: int      # one past its last byte
    base: int    # data_ptr(), from which offsets are reported
    itemsize: int
    storage: object = None  # the tensor's untyped storage (access streams map addresses through it)


def _span(t) -> Tuple[int, int]:
    """Byte range [lo, hi) covered by a strided view (empty views cover nothing)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        (lo, hi) = (lo + (size - 1) * stride, hi) if stride < 0 else (lo, hi + (size - 1) * stride)
    item = t.element_size()
    return t.data_ptr() + lo * item, t.data_ptr() + (hi + 1) * item


def _collect(name: str, arg, out: List[_Arg]) -> None:
    if isinstance(arg, (tuple, list)):
        for i, a in enumerate(arg):
            _collect(f"{name}[{i}]", a, out)
    elif hasattr(arg, "base") and hasattr(arg, "block_shape"):  # a TensorDescriptor
        _collect(name, arg.base, out)
    elif hasattr(arg, "data_ptr"):
        t = arg.base if type(arg).__name__ == "TensorWrapper" else arg  # a dtype-reinterpreting wrapper
        lo, hi = _span(t)
        out.append(_Arg(name, lo, hi, t.data_ptr(), t.element_size(), t.untyped_storage()))


@dataclass
class _Launch:
    kernel: str
    args: List[_Arg]
    grid_idx: Tuple[int, int, int] = (0, 0, 0)
    grid: Tuple[int, int, int] = (1, 1, 1)  # the launch grid (set when the interpreter sizes it)


_current: Optional[_Launch] = None
_launch_depth = 0
#: program samplers (see :func:`sampling`) and the running sub-grid: (full grid, chosen programs)
_samplers: list = []
_selection: Optional[tuple] = None


def in_launch() -> bool:
    """True while an interpreter launch runs (its host copies of the arguments are not traffic)."""
    return _launch_depth > 0


def _wrap_launches(gx, ib) -> None:
    """Wrap the launch methods: each launch's tensor arguments and grid go to the listeners; a
    sampler (``sampling``) chooses which programs of a launch run."""
    orig_init, orig_call = gx._init_args_hst, gx.__call__
    orig_idx, orig_dim = ib.set_grid_idx, ib.set_grid_dim

    def _init_args_hst(self, args_dev, kwargs):
        global _current
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        if _listeners and _current is None:  # a sampled launch runs the interpreter more than once
            found: List[_Arg] = []
            for name, a in zip(self.arg_names, args_hst):
                _collect(name, a, found)
            for name, a in kwargs_hst.items():
                _collect(name, a, found)
            _current = _Launch(self.fn.__name__, found)
            for lst in list(_listeners):
                lst.launch_begin(_current)
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        global _current, _launch_depth
        _launch_depth += 1
        try:
            if not _samplers or callable(self.grid):
                return orig_call(self, *args, **kwargs)
            return _run_sampled(self, orig_call, args, kwargs)
        finally:
            _launch_depth -= 1
            if _current is not None:
                launch, _current = _current, None
                for lst in list(_listeners):
                    lst.launch_end(launch)

    def set_grid_idx(self, x, y, z):
        if _selection is not None:
            x, y, z = _selection[1][x]
        if _current is not None:
            _current.grid_idx = (x, y, z)
        return orig_idx(self, x, y, z)

    def set_grid_dim(self, x, y, z):
        if _selection is not None:
            x, y, z = _selection[0]
        if _current is not None:
            _current.grid = (x, y, z)
        return orig_dim(self, x, y, z)

    gx._init_args_hst, gx.__call__ = _init_args_hst, __call__
    ib.set_grid_idx, ib.set_grid_dim = set_grid_idx, set_grid_dim


def _run_sampled(executor, orig_call, args, kwargs):
    """A sampled launch: run the programs the sampler asks for, a batch at a time, as a grid of
    that many programs whose indices ``set_grid_idx`` maps back to the real ones."""
    global _selection
    full, real = tuple(executor.grid) + (1,) * (3 - len(executor.grid)), executor.grid
    try:
        while True:
            chosen = _samplers[-1].next_programs(executor.fn.__name__, full)
            if not chosen:
                return None
            _selection, executor.grid = (full, list(chosen)), (len(chosen),)
            orig_call(executor, *args, **kwargs)
    finally:
        _selection, executor.grid = None, real


def _notify(interpreter, kind, ptrs, mask, policy=None) -> None:
    """Hand the unmasked addresses of one access to the listeners (with its eviction hint to
    those that want hints; a fully masked access moves nothing, but stream recorders still see
    it as a step)."""
    if _current is None:
        return
    addrs = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
    addrs = np.asarray(addrs, dtype=np.uint64).ravel()
    for lst in list(_listeners):
        if addrs.size or getattr(lst, "wants_empty", False):
            if getattr(lst, "wants_hints", False):
                lst.access(_current, kind, addrs, itemsize, hint=_hint(policy))
            else:
                lst.access(_current, kind, addrs, itemsize)


def _policy(a, k):
    """The eviction policy argument of a masked load/store call."""
    return k.get("eviction_policy", a[1] if len(a) > 1 else None)


def _wrap_memory(ib, interpreter) -> None:
    """Wrap the memory methods (loads, stores, atomics) and ``tl.dot`` (its FLOPs)."""
    orig_load, orig_store = ib.create_masked_load, ib.create_masked_store
    orig_rmw, orig_cas, orig_dot = ib.create_atomic_rmw, ib.create_atomic_cas, ib.create_dot

    def create_masked_load(self, ptrs, mask, other, *a, **k):
        if _listeners:
            _notify(interpreter, "load", ptrs, mask, _policy(a, k))
        return orig_load(self, ptrs, mask, other, *a, **k)

    def create_masked_store(self, ptrs, value, mask, *a, **k):
        if _listeners:
            _notify(interpreter, "store", ptrs, mask, _policy(a, k))
        return orig_store(self, ptrs, value, mask, *a, **k)

    def create_atomic_rmw(self, op, ptr, val, mask, *a, **k):
        if _listeners:
            _notify(interpreter, "atomic", ptr, mask)
        return orig_rmw(self, op, ptr, val, mask, *a, **k)

    def create_atomic_cas(self, ptr, cmp, val, *a, **k):
        if _listeners:
            _notify(interpreter, "atomic", ptr, None)
        return orig_cas(self, ptr, cmp, val, *a, **k)

    def create_dot(self, a, b, d, *rest, **k):
        if _listeners and _current is not None:
            sa, sb = a.data.shape, b.data.shape
            flops = 2 * int(np.prod(sa)) * sb[-1]  # [.., M, K] x [.., K, N]
            for lst in list(_listeners):
                lst.dot(_current, flops)
        return orig_dot(self, a, b, d, *rest, **k)

    ib.create_masked_load, ib.create_masked_store = create_masked_load, create_masked_store
    ib.create_atomic_rmw, ib.create_atomic_cas, ib.create_dot = create_atomic_rmw, create_atomic_cas, create_dot
    ib.create_inline_asm = _discard_or(ib.create_inline_asm, interpreter)


def _discard_or(orig_asm, interpreter):
    """The interpreter runs no inline assembly; the one asm block the kernels use, the L2 line
    discard (``sparo_readout_common._discard_lines``: operands ``mask, address``; a no-op on the
    CPU's memory, ``interpreter_discards``), goes to the listeners as a ``"discard"`` of each
    128-byte line."""

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        if DISCARD_ASM in asm and _listeners and _current is not None:
            mask, addrs = values
            lines = np.asarray(addrs.data, np.int64)[np.asarray(mask.data) != 0].astype(np.uint64).ravel()
            for lst in list(_listeners):
                if lines.size or getattr(lst, "wants_empty", False):
                    if getattr(lst, "wants_hints", False):
                        lst.access(_current, "discard", lines, LINE, hint=None)
                    else:
                        lst.access(_current, "discard", lines, LINE)
        return orig_asm(self, asm, constraints, values, types, is_pure, pack)

    return create_inline_asm


#: bytes one discard drops (its only size)
LINE = 128




def _install() -> None:
    """Wrap the interpreter's launch and memory methods (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        from triton.runtime import interpreter as I

        interpreter_discards()  # wrapped below: the listeners see the discards
        _wrap_launches(I.GridExecutor, I.InterpreterBuilder)
        _wrap_memory(I.InterpreterBuilder, I)
        _installed = True


def _hint(policy) -> Optional[str]:
    """``"evict_first"`` / ``"evict_last"`` from an access's eviction policy, else None."""
    name = str(getattr(policy, "name", policy) or "").lower()
    return next((h for h in ("evict_first", "evict_last") if h in name), None)


@contextlib.contextmanager
def listening(listener) -> Iterator:
    """Route interpreter launches and accesses to ``listener`` inside the block."""
    _install()
    _listeners.append(listener)
    try:
        yield listener
    finally:
        _listeners.remove(listener)


@contextlib.contextmanager
def sampling(sampler) -> Iterator:
    """Run only the programs ``sampler`` picks of each launch with a tuple grid, inside the block.

    Per launch the interpreter calls ``sampler.next_programs(kernel, grid)`` (grid padded to 3
    dimensions) until it returns an empty list; each call's programs run in the order given, with
    ``tl.program_id`` and ``tl.num_programs`` those of the full grid. Listeners see one launch.
    Programs not run leave their outputs unwritten: only for recording access streams that do
    not depend on the data.
    """
    _install()
    _samplers.append(sampler)
    try:
        yield sampler
    finally:
        _samplers.remove(sampler)


class _Listener:
    def launch_begin(self, launch: _Launch) -> None:
        pass

    def launch_end(self, launch: _Launch) -> None:
        pass

    def access(self, launch: _Launch, kind: str, addrs: np.ndarray, itemsize: int) -> None:
        pass

    def dot(self, launch: _Launch, flops: int) -> None:
        pass


class Sanitizer(_Listener):
    def access(self, launch, kind, addrs, itemsize):
        ok = np.zeros(addrs.shape, dtype=bool)
        for a in launch.args:
            ok |= (addrs >= np.uint64(a.lo)) & (addrs + np.uint64(itemsize) <= np.uint64(a.hi))
        if not ok.all():
            raise OutOfBoundsAccess(_describe(launch, kind, int(addrs[~ok][0]), int((~ok).sum()), itemsize))


def _describe(launch: _Launch, kind: str, addr: int, count: int, itemsize: int) -> str:
    if not launch.args:
        return f"{launch.kernel}: {kind} at 0x{addr:x} but the launch has no tensor arguments"
    near = min(launch.args, key=lambda a: 0 if a.lo <= addr < a.hi else min(abs(addr - a.lo), abs(addr - a.hi)))
    off = addr - near.base
    where = ("past its end" if addr >= near.hi else "before its start") + f" ({near.hi - near.lo} bytes)"
    return (f"out-of-bounds {kind} in kernel {launch.kernel}, program {launch.grid_idx}: argument "
            f"{near.name!r} offset {off} bytes ({off / near.itemsize:g} elements), {where}; "
            f"{count} unmasked lane(s) of {itemsize} bytes outside every tensor argument")


@contextlib.contextmanager
def sanitize() -> Iterator[Sanitizer]:
    """Fail any interpreter load/store/atomic whose unmasked address is outside the launch's tensors."""
    with listening(Sanitizer()) as s:
        yield s


@contextlib.contextmanager
def sanitize_if_interpreting() -> Iterator[Optional[Sanitizer]]:
    """``sanitize()`` under ``TRITON_INTERPRET=1``, nothing on a GPU: the test fixtures' body."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield None
        return
    with sanitize() as s:
        yield s


# ----------------------------------------------------------------------------- recorder
def distinct_bytes(starts: np.ndarray, ends: np.ndarray) -> int:
    """Bytes in the union of the ranges [start, end)."""
    if starts.size == 0:
        return 0
    order = np.argsort(starts, kind="stable")
    s = starts[order].astype(np.int64)
    e = ends[order].astype(np.int64)
    prev_end = np.concatenate(([np.iinfo(np.int64).min], np.maximum.accumulate(e)[:-1]))
    return int(np.maximum(0, e - np.maximum(s, prev_end)).sum())


def address_runs(addrs: np.ndarray, itemsize: int) -> Tuple[np.ndarray, np.ndarray]:
    """The accessed elements as runs [start, end) of consecutive elements: a tile's row is one run,
    so a launch's union is formed from a few runs per access instead of one entry per lane (the
    backward of a large batch touched some 10^9 lanes: tens of GB as addresses)."""
    a = np.unique(addrs).astype(np.int64)
    cut = np.flatnonzero(np.diff(a) != itemsize) + 1
    first = np.concatenate(([0], cut))
    last = np.concatenate((cut - 1, [a.size - 1]))
    return a[first], a[last] + itemsize


@dataclass
class LaunchRecord:
    kernel: str
    programs: int = 0         # programs that accessed memory
    grid: Tuple[int, int, int] = (1, 1, 1)  # the launch grid: every program, busy or not
    load_bytes: int = 0       # every unmasked load lane
    store_bytes: int = 0      # every unmasked store / atomic lane
    distinct_bytes: int = 0   # union of all byte ranges touched
    distinct_load_bytes: int = 0
    distinct_store_bytes: int = 0
    flops: int = 0            # tl.dot only
    _chunks: dict = field(default_factory=lambda: {"load": [], "store": []}, repr=False)

    @property
    def requested_bytes(self) -> int:
        return self.load_bytes + self.store_bytes


class Recorder(_Listener):
    """Collects a :class:`LaunchRecord` per interpreter launch, in launch order."""

    def __init__(self) -> None:
        self.launches: List[LaunchRecord] = []
        self._programs: set = set()

    def launch_begin(self, launch):
        self.launches.append(LaunchRecord(launch.kernel))
        self._programs = set()

    def access(self, launch, kind, addrs, itemsize):
        if kind == "discard":  # drops cached lines: no bytes requested or moved
            return
        rec = self.launches[-1]
        self._programs.add(launch.grid_idx)
        nbytes = int(addrs.size) * itemsize
        if kind == "load":
            rec.load_bytes += nbytes
        else:
            rec.store_bytes += nbytes
        key = "load" if kind == "load" else "store"
        rec._chunks[key].append(address_runs(addrs, itemsize))

    def dot(self, launch, flops):
        self.launches[-1].flops += flops

    def launch_end(self, launch):
        rec = self.launches[-1]
        rec.programs = len(self._programs)
        rec.grid = tuple(launch.grid)
        parts = {}
        for key, chunks in rec._chunks.items():
            starts = np.concatenate([s for s, _ in chunks]) if chunks else np.zeros(0, np.int64)
            ends = np.concatenate([e for _, e in chunks]) if chunks else np.zeros(0, np.int64)
            parts[key] = (starts, ends)
        rec.distinct_load_bytes = distinct_bytes(*parts["load"])
        rec.distinct_store_bytes = distinct_bytes(*parts["store"])
        rec.distinct_bytes = distinct_bytes(np.concatenate([parts["load"][0], parts["store"][0]]),
                                            np.concatenate([parts["load"][1], parts["store"][1]]))
        rec._chunks = {"load": [], "store": []}
