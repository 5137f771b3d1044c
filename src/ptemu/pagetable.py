"""Hand-built page-table images, and QEMU-style listings of any image.

PageTableBuilder writes 4-level or 5-level tables into a PhysicalMemory,
allocating table frames from a region it is given, and returns CR3.
"""
from ptemu import bits
from ptemu._native import InvalidInput, check_u64, U64_MAX
from ptemu.memory import PhysicalMemory

__all__ = ["PageTableBuilder", "info_tlb", "info_mem"]

_SIZES = {4096: 1, 1 << 21: 2, 1 << 30: 3, "4K": 1, "2M": 2, "1G": 3}
_ADDR_MASK = 0x000FFFFFFFFFF000


def _level_shift(level):
    return 12 + 9 * (level - 1)


class PageTableBuilder:
    """Build paging structures by hand.

    memory: the PhysicalMemory to write.  la57: 5-level tables.
    table_start/table_end: the physical region table frames are taken from
    (bump allocation, 4 KiB frames, zeroed).  The root table is allocated at
    once; `cr3` is its address.

    Leaves get exactly the flags given (plus PS for large pages); tables
    created on the way get `table_flags` (default P|W|U, so that rights
    come from the leaves unless a test says otherwise).
    """

    def __init__(self, memory, la57=False, table_start=0x1000, table_end=None):
        if not isinstance(memory, PhysicalMemory):
            raise InvalidInput("memory must be a PhysicalMemory")
        self.memory = memory
        self.levels = 5 if la57 else 4
        table_start = check_u64(table_start, "table_start")
        if table_start % 4096:
            raise InvalidInput("table_start must be 4 KiB aligned")
        self._next = table_start
        self._end = memory.size if table_end is None else check_u64(table_end, "table_end")
        if self._end > memory.size:
            raise InvalidInput("table_end %#x is past the end of memory" % self._end)
        self.tables = []
        self.root = self.alloc_frame()

    @property
    def cr3(self):
        return self.root

    def alloc_frame(self):
        """A zeroed 4 KiB frame from the table region."""
        pa = self._next
        if pa + 4096 > self._end:
            raise InvalidInput("table region exhausted at %#x" % pa)
        self._next += 4096
        self.memory.write(pa, bytes(4096))
        self.tables.append(pa)
        return pa

    def _check_va(self, va):
        va = check_u64(va, "virtual address")
        width = 9 * self.levels + 12
        top = va >> (width - 1)
        if top not in (0, (1 << (65 - width)) - 1):
            raise InvalidInput("%#x is not canonical for %d-level paging" % (va, self.levels))
        return va

    def entry_pa(self, va, level, create=False, table_flags=None):
        """Physical address of the entry at `level` (1 PTE .. 5 PML5E) for va.

        With create=True, missing tables above are allocated; otherwise a
        missing or large-page entry on the way raises InvalidInput.
        """
        va = self._check_va(va)
        if not 1 <= level <= self.levels:
            raise InvalidInput("level must be 1..%d" % self.levels)
        if table_flags is None:
            table_flags = bits.PTE_P | bits.PTE_W | bits.PTE_U
        table = self.root
        for lvl in range(self.levels, level, -1):
            epa = table + ((va >> _level_shift(lvl)) & 511) * 8
            e = self.memory.read_u64(epa)
            if not e & bits.PTE_P:
                if not create:
                    raise InvalidInput("no table at level %d for %#x" % (lvl - 1, va))
                new = self.alloc_frame()
                e = new | table_flags
                self.memory.write_u64(epa, e)
            elif lvl <= 3 and e & bits.PTE_PS:
                raise InvalidInput("%#x is inside a large page mapped at level %d" % (va, lvl))
            table = e & _ADDR_MASK
        return table + ((va >> _level_shift(level)) & 511) * 8

    def map(self, va, pa, page_size=4096, flags=bits.PTE_P | bits.PTE_W, table_flags=None,
            pkey=0):
        """Map one page; returns the leaf entry's physical address."""
        if page_size not in _SIZES:
            raise InvalidInput("page_size must be 4096, 2 MiB or 1 GiB, not %r" % (page_size,))
        level = _SIZES[page_size]
        size = 1 << _level_shift(level)
        va = self._check_va(va)
        pa = check_u64(pa, "physical address")
        if va % size or pa % size:
            raise InvalidInput("va %#x and pa %#x must be aligned to the page size %#x"
                               % (va, pa, size))
        if pa >> 52:
            raise InvalidInput("pa %#x exceeds 52 bits" % pa)
        flags = check_u64(flags, "flags")
        if not 0 <= pkey <= 15:
            raise InvalidInput("pkey must be 0..15")
        epa = self.entry_pa(va, level, create=True, table_flags=table_flags)
        value = pa | flags | (pkey << bits.PTE_PKEY_SHIFT)
        if level > 1:
            value |= bits.PTE_PS
        self.memory.write_u64(epa, value & U64_MAX)
        return epa

    def unmap(self, va, page_size=4096):
        """Clear the leaf entry mapping va (the tables stay)."""
        level = _SIZES.get(page_size)
        if level is None:
            raise InvalidInput("page_size must be 4096, 2 MiB or 1 GiB")
        self.memory.write_u64(self.entry_pa(va, level), 0)

    def set_entry(self, va, level, value):
        """Write a raw value into the entry at `level` for va."""
        self.memory.write_u64(self.entry_pa(va, level), check_u64(value, "entry value"))

    def get_entry(self, va, level):
        return self.memory.read_u64(self.entry_pa(va, level))


