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
