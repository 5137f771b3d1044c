"""Tlb: geometry of the TLB arrays and paging-structure caches, and their statistics.

The arrays live in C (csrc/tlb.c); this module only sizes them, owns their
memory, and reads the counters.  `Tlb._c` is the ptemu_tlb the C calls
take; `Tlb.decoded` shows the same struct with each array's entries decoded
(C keeps them packed, see csrc/ptemu_cdef.h).
"""
from dataclasses import dataclass, field

from ptemu._native import ffi, lib, InvalidInput

__all__ = ["Tlb", "TlbArray", "TlbStats"]

_BASE_MASK = lib.PTEMU_TD_BASE_MASK
_PCID_SHIFT = lib.PTEMU_TD_PCID_SHIFT
_PKEY_SHIFT = lib.PTEMU_TD_PKEY_SHIFT

_SIZE_BITS = {"4K": 1 << lib.PTEMU_SIZE_4K, "2M": 1 << lib.PTEMU_SIZE_2M,
              "1G": 1 << lib.PTEMU_SIZE_1G}
_KIND_BITS = {"data": lib.PTEMU_KIND_DATA, "fetch": lib.PTEMU_KIND_FETCH,
              "unified": lib.PTEMU_KIND_DATA | lib.PTEMU_KIND_FETCH}
_ACCESS = ("read", "write", "fetch")
# The stats' names of the flush causes, indexed by their C value (PTEMU_FLUSHED_BY_*).
_FLUSH_CAUSE_NAMES = {lib.PTEMU_FLUSHED_BY_CR3: "cr3", lib.PTEMU_FLUSHED_BY_CR4: "cr4",
                      lib.PTEMU_FLUSHED_BY_CR0: "cr0", lib.PTEMU_FLUSHED_BY_INVLPG: "invlpg",
                      lib.PTEMU_FLUSHED_BY_INVPCID: "invpcid",
                      lib.PTEMU_FLUSHED_BY_PF: "page_fault", lib.PTEMU_FLUSHED_BY_USER: "user"}
FLUSH_CAUSES = tuple(_FLUSH_CAUSE_NAMES[i] for i in range(lib.PTEMU_NFLUSH_CAUSES))
PSC_NAMES = {2: "pde", 3: "pdpte", 4: "pml4e", 5: "pml5e"}


@dataclass(frozen=True)
class TlbArray:
    """One set-associative array: `entries` = sets * ways, sets a power of two."""
    name: str
    tier: int          # 1 first level, 2 second level
    kind: str          # "data", "fetch" or "unified"
    sizes: tuple       # page sizes held: subset of ("4K", "2M", "1G")
    entries: int
    ways: int


@dataclass
class TlbStats:
    """A snapshot of the counters (see Tlb.stats)."""
    lookups: int
    hits: int
    l1_hits: int
    l2_hits: int
    misses: int
    walks: int
    walk_refs: int
    dirty_rewalks: int
    fault_invalidations: int
    flushes: int
    flushes_by_cause: dict = field(default_factory=dict)
    by_access: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    psc: dict = field(default_factory=dict)

    @property
    def hit_rate(self):
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def refs_per_walk(self):
        return self.walk_refs / self.walks if self.walks else 0.0