# ---------------------------------------------------------------------------
# QEMU monitor listings: `info tlb` and `info mem` (qemu target/i386/monitor.c,
# print_pte / tlb_info_la48 / tlb_info_la57 / mem_print / mem_info_la48 /
# mem_info_la57).
#
# The tables are walked here with numpy rather than through Mmu.mappings(),
# because QEMU's traversal is not the architectural one that mappings() does:
#   * QEMU masks every table address (and CR3) with 0x3fffffffff000, bits
#     49:12, whatever MAXPHYADDR is; mappings() uses MAXPHYADDR.
#   * it follows P and PS only: reserved bits are ignored, PS in a PML5E or
#     PML4E is ignored (the entry is taken as a table pointer), and a PTE's
#     bit 7 (PAT) is cleared before printing so the P column shows '-'.
#   * a table read outside the image reads as zeros (not present), so it
#     contributes nothing; mappings() skips it too.
# And it has to be fast on multi-GiB images: the walk below reads only the
# tables that present entries point to, a chunk of tables per numpy gather,
# so empty tables cost no Python work per entry.
#
# Addresses: QEMU composes a "raw" linear address from the table indices
# (l0 << 48) + (l1 << 39) + ..., ascending in traversal order, and
# sign-extends it only when printing (addr_canonical, bit 47 or bit 56).
# info mem merges over the raw addresses, so the last page of the lower half
# and the first page of the upper half are adjacent there and merge when
# their rights match, and an end address of 1 << 47 prints as
# ffff800000000000 while the final flush at 1 << 48 prints as
# 0001000000000000.  Both are reproduced, as is the sign extension of the
# size column (QEMU passes end - start through addr_canonical as well).
#
# One deliberate divergence: QEMU's mem_info_la57 tests P inverted at the
# PDPTE and PDE levels (`if (pdpe & PG_PRESENT_MASK) { prot = 0; ... }`), so
# for 5-level paging QEMU lists present 1 GiB regions as holes and walks
# non-present entries as tables at physical address 0.  Its output there
# depends on the contents of page 0 and shows no real mapping; info_mem
# instead does for 5-level exactly what mem_info_la48 does, one level up.
# ---------------------------------------------------------------------------

import numpy as _np  # noqa: E402  (kept beside the listings it serves)

