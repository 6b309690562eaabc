"""An LRU model of a GPU's L2 cache, fed with line accesses with sector masks: counted, not timed.

:class:`L2` holds the state of one cache across calls (one call per launch, in launch order):
``access(lines, ops)`` takes the 128-byte line numbers of a stream and per access one byte: its
kind (``LOAD``, ``STORE``, ``ATOMIC``, ``DISCARD``), eviction hints, and in the high nibble the 32-byte sectors
of the line it touches (0 = the whole line; ``access_stream.interleave`` sets them). It returns, per access, the sectors
read from DRAM, the dirty line it evicted (-1 for none) and that line's dirty sectors (written
back), so that a report can say whose lines were read again or written back;
``dirty_sectors()`` lists the lines still dirty at the end and their dirty sectors (written back
eventually).

Policy: lines of 128 bytes are allocated and evicted whole, DRAM is read and written by 32-byte
sector, as on NVIDIA GPUs since Volta (an access of half a line reads two sectors on a miss; a
line evicted with half its sectors dirty writes two back). A store allocates without fetching;
an atomic reads its sectors on a miss and dirties them; a discard (PTX ``discard.global.L2``)
drops a resident line, dirty or not, without writing it back, and does nothing to an absent one;
eviction of the least recently used line of the set. Eviction hints
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
SECTOR = 32
LOAD, STORE, ATOMIC, DISCARD = 0, 1, 2, 3

#: hint bits or-ed into a kind: Triton's eviction_policy="evict_first" / "evict_last"
EVICT_FIRST, EVICT_LAST = 4, 8

_C_SRC = r"""
#include <stdint.h>
/* Every access: a line and a byte o = kind (bits 0-1) | hints (4 evict_first, 8 evict_last) |
   sector mask (bits 4-7; 0 = the whole line). A line keeps a mask of valid and of dirty sectors:
   a load or atomic reads the sectors it asks for that are not valid (miss = their count), a
   store marks its sectors valid and dirty, and an evicted line writes back its dirty sectors;
   a discard (kind 3) drops a resident line without writing it back.
   Outputs per access: sectors read, the dirty line evicted (or -1), its dirty sectors. */
static int pc4(uint8_t m) { return (m & 1) + ((m >> 1) & 1) + ((m >> 2) & 1) + ((m >> 3) & 1); }
/* Fully associative LRU over dense line ids: two doubly linked lists, list 1 holding the lines
   last touched with evict_last; the victim is the head of list 0, or of list 1 when list 0 is
   empty; evict_first puts the line at the head of list 0 (the next victim), others at a tail.
   st = {head0, tail0, head1, tail1, count}; flag: 1 present, 4 in list 1. */
static void unlink_(int64_t id, int64_t *prv, int64_t *nxt, int64_t *h, int64_t *t) {
  if (prv[id] >= 0) nxt[prv[id]] = nxt[id]; else *h = nxt[id];
  if (nxt[id] >= 0) prv[nxt[id]] = prv[id]; else *t = prv[id];
}
void lru_full(int64_t n, const int64_t *ids, const uint8_t *op, int64_t cap, int64_t *prv, int64_t *nxt,
              uint8_t *flag, uint8_t *valid, uint8_t *dirty, int64_t *st, uint8_t *miss, int64_t *wb,
              uint8_t *wbn) {
  for (int64_t i = 0; i < n; i++) {
    int64_t id = ids[i], w = -1; uint8_t o = op[i], kind = o & 3, req = (o >> 4) ? (o >> 4) : 15, wn = 0;
    wb[i] = -1; wbn[i] = 0; miss[i] = 0;
    if (kind == 3) {
      if (flag[id] & 1) {
        int l = (flag[id] & 4) ? 2 : 0;
        unlink_(id, prv, nxt, &st[l], &st[l + 1]);
        flag[id] = 0; valid[id] = 0; dirty[id] = 0; st[4]--;
      }
      continue;
    }
    if (flag[id] & 1) {
      int l = (flag[id] & 4) ? 2 : 0;
      unlink_(id, prv, nxt, &st[l], &st[l + 1]);
    } else {
      if (st[4] == cap) {
        int l = st[0] >= 0 ? 0 : 2;
        int64_t v = st[l];
        unlink_(v, prv, nxt, &st[l], &st[l + 1]);
        if (dirty[v]) { w = v; wn = pc4(dirty[v]); }
        flag[v] = 0; valid[v] = 0; dirty[v] = 0; st[4]--;
      }
      st[4]++; flag[id] = 1;
    }
    miss[i] = kind != 1 ? pc4(req & ~valid[id]) : 0;
    valid[id] |= req;
    if (kind) dirty[id] |= req;
    flag[id] &= 1;
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
    wb[i] = w; wbn[i] = wn;
  }
}
/* set-associative LRU: set = line % sets, `ways` entries per set with a last-use stamp and a
   class (1: evict_last); the victim: an empty way, else class 0 before class 1, the smallest
   stamp first; evict_first stamps are negative, the latest the smallest (as the list's head). */
