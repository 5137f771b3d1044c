"""Address spaces of the guest kernel: the layout, processes and VMAs as
records, the guest-physical frame allocator, and page-table edits.

The rule this file keeps (see kernel.py): the kernel's page tables live in
guest memory and change ONLY by guest stores through the direct map
(`_write` -> vcpu.store_u64) or, paravirtually, by mmu_update hypercalls;
they are read side-effect free (`_read`, `_read_table`).  Invalidations are
the guest's own: MOV CR3, INVLPG (or their hypercalls).
"""
import sys

import numpy as np

from ptemu import bits
from ptemu._native import PtemuError, InvalidInput, MmuFault, WORD64
from ptemu.memory import PhysicalMemory
from ptemu.hypervisor.exits import STORE_DTYPE

__all__ = ["AddressSpaces", "Process", "Vma", "SegmentationFault", "GuestKernelError",
           "GuestOutOfMemory", "DIRECT_MAP", "USER_TOP", "USER_TOP_LA57", "PTE_COW",
           "PTE_PROTNONE", "DEFAULT_LAYOUT"]

PAGE = 4096
#: Base of the direct map of guest-physical memory (Linux page_offset_base).
DIRECT_MAP = 0xffff888000000000
#: The user half ends here (canonical lower half, 4-level).
USER_TOP = 0x0000800000000000
#: ... and here with 5-level paging (57-bit addresses, SDM 4.5).
USER_TOP_LA57 = 0x0100000000000000
_DIRECT_SLOT = (DIRECT_MAP >> 39) & 511        # 273
#: The PML5 slot of the direct map with 5-level paging (bits 56:48 of a
#: kernel address that is canonical at both widths: 511).
_DIRECT_SLOT5 = (DIRECT_MAP >> 48) & 511

P, W, U = bits.PTE_P, bits.PTE_W, bits.PTE_U
A, D, PS, NX = bits.PTE_A, bits.PTE_D, bits.PTE_PS, bits.PTE_NX
#: Software bits (SDM tables 4-15..4-20: bits 11:9 are ignored by the MMU).
PTE_COW = 1 << 9          # a shared private page: a write must copy
PTE_PROTNONE = 1 << 10    # with P=0: a PROT_NONE page that keeps its frame
ADDR = 0x000FFFFFFFFFF000
_U64 = (1 << 64) - 1

#: Flags of a user page-table (non-leaf) entry: rights come from the leaves.
USER_TABLE = P | W | U
#: Flags of a kernel page-table (non-leaf) entry.
KERNEL_TABLE = P | W
#: A direct-map leaf: supervisor, writable, never executable.
KERNEL_DATA = P | W | NX

#: Default address-space layout of a new process: (start, length, prot).
DEFAULT_LAYOUT = (
    (0x400000, 16 * PAGE, "rx"),                       # text
    (0x10000000, 256 * PAGE, "rw"),                    # heap
    (0x7ffffff00000 - 64 * PAGE, 64 * PAGE, "rw"),     # stack
)
_MMAP_BASE = 0x7f0000000000
_ZERO_PAGE = bytes(PAGE)
#: Most page-table stores the kernel keeps pending before it runs them as a stream,
#: and fewest worth a stream (below, plain store_u64 calls are cheaper).
STREAM_MAX, STREAM_MIN = 4096, 8


class GuestKernelError(PtemuError):
    """The guest kernel cannot go on (an oops: a fault in kernel mode, a
    fault that does not go away, a corrupt table)."""


class GuestOutOfMemory(GuestKernelError):
    """No free guest-physical frame is left."""


class SegmentationFault(Exception):
    """SIGSEGV: a user access the kernel's #PF handler does not resolve.

    pid, va, error_code (0 for #GP), index (the trace index, or None for
    load/store), fault (the PageFault or GeneralProtection delivered).
    """

    def __init__(self, pid, fault, index=None):
        self.pid = pid
        self.fault = fault
        self.index = index
        self.va = getattr(fault, "va", None)
        self.error_code = getattr(fault, "error_code", 0)
        where = "" if index is None else " (trace index %d)" % index
        super().__init__("pid %d: segmentation fault at %s%s: %s" % (
            pid, "?" if self.va is None else "%#x" % self.va, where, fault))


class Vma:
    """A virtual memory area [start, end) with prot a subset of "rwx"."""

    __slots__ = ("start", "end", "prot")

    def __init__(self, start, end, prot):
        self.start, self.end, self.prot = start, end, prot

    def copy(self):
        return Vma(self.start, self.end, self.prot)

    def __repr__(self):
        return "Vma(%#x-%#x %s)" % (self.start, self.end, self.prot or "---")