_QEMU_TABLE_MASK = 0x3FFFFFFFFF000            # monitor.c: pml4e & 0x3fffffffff000ULL
_QEMU_PA_MASK = (0, 0x3FFFFFFFFF000,          # 4 KiB PTE
                 0x3FFFFFFE00000,             # 2 MiB PDE   (bits 49:21)
                 0x3FFFFC0000000)             # 1 GiB PDPTE (bits 49:30)
_QEMU_PROT = bits.PTE_P | bits.PTE_W | bits.PTE_U  # what mem_print compares
_CHUNK_TABLES = 1024                          # tables gathered per numpy read (4 MiB)
_IDX = _np.arange(512, dtype=_np.uint64)


# print_pte's "%c%c%c%c%c%c%c%c%c": X G P D A C T U W, '-' when clear, as a
# (512, 9) table of ASCII codes indexed by _flag_index.
_FLAG_LETTERS = _np.array([[ord(c) if i >> (8 - k) & 1 else ord("-")
                            for k, c in enumerate("XGPDACTUW")] for i in range(512)],
                          dtype=_np.uint8)
_HEX_DIGITS = _np.frombuffer(b"0123456789abcdef", dtype=_np.uint8)
_NIBBLE_SHIFTS = _np.arange(60, -4, -4, dtype=_np.uint64)


def _flag_index(e):
    """print_pte's nine flag bits of entries `e` (uint64 array) as 0..511:
    bit 8 = NX, 7 = G, 6 = PS, 5 = D, 4 = A, 3 = PCD, 2 = PWT, 1 = U, 0 = W."""
    one = _np.uint64(1)

    def bit(n, to):
        return ((e >> _np.uint64(n)) & one) << _np.uint64(to)
    return (bit(63, 8) | bit(8, 7) | bit(7, 6) | bit(6, 5) | bit(5, 4) | bit(4, 3)
            | bit(3, 2) | bit(2, 1) | bit(1, 0))


def _hex16(v):
    """%016x of every element of a uint64 array, as an (n, 16) uint8 array."""
    return _HEX_DIGITS[(v[:, None] >> _NIBBLE_SHIFTS[None, :]) & _np.uint64(15)]


def _canonical_array(v, width):
    """addr_canonical over a uint64 array."""
    sign = _np.uint64(1 << (width - 1))
    ext = _np.uint64(U64_MAX & ~((1 << width) - 1))
    return _np.where(v & sign, v | ext, v)


def _words(memory):
    if memory.sparse:
        return memory      # no single array: tables are read through the C core
    arr = memory.array
    return arr[:len(arr) - len(arr) % 8].view(_np.uint64)


_IDX8 = _IDX * _np.uint64(8)


def _read_tables(mem64, tables):
    """The 512 entries of each table (rows); words outside memory read 0."""
    if not isinstance(mem64, _np.ndarray):   # sparse memory (csrc/physmap.c)
        pas = (tables[:, None] + _IDX8[None, :]).ravel()
        return mem64.gather_u64(pas).reshape(len(tables), 512)
    words = (tables >> _np.uint64(3))[:, None] + _IDX[None, :]
    inside = words < _np.uint64(len(mem64))
    if inside.all():
        return mem64[words]
    ent = mem64[_np.where(inside, words, _np.uint64(0))]
    ent[~inside] = 0
    return ent


def _merge(a, b):
    """Two chunks (va, entry, level, prot) into one, ascending by va."""
    parts = [_np.concatenate((x, y)) for x, y in zip(a, b)]
    order = _np.argsort(parts[0], kind="stable")
    return tuple(p[order] for p in parts)