class Tlb:
    """A TLB hierarchy plus paging-structure caches (SDM 4.10).

    arrays: TlbArray descriptions (at most 8).  psc: {level: (entries, ways)}
    for the PDE (2), PDPTE (3), PML4E (4) and PML5E (5) caches; a level left
    out has no cache.
    """

    def __init__(self, arrays, psc=None):
        arrays = list(arrays)
        if not arrays:
            raise InvalidInput("a Tlb needs at least one array")
        if len(arrays) > lib.PTEMU_TLB_MAX_ARRAYS:
            raise InvalidInput("at most %d TLB arrays" % lib.PTEMU_TLB_MAX_ARRAYS)
        self._c = ffi.new("ptemu_tlb *")
        self._keep = []
        self.arrays = tuple(arrays)
        self._c.narrays = len(arrays)
        for i, a in enumerate(arrays):
            if a.tier not in (1, 2):
                raise InvalidInput("%s: tier must be 1 or 2" % a.name)
            if a.kind not in _KIND_BITS:
                raise InvalidInput("%s: kind must be data, fetch or unified" % a.name)
            sizes = 0
            for s in a.sizes:
                if s not in _SIZE_BITS:
                    raise InvalidInput("%s: unknown page size %r" % (a.name, s))
                sizes |= _SIZE_BITS[s]
            if not sizes:
                raise InvalidInput("%s: holds no page size" % a.name)
            self._setup(self._c.arr[i], a.name, a.entries, a.ways)
            self._c.arr[i].sizes = sizes
            self._c.arr[i].kinds = _KIND_BITS[a.kind]
            self._c.arr[i].tier = a.tier
        self.psc_geometry = dict(psc or {})
        for level, (entries, ways) in self.psc_geometry.items():
            if level not in PSC_NAMES:
                raise InvalidInput("paging-structure caches exist for levels 2..5, not %r" % level)
            self._setup(self._c.psc[level], PSC_NAMES[level], entries, ways)
        if not lib.ptemu_tlb_init(self._c):
            raise InvalidInput("unusable TLB geometry")
        self.owner = None

    def _setup(self, carr, name, entries, ways):
        if (not isinstance(entries, int) or not isinstance(ways, int) or isinstance(entries, bool)
                or isinstance(ways, bool) or entries <= 0 or ways <= 0):
            raise InvalidInput("%s: entries and ways must be positive integers" % name)
        if entries % ways:
            raise InvalidInput("%s: %d entries is not a multiple of %d ways" % (name, entries, ways))
        sets = entries // ways
        if sets & (sets - 1):
            raise InvalidInput("%s: %d sets is not a power of two" % (name, sets))
        buf = ffi.new("uint64_t[]", 3 * entries)   # key, stamp, data per entry
        self._keep.append(buf)
        carr.slots = buf
        carr.sets = sets
        carr.ways = ways

    @classmethod
    def default(cls):
        """An Intel Skylake-client core.

        TLB sizes from the Intel 64 and IA-32 Architectures Optimization
        Reference Manual (Skylake microarchitecture, "TLB parameters"):
        ITLB 4K 128 entries 8-way, ITLB 2M 8 entries fully associative;
        DTLB 4K 64 entries 4-way, 2M 32 entries 4-way, 1G 4 entries fully
        associative; STLB 4K+2M 1536 entries 12-way, 1G 16 entries 4-way.
        Intel does not publish paging-structure-cache sizes; the split
        PML4E 2 / PDPTE 4 / PDE 32 follows Bhattacharjee, "Large-reach
        memory management unit caches" (MICRO 2013), table 1.
        """
        return cls([
            TlbArray("itlb_4k", 1, "fetch", ("4K",), 128, 8),
            TlbArray("itlb_2m", 1, "fetch", ("2M",), 8, 8),
            TlbArray("dtlb_4k", 1, "data", ("4K",), 64, 4),
            TlbArray("dtlb_2m", 1, "data", ("2M",), 32, 4),
            TlbArray("dtlb_1g", 1, "data", ("1G",), 4, 4),
            TlbArray("stlb", 2, "unified", ("4K", "2M"), 1536, 12),
            TlbArray("stlb_1g", 2, "unified", ("1G",), 16, 4),
        ], psc={2: (32, 4), 3: (4, 4), 4: (2, 2), 5: (2, 2)})

    @classmethod
    def simple(cls, entries=64, ways=4, psc=True):
        """One unified first-level array for all page sizes (for tests and studies)."""
        return cls([TlbArray("tlb", 1, "unified", ("4K", "2M", "1G"), entries, ways)],
                   psc={2: (16, 4), 3: (4, 4), 4: (2, 2), 5: (2, 2)} if psc else None)

    # -- inspection ---------------------------------------------------------
    def valid_entries(self, array=None):
        """Valid entries in one TLB array (by name), or in all of them."""
        if array is None:
            return int(lib.ptemu_tlb_count_valid(self._c, -1))
        for i, a in enumerate(self.arrays):
            if a.name == array:
                return int(lib.ptemu_tlb_count_valid(self._c, i))
        raise InvalidInput("no TLB array named %r" % array)

    def valid_psc_entries(self, level):
        return int(lib.ptemu_tlb_count_valid(self._c, 100 + level))

    def flush_all(self):
        """Drop everything (not an architectural event; counted as 'user')."""
        lib.ptemu_tlb_flush(self._c, lib.PTEMU_FLUSH_ALL, 0, 0, lib.PTEMU_FLUSHED_BY_USER)

    @property
    def c_handle(self):
        """The `ptemu_tlb *` of this TLB, to pass to C entry points (it and its
        arrays live as long as this object); `stats` and `decoded` read it."""
        return self._c

    @property
    def decoded(self):
        """For inspection: the ptemu_tlb with decoded entries: `.arr[i].e[j]`
        and `.psc[level].e[j]` have key, stamp, base, pcid, size, flags, pkey;
        every other field is the C struct's."""
        return _TlbView(self._c)

    @property
    def stats(self):
        c = self._c
        by_access = {}
        for i, name in enumerate(_ACCESS):
            by_access[name] = {"lookups": c.lookups[i], "l1_hits": c.l1_hits[i],
                               "l2_hits": c.l2_hits[i], "misses": c.misses[i]}
        arrays = {}
        for i, a in enumerate(self.arrays):
            ca = c.arr[i]
            arrays[a.name] = {"hits": ca.hits, "misses": ca.misses, "fills": ca.fills,
                              "evictions": ca.evictions}
        psc = {}
        for level in sorted(self.psc_geometry):
            ca = c.psc[level]
            psc[PSC_NAMES[level]] = {"hits": ca.hits, "misses": ca.misses, "fills": ca.fills,
                                     "evictions": ca.evictions}
        flushes = {name: c.flushes[i] for i, name in enumerate(FLUSH_CAUSES)}
        l1 = sum(c.l1_hits[i] for i in range(3))
        l2 = sum(c.l2_hits[i] for i in range(3))
        return TlbStats(
            lookups=sum(c.lookups[i] for i in range(3)), hits=l1 + l2, l1_hits=l1, l2_hits=l2,
            misses=sum(c.misses[i] for i in range(3)), walks=c.walks, walk_refs=c.walk_refs,
            dirty_rewalks=c.dirty_rewalks, fault_invalidations=c.fault_invalidations,
            flushes=sum(flushes.values()), flushes_by_cause=flushes, by_access=by_access,
            arrays=arrays, psc=psc)

    def reset_stats(self):
        c = self._c
        for i in range(3):
            c.lookups[i] = c.l1_hits[i] = c.l2_hits[i] = c.misses[i] = 0
        c.walks = c.walk_refs = c.dirty_rewalks = c.fault_invalidations = 0
        for i in range(lib.PTEMU_NFLUSH_CAUSES):
            c.flushes[i] = 0
        for arr in list(c.arr)[:len(self.arrays)] + [c.psc[level] for level in self.psc_geometry]:
            arr.hits = arr.misses = arr.fills = arr.evictions = 0

    def __repr__(self):
        return "Tlb(%s)" % ", ".join("%s:%d/%dw" % (a.name, a.entries, a.ways) for a in self.arrays)