class Process:
    """pid, parent pid, cr3 (its top table's guest-physical address), vmas
    (sorted, disjoint), state ("running" or "zombie"), exit_code, children."""

    def __init__(self, pid, parent, cr3):
        self.pid = pid
        self.parent = parent
        self.cr3 = cr3
        self.vmas = []
        self.state = "running"
        self.exit_code = None
        self.children = set()
        self.mmap_next = _MMAP_BASE

    def __repr__(self):
        return "Process(pid=%d, cr3=%#x, %s, %d vmas)" % (self.pid, self.cr3, self.state,
                                                         len(self.vmas))


def _check_prot(prot):
    if (not isinstance(prot, str) or any(c not in "rwx" for c in prot)
            or len(set(prot)) != len(prot)):
        raise InvalidInput("prot must be a string of distinct letters from 'rwx', not %r" % (prot,))
    return "".join(c for c in "rwx" if c in prot)


def _leaf_flags(prot):
    """The hardware rights of a leaf for prot (x86 cannot express write-only
    or execute-only: any access right makes the page readable)."""
    return P | U | (W if "w" in prot else 0) | (0 if "x" in prot else NX)


#: _leaf_flags of every prot (as _check_prot spells it), for the #PF handler.
_LEAF_FLAGS = {p: _leaf_flags(p) for p in ("", "r", "w", "x", "rw", "rx", "wx", "rwx")}


def _readers(phys):
    """(read entry i, read one table) of guest-physical memory, side-effect
    free: entry i is the u64 at gpa 8*i; straight from the backing array when
    phys is a PhysicalMemory."""
    if isinstance(phys, PhysicalMemory):
        if phys.frames is None and phys.array is not None:
            words = phys.array.view("<u8")
            if sys.byteorder == "little":
                # A memoryview's item is an int, read in C: a third of the cost
                # of a numpy scalar made into one.
                return (memoryview(phys.array).cast(WORD64).__getitem__,
                        lambda gpa: words[gpa >> 3:(gpa >> 3) + 512].copy())
            return (lambda i: int(words[i]),
                    lambda gpa: words[gpa >> 3:(gpa >> 3) + 512].copy())
        table = phys.table
        return (lambda i: int(table((i << 3) & ~0xFFF)[i & 511]),
                lambda gpa: table(gpa).copy())
    read_u64 = phys.read_u64
    return (lambda i: read_u64(i << 3),
            lambda gpa: np.frombuffer(phys.read(gpa, PAGE), dtype="<u8"))


def _page_writers(machine):
    """(clear_page(gpa), copy_page(dst, src)) on guest memory.  On a VM
    these are phys writes, which the hypervisor checks against the frames
    it shadows; on the native machine, where nothing needs to know, they
    are plain numpy copies (as fast as the hardware's rep stos/movs)."""
    phys = machine.phys
    if getattr(machine, "paging", None) == "native" and isinstance(phys, PhysicalMemory) \
            and phys.frames is None and phys.array is not None:
        mem = memoryview(phys.array)      # (a memoryview slice copies as memcpy does)

        def clear_page(gpa):
            mem[gpa:gpa + PAGE] = _ZERO_PAGE

        def copy_page(dst, src):
            mem[dst:dst + PAGE] = mem[src:src + PAGE]
        return clear_page, copy_page

    def clear_page(gpa):
        phys.write(gpa, _ZERO_PAGE)

    def copy_page(dst, src):
        phys.write(dst, phys.read(src, PAGE))
    return clear_page, copy_page


def _oops(exc):
    """The kernel's own store through the direct map faulted."""
    return GuestKernelError("kernel oops: a store to the direct map at %#x faulted: %s"
                            % (getattr(exc, "va", 0) or 0, exc))


def _ints(seq):
    """A pending chunk's addresses or values as Python ints."""
    return seq if isinstance(seq, list) else seq.tolist()


