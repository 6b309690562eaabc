"""An LRU model of a GPU's L2 cache, fed with line-granular accesses: counted, not timed.

:class:`L2` holds the state of one cache across calls (one call per launch, in launch order):
``access(lines, ops)`` takes the 128-byte line numbers of a stream and their kind (``LOAD``,
``STORE``, ``ATOMIC``) and returns, per access, whether it missed (a DRAM read of the line) and
whether it evicted a dirty line (a DRAM write of the evicted line); ``flush()`` counts the
lines still dirty at the end (written back eventually).

Policy: write-allocate without fetch (a store miss allocates the line and reads nothing: the
GPU's L2 keeps byte masks, so a written line need not be read first); an atomic reads the line
on a miss and dirties it; eviction of the least recently used line of the set. Eviction hints
(``EVICT_FIRST`` / ``EVICT_LAST`` or-ed into the kind, from ``tl.load(..., eviction_policy=)``):
a line last touched with evict_first is the next victim; lines last touched with evict_last
are evicted only when no other line is left (no cap on their share). ``ways=None``:
fully associative; ``ways=W``: ``size / (line x W)`` sets, a line's set is its number modulo the
set count (the hardware's address hash is not modelled).

Two implementations of the same algorithm: a small C loop compiled once with the system's C
compiler (``cc``) into ``~/.cache/sparo-fast/``, and pure Python (the fallback when no compiler
works, and the cross-check of ``bench/test_l2.py``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

LINE = 128
LOAD, STORE, ATOMIC = 0, 1, 2

#: hint bits or-ed into a kind: Triton's eviction_policy="evict_first" / "evict_last"
EVICT_FIRST, EVICT_LAST = 4, 8

_C_SRC = r"""
#include <stdint.h>
/* Fully associative LRU over dense line ids: two doubly linked lists, list 1 holding the lines
   last touched with evict_last; the victim is the head of list 0, or of list 1 when list 0 is
   empty; evict_first puts the line at the head of list 0 (the next victim), others at a tail.
   st = {head0, tail0, head1, tail1, count}; flag: 1 present, 2 dirty, 4 in list 1. */
static void unlink_(int64_t id, int64_t *prv, int64_t *nxt, int64_t *h, int64_t *t) {
  if (prv[id] >= 0) nxt[prv[id]] = nxt[id]; else *h = nxt[id];
  if (nxt[id] >= 0) prv[nxt[id]] = prv[id]; else *t = prv[id];
}
void lru_full(int64_t n, const int64_t *ids, const uint8_t *op, int64_t cap, int64_t *prv, int64_t *nxt,
              uint8_t *flag, int64_t *st, uint8_t *miss, uint8_t *wb) {
  for (int64_t i = 0; i < n; i++) {
    int64_t id = ids[i]; uint8_t o = op[i], kind = o & 3, m = 0, w = 0;
    if (flag[id] & 1) {
      int l = (flag[id] & 4) ? 2 : 0;
      unlink_(id, prv, nxt, &st[l], &st[l + 1]);
    } else {
      m = (kind != 1);
      if (st[4] == cap) {
        int l = st[0] >= 0 ? 0 : 2;
        int64_t v = st[l];
        unlink_(v, prv, nxt, &st[l], &st[l + 1]);
        w = (flag[v] & 2) != 0; flag[v] = 0; st[4]--;
      }
      st[4]++; flag[id] = 1;
    }
    if (kind) flag[id] |= 2;
    flag[id] &= 3;
    if (o & 8) flag[id] |= 4;
    int l = (o & 8) ? 2 : 0;
    if (o & 4) {  /* evict_first: head of list 0 */
      nxt[id] = st[0]; prv[id] = -1;
      if (st[0] >= 0) prv[st[0]] = id; else st[1] = id;
      st[0] = id;
    } else {
      prv[id] = st[l + 1]; nxt[id] = -1;
      if (st[l + 1] >= 0) nxt[st[l + 1]] = id; else st[l] = id;
      st[l + 1] = id;
    }
    miss[i] = m; wb[i] = w;
  }
}
/* set-associative LRU: set = line % sets, `ways` entries per set with a last-use stamp and a
   class (1: evict_last); the victim: an empty way, else class 0 before class 1, the smallest
   stamp first; evict_first stamps are negative, the latest the smallest (as the list's head). */
