"""The L2-aware count: a pass's line stream (Triton launches and the PyTorch ops between them)
through the LRU model of ``bench/l2_cache.py``. Counted, not timed.

``bench/traffic.py --l2 50MB,40MB`` runs each case once more at the benchmark batch with an
``access_stream.StreamRecorder`` that records a few programs of every launch and translates
them to the rest (``kernels/testing/access_stream.py``), and a ``TorchOpCounter`` that gives
every PyTorch op a line stream: its inputs read (in argument order), then its outputs written.
The launches' programs are interleaved as resident waves (``--l2-resident``, default the
H100's 132 SMs, one program each) and the whole pass, in launch order, goes through one cold
cache per size. DRAM bytes = 32 x (sectors read on a miss + dirty sectors of the lines evicted
+ dirty sectors left at the end of the pass): lines of 128 bytes, DRAM moved by 32-byte sector.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import l2_cache
from sparo_fast_kernels.testing import access_stream as st
from sparo_fast_kernels.testing import interpreter_trace as trace

#: op tensors with more elements than this and a layout with gaps count their whole span
ENUMERATE_LIMIT = 1 << 24


def tensor_intervals(t: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Byte intervals [start, end) (real addresses) of a view's distinct elements."""
    if t.numel() == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    item, ptr = t.element_size(), t.data_ptr()
    dims = sorted(((abs(st_), n) for n, st_ in zip(t.shape, t.stride()) if st_ != 0 and n > 1))
    lo = ptr + item * sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    dense, expect = True, 1
    for stride, n in dims:
        dense &= stride == expect
        expect = stride * n
    count = int(np.prod([n for _, n in dims])) if dims else 1
    if dense or count > ENUMERATE_LIMIT:  # dense, or too many to list: the span
        hi = lo + item * (sum((n - 1) * s for s, n in dims) + 1)
        return np.array([lo]), np.array([hi])
    off = np.zeros(1, np.int64)
    for stride, n in dims:
        off = (off[None, :] + stride * np.arange(n)[:, None]).ravel()
    starts = np.unique(lo + item * off)
    return starts, starts + item


def _lines(space: st.AddressSpace, tensors: Sequence[torch.Tensor], label: str = "") -> np.ndarray:
    out = []
    for i, t in enumerate(tensors):
        space.add(t.untyped_storage(), f"{label}{i} {'x'.join(map(str, t.shape))}" if label else None)
        s, e = tensor_intervals(t)
        if s.size:
            first, last = space.map(s) // l2_cache.LINE, (space.map(e - 1)) // l2_cache.LINE
            n = last - first + 1
            lines = st.ranges(first, n)
            out.append(lines[np.r_[True, lines[1:] != lines[:-1]]])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def op_lines(space: st.AddressSpace, ins: List[torch.Tensor], outs: List[torch.Tensor], op: str = "op"
             ) -> Tuple[np.ndarray, np.ndarray]:
    """A PyTorch op's stream: its inputs' lines read, then its outputs' lines written."""
    a, b = _lines(space, ins, f"{op}:in"), _lines(space, outs, f"{op}:out")
    return np.concatenate([a, b]), np.r_[np.full(a.size, l2_cache.LOAD, np.uint8), np.full(b.size, l2_cache.STORE, np.uint8)]


@contextlib.contextmanager
def recording(recorder: st.StreamRecorder):
    """Record the access streams inside the block; sampled launches leave programs unrun, so later
    launches compute on unwritten memory: numpy's overflow warnings are silenced."""
    with trace.listening(recorder), (trace.sampling(recorder) if recorder.sample else contextlib.nullcontext()), \
            np.errstate(all="ignore"):
        yield recorder