void lru_sets(int64_t n, const int64_t *lines, const uint8_t *op, int64_t sets, int64_t ways, int64_t *tag,
              int64_t *stamp, uint8_t *valid, uint8_t *dirty, uint8_t *cls, int64_t *clock, uint8_t *miss,
              int64_t *wb, uint8_t *wbn) {
  int64_t t = *clock;
  for (int64_t i = 0; i < n; i++) {
    int64_t s = lines[i] % sets, base = s * ways, hit = -1, victim = -1, w = -1;
    uint8_t o = op[i], kind = o & 3, req = (o >> 4) ? (o >> 4) : 15, wn = 0;
    wb[i] = -1; wbn[i] = 0; miss[i] = 0;
    if (kind == 3) {
      for (int64_t k = base; k < base + ways; k++)
        if (tag[k] == lines[i]) { tag[k] = -1; valid[k] = 0; dirty[k] = 0; cls[k] = 0; stamp[k] = 0; break; }
      continue;
    }
    for (int64_t k = base; k < base + ways; k++) {
      if (tag[k] == lines[i]) { hit = k; break; }
      if (victim < 0 || (tag[victim] >= 0 && (tag[k] < 0 || cls[k] < cls[victim]
                                              || (cls[k] == cls[victim] && stamp[k] < stamp[victim]))))
        victim = k;
    }
    if (hit < 0) {
      if (tag[victim] >= 0 && dirty[victim]) { w = tag[victim]; wn = pc4(dirty[victim]); }
      tag[victim] = lines[i]; valid[victim] = 0; dirty[victim] = 0; hit = victim;
    }
    miss[i] = kind != 1 ? pc4(req & ~valid[hit]) : 0;
    valid[hit] |= req;
    if (kind) dirty[hit] |= req;
    cls[hit] = (o & 8) ? 1 : 0;
    ++t;
    stamp[hit] = (o & 4) ? -t : t;
    wb[i] = w; wbn[i] = wn;
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


def _pc4(mask: int) -> int:
    return bin(mask & 15).count("1")


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
            self._line_of = np.zeros(0, np.int64)  # dense id -> line number
            self._prv = self._nxt = np.zeros(0, np.int64)
            self._flag = self._valid = self._dirty = np.zeros(0, np.uint8)
            self._st = np.array([-1, -1, -1, -1, 0], np.int64)
        else:
            self._tag = np.full(self.sets * ways, -1, np.int64)
            self._stamp = np.zeros(self.sets * ways, np.int64)
            self._valid = np.zeros(self.sets * ways, np.uint8)
            self._dirty = np.zeros(self.sets * ways, np.uint8)
            self._cls = np.zeros(self.sets * ways, np.uint8)
            self._clock = np.zeros(1, np.int64)
        # per set: (lines of list 0, lines of list 1: evict_last), each oldest first, value =
        # [valid mask, dirty mask]
        self._py = [(OrderedDict(), OrderedDict()) for _ in range(self.sets)] if self.lib is None else None

    def access(self, lines: np.ndarray, ops: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run a stream through the cache: per access, (sectors read, the dirty line it evicted or
        -1, that line's dirty sectors)."""
        lines = np.ascontiguousarray(lines, np.int64)
        ops = np.ascontiguousarray(ops, np.uint8)
        miss, wb, wbn = np.zeros(lines.size, np.uint8), np.full(lines.size, -1, np.int64), np.zeros(lines.size, np.uint8)
        if lines.size == 0:
            return miss, wb, wbn
        if self._py is not None:
            self._access_py(lines, ops, miss, wb, wbn)
        elif self.ways is None:
            ids = self._dense(lines)
            self.lib.lru_full(ctypes.c_int64(lines.size), _ptr(ids), _ptr(ops), ctypes.c_int64(self.capacity),
                              _ptr(self._prv), _ptr(self._nxt), _ptr(self._flag), _ptr(self._valid),
                              _ptr(self._dirty), _ptr(self._st), _ptr(miss), _ptr(wb), _ptr(wbn))
            hit = wb >= 0
            wb[hit] = self._line_of[wb[hit]]  # the C loop reports dense ids
        else:
            self.lib.lru_sets(ctypes.c_int64(lines.size), _ptr(lines), _ptr(ops), ctypes.c_int64(self.sets),
                              ctypes.c_int64(self.ways), _ptr(self._tag), _ptr(self._stamp), _ptr(self._valid),
                              _ptr(self._dirty), _ptr(self._cls), _ptr(self._clock), _ptr(miss), _ptr(wb), _ptr(wbn))
        return miss, wb, wbn

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
            zeros = np.zeros(grow, np.uint8)
            self._flag, self._valid, self._dirty = (np.concatenate([a, zeros]) for a in (self._flag, self._valid, self._dirty))
            self._line_of = np.concatenate([self._line_of, uniq[fresh]])
        return np.ascontiguousarray(ids[inv.ravel()])

    def _access_py(self, lines, ops, miss, wb, wbn) -> None:
        """The same policy as the C loops (for sets: a per-set order instead of stamps)."""
        cap = self.capacity if self.ways is None else self.ways
        for i, (ln, o) in enumerate(zip(lines.tolist(), ops.tolist())):
            normal, last = self._py[ln % self.sets]
            if (o & 3) == DISCARD:
                normal.pop(ln, None), last.pop(ln, None)
                continue
            state = normal.pop(ln, None)
            state = last.pop(ln, None) if state is None else state
            if state is None:
                if len(normal) + len(last) == cap:
                    victim, (_, dirty) = (normal or last).popitem(last=False)
                    if dirty:
                        wb[i], wbn[i] = victim, _pc4(dirty)
                state = [0, 0]
            req = (o >> 4) or 15
            miss[i] = _pc4(req & ~state[0]) if (o & 3) != STORE else 0
            state[0] |= req
            if o & 3:
                state[1] |= req
            if o & EVICT_FIRST:
                normal[ln] = state
                normal.move_to_end(ln, last=False)
            else:
                (last if o & EVICT_LAST else normal)[ln] = state

    def dirty_sectors(self) -> Tuple[np.ndarray, np.ndarray]:
        """(lines dirty now, ascending; their dirty sectors): what a flush (or later evictions) writes back."""
        if self._py is not None:
            d = sorted((ln, _pc4(st[1])) for pair in self._py for s in pair for ln, st in s.items() if st[1])
            return np.array([a for a, _ in d], np.int64), np.array([b for _, b in d], np.int64)
        if self.ways is None:
            keep = ((self._flag & 1) == 1) & (self._dirty != 0)
            lines, masks = self._line_of[keep], self._dirty[keep]
        else:
            keep = (self._tag >= 0) & (self._dirty != 0)
            lines, masks = self._tag[keep], self._dirty[keep]
        order = np.argsort(lines)
        return lines[order], _POPCOUNT[masks[order] & 15]

    def resident_lines(self) -> int:
        if self._py is not None:
            return sum(len(s) for pair in self._py for s in pair)
        return int(self._st[4]) if self.ways is None else int((self._tag >= 0).sum())


_POPCOUNT = np.array([_pc4(m) for m in range(16)], np.int64)
