"""EPT tables for nested paging (Intel SDM Vol. 3C ch. 29).

An `Ept` builds extended page tables in host memory, as a hypervisor does,
and holds the per-vCPU EPT state the C walker reads (EPTP, last exit).
`PhysicalMemory.nested(ept, size)` is then a guest-physical memory whose
walks are 2-D: every guest paging-structure reference and the final address
go through the EPT (csrc/ept.c).
"""
from ptemu._native import ffi, lib, InvalidInput, check_u64, ept_exit_from_c
from ptemu.memory import PhysicalMemory

__all__ = ["Ept", "EPT_R", "EPT_W", "EPT_X", "EPT_RWX"]

EPT_R = lib.PTEMU_EPT_R
EPT_W = lib.PTEMU_EPT_W
EPT_X = lib.PTEMU_EPT_X
EPT_RWX = EPT_R | EPT_W | EPT_X
EPT_A = lib.PTEMU_EPT_A
EPT_D = lib.PTEMU_EPT_D
EPT_PS = lib.PTEMU_EPT_PS
MT_WB = 6
_ADDR_MASK = 0x000FFFFFFFFFF000
_SIZES = {4096: 1, 1 << 21: 2, 1 << 30: 3}


class Ept:
    """EPT tables in `host` memory, table frames taken from [table_start, table_end).

    levels: 4 or 5 (EPTP page-walk length); ad: EPTP bit 6, EPT accessed and
    dirty flags.
    """

    def __init__(self, host, table_start=None, table_end=None, levels=4, ad=False,
                 maxphyaddr=52, alloc=None):
        if not isinstance(host, PhysicalMemory) or host.host is not None or host.sparse:
            raise InvalidInput("an Ept needs a plain PhysicalMemory as host")
        if levels not in (4, 5):
            raise InvalidInput("EPT page-walk length must be 4 or 5")
        self._alloc_frame = alloc
        if alloc is None:
            # Table frames from a fixed region [table_start, table_end).
            if table_start is None or table_end is None:
                raise InvalidInput("an Ept needs a table region or an alloc callable")
            table_start = check_u64(table_start, "table_start")
            table_end = check_u64(table_end, "table_end")
            if table_start % 4096 or table_end > host.size or table_start >= table_end:
                raise InvalidInput("EPT table region must be 4 KiB aligned and inside host memory")
        elif not callable(alloc):
            raise InvalidInput("alloc must be a callable returning a zeroed host frame address")
        if not 32 <= maxphyaddr <= 52:
            raise InvalidInput("maxphyaddr must be 32..52")
        self.host = host
        self.levels = levels
        self._next = table_start
        self._end = table_end
        self._c = ffi.new("ptemu_ept *")
        self._c.host = host._c
        self._c.maxphyaddr = maxphyaddr
        self.tables = []
        self.root = self._alloc()
        self._c.eptp = (self.root | lib.PTEMU_EPTP_WB
                        | (lib.PTEMU_EPTP_WALK5 if levels == 5 else lib.PTEMU_EPTP_WALK4)
                        | (lib.PTEMU_EPTP_AD if ad else 0))

    @property
    def c_handle(self):
        """The `ptemu_ept *` of this vCPU's EPT state, to pass to C entry points
        (it lives as long as this object); `fault_from_c` reads its last exit."""
        return self._c

    @property
    def eptp(self):
        return int(self._c.eptp)

    @property
    def refs(self):
        """Memory references made by EPT walks so far."""
        return int(self._c.refs)

    @property
    def walks(self):
        return int(self._c.walks)

    def _alloc(self):
        if self._alloc_frame is not None:
            pa = self._alloc_frame()
        else:
            pa = self._next
            if pa + 4096 > self._end:
                raise InvalidInput("EPT table region exhausted at %#x" % pa)
            self._next += 4096
        self.host.write(pa, bytes(4096))
        self.tables.append(pa)
        return pa

    def entry_pa(self, gpa, level, create=False):
        """Host address of the EPT entry at `level` (1 = EPT PTE) for gpa."""
        table = self.root
        for lvl in range(self.levels, level, -1):
            epa = table + ((gpa >> (12 + 9 * (lvl - 1))) & 511) * 8
            e = self.host.read_u64(epa)
            if not e & 7:
                if not create:
                    raise InvalidInput("no EPT table at level %d for gpa %#x" % (lvl - 1, gpa))
                e = self._alloc() | EPT_RWX
                self.host.write_u64(epa, e)
            elif lvl <= 3 and e & EPT_PS:
                raise InvalidInput("gpa %#x is inside a large EPT page at level %d" % (gpa, lvl))
            table = e & _ADDR_MASK
        return table + ((gpa >> (12 + 9 * (level - 1))) & 511) * 8

    def map(self, gpa, hpa, page_size=4096, rwx=EPT_RWX, memtype=MT_WB):
        """Map gpa -> hpa with R/W/X permissions; returns the entry's host address."""
        if page_size not in _SIZES:
            raise InvalidInput("page_size must be 4096, 2 MiB or 1 GiB")
        gpa, hpa = check_u64(gpa, "gpa"), check_u64(hpa, "hpa")
        if gpa % page_size or hpa % page_size:
            raise InvalidInput("gpa and hpa must be aligned to the page size")
        level = _SIZES[page_size]
        epa = self.entry_pa(gpa, level, create=True)
        self.host.write_u64(epa, hpa | rwx | (memtype << 3) | (EPT_PS if level > 1 else 0))
        return epa

    def unmap(self, gpa, page_size=4096):
        self.host.write_u64(self.entry_pa(gpa, _SIZES[page_size]), 0)

    def set_entry(self, gpa, level, value):
        self.host.write_u64(self.entry_pa(gpa, level), check_u64(value, "entry value"))

    def translate(self, gpa, access="r"):
        """One EPT walk (sets EPT A/D when enabled): the host address, or
        raises EptViolation / EptMisconfig."""
        acc = {"r": 0, "w": 1, "x": 2}.get(access)
        if acc is None:
            raise InvalidInput("access must be 'r', 'w' or 'x'")
        hpa = ffi.new("uint64_t *")
        if not lib.ptemu_ept_translate(self._c, check_u64(gpa, "gpa"), acc, hpa):
            raise ept_exit_from_c(self._c, 0)
        return int(hpa[0])

    def host_address(self, gpa):
        """Host address of gpa by reading the EPT tables (no side effects), or None."""
        table = self.root
        for level in range(self.levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            e = self.host.read_u64(table + ((gpa >> shift) & 511) * 8)
            if not e & 7:
                return None
            if level == 1 or (level <= 3 and e & EPT_PS):
                return (e & _ADDR_MASK & ~((1 << shift) - 1)) | (gpa & ((1 << shift) - 1))
            table = e & _ADDR_MASK
        return None

    @property
    def last_gpa(self):
        """The guest-physical address of the last successful nested translation."""
        return int(self._c.exit_gpa)