def pass_streams(events: List[dict], recorder: st.StreamRecorder, resident: int,
                 grids: Optional[Dict[str, int]] = None) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Each launch's line stream, in launch order (kernels from the recorder, ops from their events).
    ``grids``: kernels that launch fewer programs than ``resident`` on the GPU (persistent kernels
    whose interpreter grid is one program per work item): at most that many items run at once."""
    kernels = iter(recorder.launches)
    out = []
    for e in events:
        if e["kind"] == "kernel":
            k = next(kernels)
            if k.kernel != e["name"]:
                raise RuntimeError(f"stream of {k.kernel} where the count has {e['name']}")
            at_once = min(resident, (grids or {}).get(k.kernel, resident))
            out.append(st.interleave(k, at_once, l2_cache.LINE, l2_cache.SECTOR))
        else:
            out.append(e["stream"])
    return out


def simulate(streams: List[Tuple[np.ndarray, np.ndarray]], size: int, ways=None,
             space: Optional[st.AddressSpace] = None) -> Dict:
    """DRAM bytes of a pass through one cold cache: per launch (sectors read + dirty sectors of
    evicted lines) and the dirty sectors left at the end (``flush``); with ``space``, also per
    buffer (``by_buffer``: the storage's name, its size, and its bytes read, written back and
    flushed), which says whose lines a pass reads more than once."""
    cache = l2_cache.L2(size, ways)
    per, owner = [], _Owners(space) if space is not None else None
    for lines, kinds in streams:
        miss, victim, wbn = cache.access(lines, kinds)
        per.append({"read": int(miss.sum()) * l2_cache.SECTOR, "writeback": int(wbn.sum()) * l2_cache.SECTOR})
        if owner is not None:
            ev = victim >= 0
            per[-1]["by_buffer"] = owner.tally(lines, miss, victim[ev], wbn[ev])
    dirty, count = cache.dirty_sectors()
    flush = int(count.sum()) * l2_cache.SECTOR
    total = sum(p["read"] + p["writeback"] for p in per) + flush
    out = {"dram": total, "flush": flush, "per_launch": per, "lines": int(sum(s[0].size for s in streams))}
    if owner is not None:
        out["by_buffer"] = owner.pass_total(per, owner.tally(dirty[:0], dirty[:0], dirty, count))
    return out


class _Owners:
    """Line numbers -> the registered storage that holds them, for per-buffer reports."""

    def __init__(self, space: st.AddressSpace) -> None:
        self.bases, self.sizes, self.names = space.regions()

    def _bytes(self, lines: np.ndarray, sectors: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.bases, lines * l2_cache.LINE, side="right") - 1
        ok = idx >= 0
        return np.bincount(idx[ok], weights=sectors[ok], minlength=len(self.names)) * l2_cache.SECTOR

    def tally(self, lines: np.ndarray, read: np.ndarray, victims: np.ndarray, written: np.ndarray
              ) -> Dict[str, list]:
        """{buffer: [bytes read, bytes written back]} for the buffers with any: ``read`` sectors
        of ``lines``, ``written`` sectors of ``victims``."""
        r, w = self._bytes(lines, read.astype(np.int64)), self._bytes(victims, written.astype(np.int64))
        out: Dict[str, list] = {}
        for i in np.flatnonzero(r + w):  # storages that share a name (e.g. one per call) share a row
            acc = out.setdefault(self.names[i], [0, 0])
            acc[0] += int(r[i])
            acc[1] += int(w[i])
        return out

    def pass_total(self, per: List[dict], flushed: Dict[str, list]) -> List[dict]:
        """The pass's rows, largest traffic first: name, size, read, writeback, flush (bytes)."""
        rows: Dict[str, dict] = {}
        size: Dict[str, int] = {}
        for name, n in zip(self.names, self.sizes.tolist()):
            size[name] = size.get(name, 0) + n
        for p in per:
            for name, (r, w) in p["by_buffer"].items():
                row = rows.setdefault(name, {"buffer": name, "size": size[name], "read": 0, "writeback": 0, "flush": 0})
                row["read"] += r
                row["writeback"] += w
        for name, (_, f) in flushed.items():
            rows.setdefault(name, {"buffer": name, "size": size[name], "read": 0, "writeback": 0, "flush": 0})["flush"] += f
        return sorted(rows.values(), key=lambda r: -(r["read"] + r["writeback"] + r["flush"]))