def _expand(mem64, level, tables, bases, prots):
    """Present leaves under `tables` (all at `level`), QEMU's way.

    tables: uint64 table addresses; bases: the raw linear address of entry 0
    of each table; prots: P|W|U ANDed over the entries above.  Yields chunks
    (va, entry, level, prot) of numpy arrays, ascending in raw va, chunk
    after chunk.
    """
    shift = _np.uint64(12 + 9 * (level - 1))
    ps = _np.uint64(bits.PTE_PS)
    for s in range(0, len(tables), _CHUNK_TABLES):
        ent = _read_tables(mem64, tables[s:s + _CHUNK_TABLES])
        rows, cols = _np.nonzero(ent & _np.uint64(1))
        if not len(rows):
            continue
        e = ent[rows, cols]
        va = bases[s:s + _CHUNK_TABLES][rows] + (cols.astype(_np.uint64) << shift)
        pr = prots[s:s + _CHUNK_TABLES][rows] & e & _np.uint64(_QEMU_PROT)
        if level == 1:
            leaf = _np.ones(len(e), dtype=bool)
        elif level <= 3:
            leaf = (e & ps) != 0
        else:                      # PS in a PML4E/PML5E: QEMU does not look at it
            leaf = _np.zeros(len(e), dtype=bool)
        leaves = (va[leaf], e[leaf], _np.full(int(leaf.sum()), level, dtype=_np.uint8),
                  pr[leaf])
        tab = ~leaf
        done = 0
        if tab.any():
            # Leaves at this level interleave with the subtrees of the table
            # entries; each subtree chunk is merged with the leaves below its
            # last address, so the output stays ascending and bounded.
            for chunk in _expand(mem64, level - 1, e[tab] & _np.uint64(_QEMU_TABLE_MASK),
                                 va[tab], pr[tab]):
                k = int(_np.searchsorted(leaves[0], chunk[0][-1], side="right"))
                if k > done:
                    chunk = _merge(tuple(x[done:k] for x in leaves), chunk)
                    done = k
                yield chunk
        if done < len(leaves[0]):
            yield tuple(x[done:] for x in leaves)


def _qemu_leaves(mmu):
    cpu = mmu.cpu
    root = _np.array([cpu.cr3 & _QEMU_TABLE_MASK], dtype=_np.uint64)
    zero = _np.zeros(1, dtype=_np.uint64)
    prot = _np.array([_QEMU_PROT], dtype=_np.uint64)
    return _expand(_words(mmu.memory), cpu.levels, root, zero, prot)


# The listings are fixed-width lines, so they are formatted by numpy a chunk
# at a time (a Python %-format per line would dominate on big images).

def iter_info_tlb_columns(mmu):
    """The columns of QEMU's `info tlb` in numpy chunks: (va, pa, flags,
    level) -- va sign-extended, pa masked as QEMU prints it, flags the nine
    X G P D A C T U W bits as 0..511 (`_FLAG_LETTERS` row), level 1..3.
    Nothing when paging is off."""
    cpu = mmu.cpu
    if not cpu.paging:
        return
    width = 57 if cpu.levels == 5 else 48
    masks = _np.array(_QEMU_PA_MASK, dtype=_np.uint64)
    not_ps = _np.uint64(U64_MAX & ~bits.PTE_PS)
    for va, e, level, _prot in _qemu_leaves(mmu):
        # tlb_info_la48 prints a PTE as `pte & ~PG_PSE_MASK`: bit 7 of a
        # PTE is PAT, and the P column must not show it.
        flags = _flag_index(_np.where(level == 1, e & not_ps, e))
        yield _canonical_array(va, width), e & masks[level], flags, level


def iter_info_tlb(mmu):
    """QEMU's `info tlb` text for mmu's tables, in pieces of whole lines."""
    if not mmu.cpu.paging:
        yield "PG disabled\n"
        return
    for va, pa, flags, _level in iter_info_tlb_columns(mmu):
        # "%016x: %016x %c%c%c%c%c%c%c%c%c\n"
        line = _np.empty((len(va), 45), dtype=_np.uint8)
        line[:, 0:16] = _hex16(va)
        line[:, 16:18] = (ord(":"), ord(" "))
        line[:, 18:34] = _hex16(pa)
        line[:, 34] = ord(" ")
        line[:, 35:44] = _FLAG_LETTERS[flags]
        line[:, 44] = ord("\n")
        yield line.tobytes().decode("ascii")


