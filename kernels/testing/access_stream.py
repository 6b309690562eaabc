"""Per-program access streams of interpreter launches, sampled and interleaved as a GPU runs them.

:class:`StreamRecorder` (an ``interpreter_trace`` listener and program sampler) records, for each
Triton launch, the accesses of each program in issue order: one access per ``tl.load`` /
``tl.store`` / atomic, as the byte intervals of its unmasked lanes (a fully masked access is an
empty step), with its eviction hint. With ``sample=True`` it runs only a few programs of each launch and derives every
other program's stream by translation:

* along each grid axis (the other coordinates at 0) the programs split into *segments* inside
  which program ``s + k`` is program ``s`` with every access shifted by ``k`` times a per-access
  byte offset (sample ``b`` of a per-sample kernel, head ``h``, feature tile ``t``); segment ends
  are found by bisection on recorded programs (a persistent kernel's programs with one sample
  fewer, a masked last tile start a new segment);
* a block of the grid (a product of one segment per axis) is its corner program plus the
  per-axis offsets measured at the corner; the far corner and the middle of every block are
  recorded and must match that prediction exactly, else the whole block is recorded.

This assumes addresses do not depend on the data (the kernels' masks depend on shapes and EOS
positions only) and that no program waits for one that is not run (sampled programs run in
grid order; a kernel whose programs spin on flags set by others must not spin under the
interpreter, or be named in ``full_kernels``); ``bench/test_l2.py`` checks that a sampled
recording reproduces a full one. A persistent kernel that takes work items from a ticket counter
is recorded whole and split into its items (:class:`Tickets`, :func:`split_tickets`); one that
the interpreter runs one program per work item (``item_kernels``) gets its items' waits from
the data they pass each other (:func:`data_waits`).

:func:`interleave` turns a launch into the line stream an L2 sees: ``resident`` programs run
at once (the SMs; a program takes the next free slot when one finishes, in grid order with
``program_id(0)`` fastest), and at each step every resident program issues its next access.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import interpreter_trace as trace

#: "discard": an L2 line dropped without write-back (``bench/l2_cache.py``'s DISCARD)
KIND = {"load": 0, "store": 1, "atomic": 2, "discard": 3}
#: eviction hints, or-ed into the kind (as ``bench/l2_cache.py`` reads them)
HINT = {None: 0, "evict_first": 4, "evict_last": 8}
Pid = Tuple[int, int, int]


@dataclass
class Program:
    """One program's accesses: kind per access; byte intervals [start, end) with their access."""
    kinds: np.ndarray
    acc: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @property
    def first(self) -> np.ndarray:
        """Index of each access's first interval (-1: an empty access)."""
        f = np.full(self.kinds.size, -1, np.int64)
        idx = np.flatnonzero(np.r_[True, self.acc[1:] != self.acc[:-1]]) if self.acc.size else np.zeros(0, int)
        f[self.acc[idx]] = idx
        return f

    def shifted(self, offsets: np.ndarray) -> "Program":
        o = offsets[self.acc]
        return Program(self.kinds, self.acc, self.start + o, self.end + o)


def offsets(a: Program, b: Program) -> Optional[np.ndarray]:
    """Per-access byte offsets with ``b == a.shifted(offsets)``, or None when b is not a translation of a."""
    if a.kinds.size != b.kinds.size or a.acc.size != b.acc.size or not np.array_equal(a.kinds, b.kinds) \
            or not np.array_equal(a.acc, b.acc):
        return None
    f = a.first
    d = np.zeros(a.kinds.size, np.int64)
    d[f >= 0] = b.start[f[f >= 0]] - a.start[f[f >= 0]]
    return d if same(a.shifted(d), b) else None


def same(a: Program, b: Program) -> bool:
    return all(np.array_equal(x, y) for x, y in ((a.kinds, b.kinds), (a.acc, b.acc), (a.start, b.start), (a.end, b.end)))