class AddressSpaces:
    """Kernel mixin: frames (refcounted, LIFO free list) and page-table access."""

    @property
    def free_frames(self):
        return len(self._free)

    def _alloc_frame(self, table=False):
        free = self._free
        if not free:
            raise GuestOutOfMemory("guest out of memory: all %d frames in use" % self.nframes)
        fn = free.pop()
        gpa = fn * PAGE
        self._rc[fn] = 1
        self._clear_page(gpa)
        if table:
            self._table_frames.add(gpa)
            self.stats["table_alloc"] += 1
        else:
            self.stats["frame_alloc"] += 1
        return gpa

    def _get(self, gpa):
        self._rc[gpa // PAGE] += 1

    def _put(self, gpa):
        fn = gpa // PAGE
        rc = self._rc[fn] - 1
        if rc < 0:
            raise GuestKernelError("frame %#x freed twice" % gpa)
        self._rc[fn] = rc
        if rc == 0:
            self._free.append(fn)
            self.stats["frame_free"] += 1

    @staticmethod
    def _frame_numbers(gpas):
        """The frame numbers of the uint64 array gpas, and whether they are distinct."""
        fns = (gpas >> np.uint64(12)).astype(np.intp)
        s = np.sort(fns)
        return fns, not (s[1:] == s[:-1]).any()

    def _get_many(self, gpas):
        """_get for each frame of the uint64 array gpas."""
        fns, distinct = self._frame_numbers(gpas)
        if distinct:
            self.refcount[fns] += 1
        else:
            np.add.at(self.refcount, fns, 1)

    def _put_many(self, gpas):
        """_put for each frame of the uint64 array gpas, in order (the frames
        freed join the free list in that order)."""
        fns, distinct = self._frame_numbers(gpas)
        rc = self.refcount[fns] - 1
        if not distinct or (rc < 0).any():
            for gpa in gpas.tolist():       # a frame twice, or freed twice: one by one
                self._put(gpa)
            return
        self.refcount[fns] = rc
        freed = fns[rc == 0].tolist()
        if freed:
            self._free.extend(freed)
            self.stats["frame_free"] += len(freed)

    def _free_table(self, gpa):
        self._table_frames.discard(gpa)
        self.refcount[gpa // PAGE] = 0
        self._free.append(gpa // PAGE)
        self.stats["table_free"] += 1

    def _sync(self):
        """Do the pending page-table writes: the mmu_update batch (paravirtual),
        or the guest stores as one store stream (vcpu.store_stream: in C, out
        only at a store that traps).  Before anything reads the tables, loads
        CR3, invalidates or runs user code, so the order of events the
        machine sees is that of one store at a time."""
        n = self._npending
        if not n:
            return
        chunks, tail = self._pending_chunks, (self._pending_at, self._pending_value)
        self._pending_chunks, self._pending_at, self._pending_value = [], [], []
        self._npending = 0
        if tail[1]:
            chunks.append(tail)
        if self.paravirt:
            pairs = []
            for at, values in chunks:
                pairs.extend(zip(_ints(at), _ints(values)))
            self.vcpu.hypercall("mmu_update", pairs)
            self.stats["mmu_update_batches"] += 1
        elif n < STREAM_MIN:
            # A few stores (a fault's one PTE): plain stores cost less than
            # making a stream.
            store = self.vcpu.store_u64
            try:
                for at, values in chunks:
                    if at.__class__ is not list:
                        at, values = at.tolist(), values.tolist()
                    for va, value in zip(at, values):
                        store(va, value)
            except MmuFault as exc:
                raise _oops(exc) from exc
        else:
            self.stats["store_streams"] += 1
            stream = np.empty(n, dtype=STORE_DTYPE)
            k = 0
            for at, values in chunks:
                m = len(values)
                stream["va"][k:k + m] = at
                stream["value"][k:k + m] = values
                k += m
            try:
                self.vcpu.store_stream(stream)
            except MmuFault as exc:
                raise _oops(exc) from exc

    def _read(self, gpa):
        if self._npending:
            self._sync()
        return self._entry(gpa >> 3)

    def _read_table(self, gpa):
        """A copy of the table at gpa as 512 uint64."""
        if self._npending:
            self._sync()
        return self._peek_table(gpa)

    def _write(self, gpa, value):
        """Change one page-table entry the way the guest must: queued for the
        next _sync (an mmu_update batch or a store stream, done at once when
        it is full), or one store through the direct map."""
        self.stats["pte_write"] += 1
        if self._deferred:
            self._pending_at.append(self._pending_base + gpa)
            self._pending_value.append(value)
            self._npending += 1
            if self._npending >= self._pending_max:
                self._sync()
            return
        try:
            self.vcpu.store_u64(DIRECT_MAP + gpa, value)
        except MmuFault as exc:
            raise _oops(exc) from exc

    def _set_pte(self, gpa, value):
        """_write(gpa, value), then _sync(): one entry changed now (the #PF
        handler's), as one store_u64 when nothing else is pending."""
        if self.paravirt and self._deferred and not self._npending:
            # _write then _sync written out for the one entry: a batch of one.
            self.stats["pte_write"] += 1
            self.vcpu.mmu_update1(self._pending_base + gpa, value)
            self.stats["mmu_update_batches"] += 1
            return
        if self._npending or self.paravirt:
            self._write(gpa, value)
            self._sync()
            return
        self.stats["pte_write"] += 1
        try:
            self.vcpu.store_u64(DIRECT_MAP + gpa, value)
        except MmuFault as exc:
            raise _oops(exc) from exc

    def _write_many(self, gpas, values):
        """_write(gpa, value) for each pair of the uint64 arrays gpas and values,
        in order, queued as array chunks: the batches and streams break where
        one _write at a time would break them."""
        n = len(values)
        if not n:
            return
        if not self._deferred:
            for gpa, value in zip(gpas.tolist(), values.tolist()):
                self._write(gpa, value)
            return
        self.stats["pte_write"] += n
        at = gpas + np.uint64(self._pending_base)
        cap = self._pending_max
        i = 0
        while i < n:
            if self._pending_value:         # the single writes before these
                self._pending_chunks.append((self._pending_at, self._pending_value))
                self._pending_at, self._pending_value = [], []
            j = min(n, i + cap - self._npending)
            self._pending_chunks.append((at[i:j], values[i:j]))
            self._npending += j - i
            if self._npending >= cap:
                self._sync()
            i = j

    def _load_cr3(self, cr3):
        self._sync()
        if self.paravirt:
            self.vcpu.hypercall("new_baseptr", cr3)
        else:
            self.vcpu.write_cr3(cr3)

    def _invlpg(self, va):
        self._sync()
        self.stats["invlpg"] += 1
        if self.paravirt:
            self.vcpu.hypercall("invlpg", va)
        else:
            self.vcpu.invlpg(va)

    def _flush_tlb(self):
        """Drop every (non-global) translation: a CR3 reload."""
        self._sync()
        self.stats["tlb_flush"] += 1
        if self.paravirt:
            self.vcpu.hypercall("flush_tlb")
        else:
            self.vcpu.write_cr3(self.vcpu.cpu.cr3)

    def _flush_pages(self, vas):
        """Linux flush_tlb_mm_range: INVLPG each page, or a full flush when
        there are more than flush_ceiling of them."""
        if len(vas) > self.flush_ceiling:
            self._flush_tlb()
        else:
            for va in vas:
                self._invlpg(va)

    def _new_top(self):
        top = self._alloc_frame(table=True)
        for i, e in self._kernel_half:
            self._write(top + 8 * i, e)
        return top

    def _pte_addr(self, top, va, create):
        """Guest-physical address of va's level-1 entry; None if a table on
        the way is missing and create is False.  The level-1 table found is
        remembered (until the address space is torn down: the kernel never
        changes or removes an entry above level 1 of a live one)."""
        if self._npending:
            self._sync()
        known = self._l1_tables.get(top)
        if known is not None:
            table = known.get(va >> 21)
            if table is not None:
                return table + 8 * ((va >> 12) & 511)
        table = top
        entry = self._entry
        for shift in self._table_shifts:
            i = (va >> shift) & 511
            if self._npending:
                self._sync()        # (a table made on the way: its entry first)
            e = entry((table >> 3) + i)
            if not e & P:
                if not create:
                    return None
                new = self._alloc_frame(table=True)
                self._write(table + 8 * i, new | USER_TABLE)
                e = new
            elif e & PS:
                raise GuestKernelError("user half holds a large page at %#x" % va)
            table = e & ADDR
        self._l1_tables.setdefault(top, {})[va >> 21] = table
        return table + 8 * ((va >> 12) & 511)

    def _leaves(self, top, start, end):
        """(va, entry gpa, value) of every level-1 entry in [start, end)
        that is present or PROT_NONE (a frame is attached)."""
        out = []

        def rec(table, level, base):
            shift = 12 + 9 * (level - 1)
            lo, hi = max(start, base), min(end, base + (512 << shift))
            if lo >= hi:
                return
            t = self._read_table(table)
            i0, i1 = (lo - base) >> shift, ((hi - 1 - base) >> shift) + 1
            sub = t[i0:i1]
            mask = (sub & np.uint64(P | PTE_PROTNONE if level == 1 else P)) != 0
            for k in np.flatnonzero(mask).tolist():
                i = i0 + k
                e = int(t[i])
                va = base + (i << shift)
                if level == 1:
                    if e & P or e & ADDR:
                        out.append((va, table + 8 * i, e))
                else:
                    rec(e & ADDR, level - 1, va)

        rec(top, self.levels, 0)
        return out