class _Entry:
    """One entry of an array, decoded from its key, stamp and data words."""
    __slots__ = ("key", "stamp", "base", "pcid", "size", "flags", "pkey")

    def __init__(self, key, stamp, data, level):
        self.key = key                  # (tag << 3) | (size << 1) | 1; 0 = invalid
        self.stamp = stamp
        self.base = data & _BASE_MASK
        self.pcid = data >> _PCID_SHIFT
        # TLB: the page size index; PSC: the level (the key keeps only level & 3)
        self.size = (key >> 1) & 3 if level is None else level
        self.flags = data & 0xFF
        self.pkey = (data >> _PKEY_SHIFT) & 15


class _Entries:
    """Entry j of an array (j < sets * ways), as csrc/tlb.c lays them out."""

    def __init__(self, carr, level):
        self._a, self._level = carr, level

    def __getitem__(self, j):
        a = self._a
        ways = a.ways
        if not 0 <= j < a.sets * ways:
            raise IndexError(j)
        row = (j // ways) * 3 * ways
        w = j % ways
        return _Entry(int(a.slots[row + w]), int(a.slots[row + ways + w]),
                      int(a.slots[row + 2 * ways + w]), self._level)


class _ArrayView:
    def __init__(self, carr, level=None):
        self._a = carr
        self.e = _Entries(carr, level)

    def __getattr__(self, name):
        return getattr(self._a, name)


class _TlbView:
    def __init__(self, cdata):
        self._t = cdata
        self.arr = [_ArrayView(cdata.arr[i]) for i in range(lib.PTEMU_TLB_MAX_ARRAYS)]
        self.psc = [_ArrayView(cdata.psc[level], level) for level in range(6)]

    def __getattr__(self, name):
        return getattr(self._t, name)