class _Building:
    def __init__(self) -> None:
        self.kinds: List[int] = []
        self.starts: List[np.ndarray] = []
        self.ends: List[np.ndarray] = []

    def add(self, kind: str, addrs: np.ndarray, itemsize: int, hint: Optional[str]) -> None:
        a = np.unique(addrs)
        brk = np.flatnonzero(a[1:] != a[:-1] + itemsize) + 1
        self.kinds.append(KIND[kind] | HINT[hint])
        self.starts.append(a[np.r_[0, brk]] if a.size else a)
        self.ends.append(a[np.r_[brk - 1, a.size - 1]] + itemsize if a.size else a)

    def done(self) -> Program:
        n = np.array([s.size for s in self.starts], np.int64)
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
        return Program(np.array(self.kinds, np.uint8), np.repeat(np.arange(n.size), n), cat(self.starts), cat(self.ends))


@dataclass
class LaunchStream:
    """A launch's grid and every program's stream (``programs`` in GPU order, x fastest).

    A ticketed launch (:class:`Tickets`) lists its work items instead, in ticket order. ``after[i]``
    (ticketed launches and item kernels; None: nothing waits): the earlier items item ``i`` waits
    for."""
    kernel: str
    grid: Pid
    programs: List[Program]
    recorded: int  # programs the interpreter ran
    blocks: int = 1
    full_blocks: int = 0  # blocks whose check failed and were recorded program by program
    after: Optional[List[List[int]]] = None


@dataclass(frozen=True)
class Tickets:
    """How a persistent kernel hands out work: every program takes items from an atomic ticket
    counter (word ``ticket`` of argument ``arg``, int32) until none is left, so on a GPU the items
    run in ticket order on whichever program is free, not on the program the interpreter (which
    runs program 0 to the end first) gave them to. Under the interpreter the kernel marks each
    wait by an atomic on word ``mark`` of the same argument right after the atomic read of the
    flag it waits on; every other atomic on a flag is a signal. The recorder splits the programs'
    streams at the ticket atomics into items and makes each item wait for the earlier items that
    signalled a flag it waits on."""
    arg: str
    ticket: int = 0
    mark: int = 1