def flag_letters(flags):
    """The nine-letter flag column of `info tlb` for each flag index (0..511)."""
    return [row.tobytes().decode("ascii") for row in _FLAG_LETTERS[flags]]


def _mem_lines(start, end, prot, width):
    # "%016x-%016x %016x %c%c%c\n" of canonical(start), canonical(end),
    # canonical(end - start), u/-, r, w/-.
    line = _np.empty((len(start), 55), dtype=_np.uint8)
    line[:, 0:16] = _hex16(_canonical_array(start, width))
    line[:, 16] = ord("-")
    line[:, 17:33] = _hex16(_canonical_array(end, width))
    line[:, 33] = ord(" ")
    line[:, 34:50] = _hex16(_canonical_array(end - start, width))
    line[:, 50] = ord(" ")
    line[:, 51] = _np.where(prot & _np.uint64(bits.PTE_U), ord("u"), ord("-"))
    line[:, 52] = ord("r")
    line[:, 53] = _np.where(prot & _np.uint64(bits.PTE_W), ord("w"), ord("-"))
    line[:, 54] = ord("\n")
    return line.tobytes().decode("ascii")


def iter_info_mem(mmu):
    """QEMU's `info mem` text for mmu's tables, in pieces of whole lines.

    mem_print starts a range at each change of prot = (P|W|U of the leaf)
    ANDed with the entries above (NX, A, D, G... are not compared), and a
    not-present entry at any level is prot 0, which ends a range.  So a
    range is a maximal run of leaves, contiguous in raw linear address, with
    equal U and W.
    """
    cpu = mmu.cpu
    if not cpu.paging:
        yield "PG disabled\n"
        return
    width = 57 if cpu.levels == 5 else 48
    one, twelve, nine = _np.uint64(1), _np.uint64(12), _np.uint64(9)
    carry = None                   # (start, end, prot) of the range still open
    for va, _e, level, prot in _qemu_leaves(mmu):
        end = va + (one << (twelve + nine * (level.astype(_np.uint64) - one)))
        # A range begins where the address is not the previous end or prot differs.
        brk = _np.ones(len(va), dtype=bool)
        brk[1:] = (va[1:] != end[:-1]) | (prot[1:] != prot[:-1])
        first = _np.flatnonzero(brk)
        last = _np.append(first[1:], len(va)) - 1
        starts, ends, prots = va[first], end[last], prot[first]
        if carry is not None:
            if starts[0] == carry[1] and prots[0] == carry[2]:
                starts[0] = carry[0]
            else:
                yield _mem_lines(*(_np.array([x], dtype=_np.uint64) for x in carry),
                                 width=width)
        if len(starts) > 1:
            yield _mem_lines(starts[:-1], ends[:-1], prots[:-1], width)
        carry = (starts[-1], ends[-1], prots[-1])
    if carry is not None:
        yield _mem_lines(*(_np.array([x], dtype=_np.uint64) for x in carry), width=width)


def info_tlb(mmu):
    """Exactly the text QEMU's monitor prints for `info tlb` (x86-64).

    One line per present leaf, ascending in QEMU's traversal order (lower
    half first): sign-extended VA, ": ", PA (the leaf masked with
    0x3fffffffff000 / 0x3ffffffe00000 / 0x3ffffc0000000 for 4K / 2M / 1G),
    then X G P D A C T U W from the leaf's own bits ('-' when clear).
    "PG disabled" when CR0.PG=0.
    """
    return "".join(iter_info_tlb(mmu))


def info_mem(mmu):
    """Exactly the text QEMU's monitor prints for `info mem` (x86-64).

    One line per merged range: "START-END SIZE" (each %016x, sign-extended
    as QEMU does) then u/-, r, w/- with U and W ANDed over all levels.
    See iter_info_mem for the merging rule and the module comment above for
    QEMU's address quirks (and its 5-level bug we do not copy).
    """
    return "".join(iter_info_mem(mmu))


__all__ += ["iter_info_tlb", "iter_info_mem", "iter_info_tlb_columns", "flag_letters"]