void lru_sets(int64_t n, const int64_t *lines, const uint8_t *op, int64_t sets, int64_t ways, int64_t *tag,
              int64_t *stamp, uint8_t *dirty, uint8_t *cls, int64_t *clock, uint8_t *miss, uint8_t *wb) {
  int64_t t = *clock;
  for (int64_t i = 0; i < n; i++) {
    int64_t s = lines[i] % sets, base = s * ways, hit = -1, victim = -1;
    uint8_t o = op[i], m = 0, w = 0;
    for (int64_t k = base; k < base + ways; k++) {
      if (tag[k] == lines[i]) { hit = k; break; }
      if (victim < 0 || (tag[victim] >= 0 && (tag[k] < 0 || cls[k] < cls[victim]
                                              || (cls[k] == cls[victim] && stamp[k] < stamp[victim]))))
        victim = k;
    }
    if (hit < 0) {
      m = ((o & 3) != 1);
      if (tag[victim] >= 0) w = dirty[victim];
      tag[victim] = lines[i]; dirty[victim] = 0; hit = victim;
    }
    if (o & 3) dirty[hit] = 1;
    cls[hit] = (o & 8) ? 1 : 0;
    ++t;
    stamp[hit] = (o & 4) ? -t : t;
    miss[i] = m; wb[i] = w;
  }
  *clock = t;
}
"""


def _compile() -> Optional[ctypes.CDLL]:
    if os.environ.get("SPARO_L2_PURE_PYTHON") == "1":
        return None
    digest = hashlib.sha1(_C_SRC.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparo-fast"
    so = cache / f"l2sim-{digest}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / f"l2sim-{digest}.c"
        src.write_text(_C_SRC)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                           capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
        os.replace(tmp, so)
    return ctypes.CDLL(str(so))


_LIB: Optional[ctypes.CDLL] = None
_TRIED = False


def native() -> Optional[ctypes.CDLL]:
    """The compiled loops, or None (no working C compiler: the Python loops are used)."""
    global _LIB, _TRIED
    if not _TRIED:
        _LIB, _TRIED = _compile(), True
    return _LIB


def parse_size(text: str) -> int:
    """``"50MB"`` -> 50,000,000 bytes (MB/GB decimal, MiB/GiB binary, plain digits: bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*", text)
    if not m:
        raise ValueError(f"L2 size {text!r}: expected a number with an optional unit (e.g. 50MB, 40MiB)")
    unit = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(float(m.group(1)) * unit[m.group(2)])


def _ptr(a: np.ndarray):
    return ctypes.c_void_p(a.ctypes.data)


class L2:
    """One cache's state; see the module docstring for the policy."""

    def __init__(self, size: int, ways: Optional[int] = None, line: int = LINE, use_native: bool = True) -> None:
        if size < line or (ways is not None and (ways < 1 or size // line < ways)):
            raise ValueError(f"L2 of {size} bytes with {ways} ways of {line}-byte lines holds no set")
        self.size, self.ways, self.line = size, ways, line
        self.capacity = size // line
        self.sets = 1 if ways is None else self.capacity // ways
        self.lib = native() if use_native else None
        if ways is None:
            # sorted line numbers seen so far and their dense ids (the C list is indexed by id)
            self._known, self._known_ids = np.zeros(0, np.int64), np.zeros(0, np.int64)
            self._prv = self._nxt = np.zeros(0, np.int64)
            self._flag = np.zeros(0, np.uint8)
            self._st = np.array([-1, -1, -1, -1, 0], np.int64)
        else:
            self._tag = np.full(self.sets * ways, -1, np.int64)
            self._stamp = np.zeros(self.sets * ways, np.int64)
            self._dirty = np.zeros(self.sets * ways, np.uint8)
            self._cls = np.zeros(self.sets * ways, np.uint8)
            self._clock = np.zeros(1, np.int64)
        # per set: (lines of list 0, lines of list 1: evict_last), each oldest first, value = dirty
        self._py = [(OrderedDict(), OrderedDict()) for _ in range(self.sets)] if self.lib is None else None

    def access(self, lines: np.ndarray, ops: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Run a stream through the cache: (missed, evicted a dirty line) per access."""
        lines = np.ascontiguousarray(lines, np.int64)
        ops = np.ascontiguousarray(ops, np.uint8)
        miss, wb = np.zeros(lines.size, np.uint8), np.zeros(lines.size, np.uint8)
        if lines.size == 0:
            return miss, wb
        if self._py is not None:
            self._access_py(lines, ops, miss, wb)
        elif self.ways is None:
            ids = self._dense(lines)
            self.lib.lru_full(ctypes.c_int64(lines.size), _ptr(ids), _ptr(ops), ctypes.c_int64(self.capacity),
                              _ptr(self._prv), _ptr(self._nxt), _ptr(self._flag), _ptr(self._st), _ptr(miss), _ptr(wb))
        else:
            self.lib.lru_sets(ctypes.c_int64(lines.size), _ptr(lines), _ptr(ops), ctypes.c_int64(self.sets),
                              ctypes.c_int64(self.ways), _ptr(self._tag), _ptr(self._stamp), _ptr(self._dirty),
                              _ptr(self._cls), _ptr(self._clock), _ptr(miss), _ptr(wb))
        return miss.astype(bool), wb.astype(bool)

    def _dense(self, lines: np.ndarray) -> np.ndarray:
        """Dense ids for the C list, growing its arrays for lines never seen before."""
        uniq, inv = np.unique(lines, return_inverse=True)
        at = np.searchsorted(self._known, uniq)
        found = at < self._known.size
        found[found] = self._known[at[found]] == uniq[found]
        ids = np.empty(uniq.size, np.int64)
        ids[found] = self._known_ids[at[found]]
        fresh = ~found
        start = self._flag.size
        ids[fresh] = np.arange(start, start + int(fresh.sum()))
        if fresh.any():
            known = np.concatenate([self._known, uniq[fresh]])
            order = np.argsort(known, kind="stable")
            self._known, self._known_ids = known[order], np.concatenate([self._known_ids, ids[fresh]])[order]
            grow = int(fresh.sum())
            self._prv = np.concatenate([self._prv, np.full(grow, -1, np.int64)])
            self._nxt = np.concatenate([self._nxt, np.full(grow, -1, np.int64)])
            self._flag = np.concatenate([self._flag, np.zeros(grow, np.uint8)])
        return np.ascontiguousarray(ids[inv.ravel()])

    def _access_py(self, lines, ops, miss, wb) -> None:
        """The same policy as the C loops (for sets: a per-set order instead of stamps)."""
        cap = self.capacity if self.ways is None else self.ways
        for i, (ln, o) in enumerate(zip(lines.tolist(), ops.tolist())):
            normal, last = self._py[ln % self.sets]
            dirty = normal.pop(ln, None)
            dirty = last.pop(ln, None) if dirty is None else dirty
            if dirty is None:
                miss[i] = (o & 3) != STORE
                if len(normal) + len(last) == cap:
                    wb[i] = (normal or last).popitem(last=False)[1]
                dirty = False
            dirty = dirty or (o & 3) != LOAD
            if o & EVICT_FIRST:
                normal[ln] = dirty
                normal.move_to_end(ln, last=False)
            else:
                (last if o & EVICT_LAST else normal)[ln] = dirty

    def dirty_lines(self) -> int:
        """Lines dirty now: what a flush (or later evictions) writes back."""
        if self._py is not None:
            return sum(v for pair in self._py for s in pair for v in s.values())
        if self.ways is None:
            return int(((self._flag & 3) == 3).sum())
        return int(((self._tag >= 0) & (self._dirty == 1)).sum())

    def resident_lines(self) -> int:
        if self._py is not None:
            return sum(len(s) for pair in self._py for s in pair)
        return int(self._st[4]) if self.ways is None else int((self._tag >= 0).sum())