class AddressSpace:
    """Storages laid out one after another, each at a 512-byte aligned address (as a GPU caching
    allocator hands out blocks), in the order first seen: the streams of two runs that make the
    same allocations in the same order have the same addresses. Keeps every storage alive, so
    no address is reused within a run."""

    ALIGN = 512

    def __init__(self) -> None:
        self._keep: Dict[int, tuple] = {}  # data_ptr -> (storage, virtual base)
        self._names: Dict[int, List[str]] = {}  # virtual base -> labels (kernel arguments first)
        self._next = 0
        self._arrays: Optional[tuple] = None

    def add(self, storage, name: Optional[str] = None, from_kernel: bool = False) -> None:
        """Register a storage; ``name`` labels it in per-buffer reports: ``kernel:ARG`` for the
        first kernel argument that points into it, then ``/ARG`` for every other argument name
        it is passed as (a PyTorch op's label only while no kernel has named it)."""
        ptr, n = storage.data_ptr(), storage.nbytes()
        if n == 0:
            return
        if not (ptr in self._keep and self._keep[ptr][0].nbytes() >= n):
            self._keep[ptr] = (storage, self._next)
            self._next = -(-(self._next + n) // self.ALIGN) * self.ALIGN
            self._arrays = None
        if name is None:
            return
        names = self._names.setdefault(self._keep[ptr][1], [])
        if from_kernel:
            if names and ":" in names[0] and not names[0].startswith("aten."):
                arg = name.split(":", 1)[1]
                if arg not in names[0].split(":", 1)[1].split("/"):
                    names[0] += "/" + arg
            else:
                names[:] = [name]
        elif not names:
            names.append(name)

    def regions(self) -> Tuple[np.ndarray, np.ndarray, List[str]]:
        """(virtual bases ascending, sizes, names) of the registered storages."""
        items = sorted((v, s.nbytes()) for s, v in self._keep.values())
        bases = np.array([v for v, _ in items], np.int64)
        names = [(self._names.get(v) or ["unnamed"])[0] for v, _ in items]
        return bases, np.array([n for _, n in items], np.int64), names

    def map(self, addrs: np.ndarray) -> np.ndarray:
        """Real (CPU) byte addresses -> addresses in this space."""
        if self._arrays is None:
            ptrs = np.array(sorted(self._keep), np.int64)
            self._arrays = (ptrs, np.array([self._keep[p][0].nbytes() for p in ptrs.tolist()], np.int64),
                            np.array([self._keep[p][1] for p in ptrs.tolist()], np.int64))
        ptrs, sizes, vbase = self._arrays
        i = np.searchsorted(ptrs, addrs, side="right") - 1
        if addrs.size and ((i < 0).any() or (addrs >= ptrs[i] + sizes[i]).any()):
            raise ValueError("an access outside every storage registered with the address space")
        return addrs - ptrs[i] + vbase[i]


class StreamRecorder(trace._Listener):
    """Records each launch's per-program streams (and, with ``sample``, picks the programs to run)."""

    wants_empty = True
    wants_hints = True

    def __init__(self, space: AddressSpace, sample: bool = False, full_below: int = 8,
                 full_kernels: Tuple[str, ...] = (), ticketed: Optional[Dict[str, Tickets]] = None,
                 item_kernels: Tuple[str, ...] = ()) -> None:
        self.space, self.sample, self.full_below = space, sample, full_below
        self.ticketed = dict(ticketed or {})  # kernel -> its Tickets; recorded whole, then split
        self.item_kernels = set(item_kernels)  # one program per work item: waits from data flow
        self.full_kernels = set(full_kernels) | set(self.ticketed)  # run with every program, in grid order
        self._words: Optional[Tuple[int, int]] = None  # virtual (ticket, mark) addresses of the launch
        self.launches: List[LaunchStream] = []
        self._rec: Dict[Pid, Program] = {}
        self._ran: set = set()
        self._building: Dict[Pid, _Building] = {}
        self._plan: Optional[Iterator[List[Pid]]] = None
        self._result: Optional[LaunchStream] = None

    # -- interpreter listener
    # the sampler is asked for a launch's first programs before the interpreter announces the
    # launch, so per-launch state is cleared when a launch ends, never when it begins (clearing
    # it there ran the first programs twice, and a ticketed kernel's second run found no tickets)
    def launch_begin(self, launch):
        for a in launch.args:
            if a.storage is not None:
                self.space.add(a.storage, f"{launch.kernel}:{a.name}", from_kernel=True)
        t = self.ticketed.get(launch.kernel)
        if t is not None:
            arg = next((a for a in launch.args if a.name == t.arg), None)
            if arg is None:
                raise ValueError(f"{launch.kernel} has no argument {t.arg!r} holding its ticket")
            words = self.space.map(np.array([arg.base + 4 * t.ticket, arg.base + 4 * t.mark], np.int64))
            self._words = (int(words[0]), int(words[1]))

    def access(self, launch, kind, addrs, itemsize, hint=None):
        addrs = self.space.map(addrs.astype(np.int64))
        self._building.setdefault(tuple(launch.grid_idx), _Building()).add(kind, addrs, itemsize, hint)

    def launch_end(self, launch):
        self._flush()
        if self._result is None:  # not sampled (a callable grid, or sampling off): every program ran
            self._ran.update(gpu_order(tuple(launch.grid)))  # a program that never touched memory: empty
            progs = [self._get(p) for p in gpu_order(tuple(launch.grid))]
            self._result = LaunchStream(launch.kernel, tuple(launch.grid), progs, len(progs))
        if self._words is not None:
            self._result = split_tickets(self._result, *self._words)
        elif launch.kernel in self.item_kernels:
            self._result.after = data_waits(self._result.programs)
        self.launches.append(self._result)
        self._rec, self._ran, self._building, self._plan, self._result, self._words = {}, set(), {}, None, None, None

    def _flush(self) -> None:
        for pid, b in self._building.items():
            self._rec[pid] = b.done()
        self._building = {}

    def _get(self, pid: Pid) -> Program:
        """A program's stream (one that ran without touching memory: empty)."""
        if pid not in self._rec and pid not in self._ran:
            raise KeyError(f"program {pid} was not run")
        return self._rec.get(pid) or Program(np.zeros(0, np.uint8), *(np.zeros(0, np.int64),) * 3)

    # -- sampler
    def next_programs(self, kernel: str, grid: Pid) -> List[Pid]:
        if self._plan is None:
            small = not self.sample or int(np.prod(grid)) <= self.full_below or kernel in self.full_kernels
            self._plan = self._all(grid) if small else self._sampled(kernel, grid)
        while True:
            self._flush()
            nxt = next(self._plan, None)
            if nxt is None:
                return []
            # in GPU order: a program that waits for an earlier one finds it done
            todo = sorted((p for p in dict.fromkeys(nxt) if p not in self._ran), key=lambda p: (p[2], p[1], p[0]))
            if todo:
                self._ran.update(todo)
                return todo

    def _all(self, grid: Pid) -> Iterator[List[Pid]]:
        yield list(gpu_order(grid))

    def _sampled(self, kernel: str, grid: Pid) -> Iterator[List[Pid]]:
        segs = []
        for axis in range(3):
            starts = yield from self._segments(grid, axis)
            segs.append(starts)
        progs: Dict[Pid, Program] = {}
        blocks = full = 0
        for corner in itertools.product(*segs):
            ends = [_seg_end(segs[a], corner[a], grid[a]) for a in range(3)]
            far = tuple(ends)
            mid = tuple((c + e) // 2 for c, e in zip(corner, ends))
            yield [corner] + [_step(corner, a) for a in range(3) if ends[a] > corner[a]] + [far, mid]
            blocks += 1
            base = self._get(corner)
            ds = [offsets(base, self._get(_step(corner, a))) if ends[a] > corner[a] else None for a in range(3)]
            ok = all(ends[a] == corner[a] or ds[a] is not None for a in range(3)) and all(
                same(_predict(base, ds, corner, p), self._get(p)) for p in (far, mid))
            members = list(itertools.product(*(range(corner[a], ends[a] + 1) for a in range(3))))
            if not ok:
                full += 1
                yield members
            for p in members:
                progs[p] = self._get(p) if p in self._ran else _predict(base, ds, corner, p)
        self._result = LaunchStream(kernel, grid, [progs[p] for p in gpu_order(grid)], len(self._ran), blocks, full)

    def _segments(self, grid: Pid, axis: int):
        """Segment starts along ``axis`` (other coordinates 0), found by bisection."""
        n, starts, s = grid[axis], [], 0
        at = (lambda i: tuple(i if a == axis else 0 for a in range(3)))
        while s < n:
            starts.append(s)
            if s + 1 >= n:
                break
            yield [at(s), at(s + 1), at(n - 1), at((s + n - 1) // 2)]
            d = offsets(self._get(at(s)), self._get(at(s + 1)))
            if d is None:
                s += 1
                continue
            good = (lambda i: same(self._get(at(s)).shifted(d * (i - s)), self._get(at(i))))
            if good(n - 1) and good((s + n - 1) // 2):
                break
            lo, hi = s + 1, n - 1  # good(lo); the first bad index is in (lo, hi]
            if not good(hi):
                while hi - lo > 1:
                    m = (lo + hi) // 2
                    yield [at(m)]
                    lo, hi = (m, hi) if good(m) else (lo, m)
            else:  # the end is good but the middle is not: bisect on the middle
                hi = (s + n - 1) // 2
                while hi - lo > 1:
                    m = (lo + hi) // 2
                    yield [at(m)]
                    lo, hi = (m, hi) if good(m) else (lo, m)
            s = hi
        return starts


def ranges(lo: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``lo[i], lo[i] + 1, .., lo[i] + n[i] - 1`` for every i, concatenated."""
    return np.repeat(lo - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(int(n.sum()))


def _cut(p: Program, lo: int, hi: int) -> Program:
    """Accesses lo .. hi-1 of a program, as a program of their own."""
    sel = (p.acc >= lo) & (p.acc < hi)
    return Program(p.kinds[lo:hi], p.acc[sel] - lo, p.start[sel], p.end[sel])


def _addr(p: Program) -> np.ndarray:
    """Each access's first byte (-1: an empty access)."""
    f = p.first
    return np.where(f >= 0, p.start[np.maximum(f, 0)], -1)


def split_tickets(launch: LaunchStream, ticket: int, mark: int) -> LaunchStream:
    """A ticketed launch (:class:`Tickets`) as its items in ticket order, each from its ticket
    atomic to the next (the programs ran one after another, so their tickets are in recording
    order); ``after`` from the waits and signals the kernel's flag atomics make."""
    items: List[Program] = []
    for p in launch.programs:
        one = np.bincount(p.acc, minlength=p.kinds.size) == 1  # a scalar atomic: one interval
        cuts = np.flatnonzero(((p.kinds & 3) == KIND["atomic"]) & one & (_addr(p) == ticket)).tolist()
        if cuts and cuts[0] != 0:
            raise ValueError(f"{launch.kernel}: accesses before a program's first ticket")
        items += [_cut(p, lo, hi) for lo, hi in zip(cuts, cuts[1:] + [p.kinds.size])]
    signalled: Dict[int, List[int]] = {}
    after: List[List[int]] = []
    for i, it in enumerate(items):
        addr = _addr(it)
        atomic = np.flatnonzero(((it.kinds & 3) == KIND["atomic"]) & (addr != ticket) & (addr != mark))
        waits = {int(addr[a]) for a in atomic if a + 1 < it.kinds.size and addr[a + 1] == mark}
        after.append(sorted({j for w in waits for j in signalled.get(w, [])}))
        for a in atomic:
            if int(addr[a]) not in waits:
                signalled.setdefault(int(addr[a]), []).append(i)
    return LaunchStream(launch.kernel, (len(items), 1, 1), items, launch.recorded, launch.blocks,
                        launch.full_blocks, after)


def data_waits(programs: List[Program], grain: int = 32) -> List[List[int]]:
    """For a launch of work items in work order (a persistent kernel interpreted with one program
    per item): ``after[i]``, the earlier items that store or update bytes item ``i`` then loads,
    by ``grain``-byte block. A GPU runs such a kernel's items on free programs in this order and
    makes a reader wait (ready flags, done counters) for the items whose results it reads; this
    is that wait, read off the streams."""
    cols = {"w": ([], []), "r": ([], [])}
    for i, p in enumerate(programs):
        if not p.acc.size:
            continue
        k = p.kinds[p.acc] & 3
        for key, sel in (("w", k != KIND["load"]), ("r", k != KIND["store"])):
            if sel.any():
                a, b = p.start[sel] // grain, (p.end[sel] - 1) // grain
                n = b - a + 1
                blocks = ranges(a, n)
                cols[key][0].append(np.unique(blocks))
                cols[key][1].append(np.full(cols[key][0][-1].size, i, np.int64))
    after: List[List[int]] = [[] for _ in programs]
    if not cols["w"][0] or not cols["r"][0]:
        return after
    wb, wi = (np.concatenate(c) for c in cols["w"])
    rb, ri = (np.concatenate(c) for c in cols["r"])
    o = np.lexsort((wi, wb))
    wb, wi = wb[o], wi[o]
    lo, hi = np.searchsorted(wb, rb, "left"), np.searchsorted(wb, rb, "right")
    has = hi > lo
    rb, ri, lo, hi = rb[has], ri[has], lo[has], hi[has]
    pairs = _writer_pairs(wi, ri, lo, hi - lo)
    if pairs.size:  # sorted by reader: one run of writers per reader
        starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
        for a, b in zip(starts, np.r_[starts[1:], len(pairs)]):
            after[int(pairs[a, 0])] = pairs[a:b, 1].tolist()
    return after


def _writer_pairs(wi: np.ndarray, ri: np.ndarray, lo: np.ndarray, n: np.ndarray,
                  chunk: int = 1 << 24) -> np.ndarray:
    """Unique (reader, earlier writer) pairs, sorted: each read block's ``n`` writers (``wi[lo:lo+n]``)
    paired with its reader ``ri``. Blocks that every item touches (a counter, a partial updated by
    each of many items) pair thousands of writers with thousands of readers, so the pairs are formed
    ``chunk`` at a time and made unique per chunk: the repeats never sit in memory together."""
    ends = np.cumsum(n)
    parts, start = [], 0
    while start < n.size:
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + chunk, "right")))
        w = wi[ranges(lo[start:stop], n[start:stop])]
        r = np.repeat(ri[start:stop], n[start:stop])
        keep = w < r
        if keep.any():
            parts.append(np.unique(np.stack([r[keep], w[keep]], 1), axis=0))
        start = stop
    return np.unique(np.concatenate(parts), axis=0) if parts else np.zeros((0, 2), np.int64)


def _step(p: Pid, axis: int) -> Pid:
    return tuple(c + (a == axis) for a, c in enumerate(p))


def _seg_end(starts: List[int], s: int, n: int) -> int:
    i = starts.index(s)
    return (starts[i + 1] - 1) if i + 1 < len(starts) else n - 1


def _predict(base: Program, ds, corner: Pid, p: Pid) -> Program:
    off = np.zeros(base.kinds.size, np.int64)
    for a in range(3):
        if p[a] != corner[a]:
            off = off + ds[a] * (p[a] - corner[a])
    return base.shifted(off)


def gpu_order(grid: Pid) -> Iterator[Pid]:
    """Program ids in the order a GPU hands them out: x fastest, then y, then z."""
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                yield (x, y, z)


def schedule(launch: LaunchStream, resident: int) -> Tuple[np.ndarray, np.ndarray]:
    """(first step, slot) of each program: ``resident`` slots, one access per step; each program
    takes the slot that frees first, in order; an item of a ticketed launch spins, holding its
    slot, until the items it waits for (``after``) are done."""
    n = len(launch.programs)
    free = [(0, s) for s in range(min(resident, n))]
    heapq.heapify(free)
    tick0, slot, done = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i, p in enumerate(launch.programs):
        t, s = heapq.heappop(free)
        if launch.after is not None and launch.after[i]:
            t = max(t, int(done[launch.after[i]].max()))
        tick0[i], slot[i] = t, s
        done[i] = t + max(1, p.kinds.size)
        heapq.heappush(free, (int(done[i]), s))
    return tick0, slot


def interleave(launch: LaunchStream, resident: int, line: int = 128, sector: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """The launch's line stream (line numbers, kinds) with ``resident`` programs running at once
    (:func:`schedule`); each kind carries in its high nibble the ``sector``-byte sectors of the line the access
    touches (``bench/l2_cache.py``), a line appearing once per access."""
    progs = launch.programs
    tick0, slot = schedule(launch, resident)
    if not progs:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    start, end = np.concatenate([p.start for p in progs]), np.concatenate([p.end for p in progs])
    tick = np.concatenate([p.acc + t for p, t in zip(progs, tick0)])
    sl = np.concatenate([np.full(p.acc.size, s, np.int64) for p, s in zip(progs, slot)])
    kind = np.concatenate([p.kinds[p.acc] for p in progs])
    key = tick * max(1, resident) + sl
    order = np.argsort(key, kind="stable")
    start, end, key, kind = start[order], end[order], key[order], kind[order]
    first, last = start // line, (end - 1) // line
    n = last - first + 1
    lines = ranges(first, n)
    # the sectors of each line an interval covers: from its start in its first line, to its end in its last
    lo = np.where(lines == np.repeat(first, n), np.repeat(start, n) % line // sector, 0)
    hi = np.where(lines == np.repeat(last, n), (np.repeat(end, n) - 1) % line // sector, line // sector - 1)
    mask = ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)
    key, kind = np.repeat(key, n), np.repeat(kind, n)
    # a line once per access, with the sectors of every interval of the access in it
    head = np.flatnonzero(np.r_[True, (lines[1:] != lines[:-1]) | (key[1:] != key[:-1])])
    mask = np.bitwise_or.reduceat(mask, head) if head.size else mask
    return lines[head], (kind[head] & 15) | (mask << 4).astype(np.uint8)

