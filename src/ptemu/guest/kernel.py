"""A small guest kernel whose page tables live in guest memory.

The kernel runs on any machine of the machine contract (a NativeMachine or
a hypervisor VM) and sees only what a guest sees: guest-physical memory
(`machine.phys`) and one vCPU.  Its page tables are ordinary guest frames,
changed ONLY by

  * `machine.phys` writes at boot, while "paging is off" (the direct map);
  * guest stores `vcpu.store_u64(DIRECT_MAP + gpa, value)` through the
    kernel's direct map of all guest-physical memory (the classic way, which
    a shadow-paging hypervisor must trap: every page-table frame it shadows
    is write-protected);
  * or, when the machine is paravirtual (`machine.paging == "paravirt"`), by
    batched `mmu_update` hypercalls, with `invlpg` / `flush_tlb` /
    `new_baseptr` hypercalls for invalidations and CR3 loads (Xen PV).

Guest virtual layout (4-level paging, as Linux x86-64)::

    0x0000000000000000 .. 0x00007fffffffffff   user half, one per process
    0xffff888000000000 + gpa                   direct map (PML4 slot 273),
                                               supervisor-only, NX, 2 MiB
                                               or 4 KiB pages

With `levels=5` (CR4.LA57: 57-bit linear addresses, a PML5 top table, SDM
4.5) the user half reaches 0x00ffffffffffffff (mmap below 47 bits unless
asked, as Linux does) and the direct map stays at the same address, which
is canonical at both widths: PML5 slot 511, then PML4 slot 273.  CR4.LA57
cannot change in IA-32e mode (SDM 4.1.1: MOV CR4 #GP), so it is part of the
state the kernel is entered in: the boot sets it in the vCPU's CpuState
(plain assignment, the loader's work with paging off) before its first
MOV CR3.

The kernel-half top-table entries (256..511) are copied into every
process's top table, so all processes share the kernel's tables below.

What it does, Linux-style:
  * a guest-physical frame allocator with reference counts (LIFO free
    list: a freed page-table frame is soon reused as a data page, which a
    hypervisor must notice);
  * processes with their own top table; context switches are MOV CR3
    (`vcpu.write_cr3`, or the `new_baseptr` hypercall);
  * fork with copy-on-write: every private page becomes read-only + COW in
    both parent and child (the child's copy has A clear, like
    pte_mkold), then a full TLB flush of the parent (flush_tlb_mm);
  * the #PF handler: demand paging of anonymous memory (a read maps the
    shared zero page read-only, a write maps a fresh zeroed frame), COW
    break on a write to a COW page (copy, or reuse when the frame is no
    longer shared; a copy is followed by INVLPG because the frame changed),
    SIGSEGV (`SegmentationFault`) for anything else;
  * exec (a fresh address space, the old one torn down) and exit (leaf
    entries cleared by stores, frames and tables freed after the CR3 switch
    that flushes them from the TLB);
  * mmap / munmap / mprotect: munmap and permission changes end with INVLPG
    for each changed present page, or one full flush when more than
    `flush_ceiling` (33, Linux's tlb_single_page_flush_ceiling) pages changed.

By concern, one file each: mm.py (layout, records, frames, page-table
edits), process.py (spawn, fork/COW, exec, exit, wait), vmas.py (mmap,
munmap, mprotect), fault.py (the #PF handler, user execution); this file
composes them (Kernel) and boots.

Data movement (clear_page, copy_page) is modelled as `machine.phys` writes
(DMA-like: bulk copies through the direct map would be 512 stores a page);
it never writes a live page-table frame of a process, and a hypervisor
handles a phys write to a frame it shadows as a trapped page-table write.
"""
from collections import defaultdict

import numpy as np

from ptemu import bits
from ptemu._native import InvalidInput, check_u64
from ptemu.guest.mm import (  # noqa: F401 (the names kernel.py has always exported)
    PAGE, PS, DIRECT_MAP, USER_TOP, USER_TOP_LA57, _DIRECT_SLOT5, PTE_COW, PTE_PROTNONE,
    KERNEL_TABLE, KERNEL_DATA,
    DEFAULT_LAYOUT, _DIRECT_SLOT, GuestKernelError, GuestOutOfMemory, SegmentationFault,
    Vma, Process, _readers, _page_writers, AddressSpaces, STREAM_MAX)
from ptemu.guest.process import Processes
from ptemu.guest.vmas import Vmas
from ptemu.guest.fault import FaultHandler

__all__ = ["Kernel", "Process", "Vma", "SegmentationFault", "GuestKernelError",
           "GuestOutOfMemory", "DIRECT_MAP", "USER_TOP", "USER_TOP_LA57", "PTE_COW",
           "PTE_PROTNONE", "DEFAULT_LAYOUT"]


class Kernel(AddressSpaces, Processes, Vmas, FaultHandler):
    """A guest kernel on `machine` (see the module docstring).

    levels: 4 (4-level paging) or 5 (5-level: CR4.LA57, a PML5 top table).
    direct_map_page_size: 2 MiB (default) or 4096 for the direct map.
    paravirt: use hypercalls for page-table updates and invalidations; the
      default is machine.paging == "paravirt" (True also works on a
      NativeMachine, which performs the hypercalls directly).
    flush_ceiling: above this many pages munmap/mprotect flush everything.
    zero_page: map the shared zero page on read faults of anonymous memory.
    zap_on_exit: clear each leaf entry by a store when tearing down an
      address space (Linux zap_pte_range) before freeing the tables.
    batch: paravirtual mmu_update batch size.
    record_faults: keep `fault_log`, one (pid, cr2, error_code) per true
      fault delivered to this kernel.
    store_streams: issue page-table stores in bulk (vcpu.store_stream) rather
      than one store_u64 call each; the machine sees the same stores in the
      same order relative to everything else it sees.
    """

    def __init__(self, machine, *, direct_map_page_size=1 << 21, paravirt=None,
                 flush_ceiling=33, zero_page=True, zap_on_exit=True, batch=512,
                 record_faults=False, store_streams=True, levels=4):
        if isinstance(levels, bool) or levels not in (4, 5):
            raise InvalidInput("levels must be 4 or 5 (5-level paging, CR4.LA57), not %r"
                               % (levels,))
        #: paging depth; the user half ends at user_top (SDM 4.5: 48- or 57-bit)
        self.levels = levels
        self.user_top = USER_TOP_LA57 if levels == 5 else USER_TOP
        # The index shift of each table level above level 1, top first.
        self._table_shifts = tuple(12 + 9 * (level - 1) for level in range(levels, 1, -1))
        self.machine = machine
        self.vcpu = machine.vcpu
        self.phys = machine.phys
        if direct_map_page_size not in (PAGE, 1 << 21):
            raise InvalidInput("direct_map_page_size must be 4096 or 2 MiB")
        if paravirt is None:
            paravirt = machine.paging == "paravirt"        # (the machine contract)
        self.paravirt = bool(paravirt)
        if not isinstance(flush_ceiling, int) or flush_ceiling < 0:
            raise InvalidInput("flush_ceiling must be a non-negative int")
        if not isinstance(batch, int) or batch < 1:
            raise InvalidInput("batch must be a positive int")
        self.flush_ceiling = flush_ceiling
        self.zero_page = bool(zero_page)
        self.zap_on_exit = bool(zap_on_exit)
        self.batch = batch
        self.stats = defaultdict(int)
        self.fault_log = [] if record_faults else None
        #: page-table stores go out as store streams (vcpu.store_stream: every
        #: machine of docs/machine-contract.md has them)
        self._streams = bool(store_streams)
        # Page-table writes not yet done (see _sync), at most _pending_max of
        # them, in order: chunks (where each goes -- the entry's gpa for
        # mmu_update, its direct-map address for a store -- and its value, as
        # two uint64 arrays or two lists), then the single writes since the
        # last chunk (two lists).
        self._deferred = self.paravirt or self._streams
        self._pending_base = 0 if self.paravirt else DIRECT_MAP
        self._pending_max = batch if self.paravirt else STREAM_MAX
        self._pending_chunks = []
        self._pending_at, self._pending_value = [], []
        self._npending = 0
        size = int(machine.memory_bytes)
        if size % PAGE or size < 64 * PAGE:
            raise InvalidInput("guest memory must be at least 64 pages and whole pages")
        if size > 1 << 39:
            raise InvalidInput("the direct map covers at most 512 GiB")
        self.memory_bytes = size
        self.nframes = size // PAGE
        # Frame 0 is never handed out (a null frame catches table bugs).
        self.refcount = np.zeros(self.nframes, dtype=np.int32)
        self.refcount[0] = 1
        self._rc = memoryview(self.refcount)    # its items as ints (the scalar paths)
        self._free = list(range(self.nframes - 1, 0, -1))   # pop() gives the lowest
        self._table_frames = set()          # frames holding live page tables
        #: top table -> {va >> 21: its level-1 table} (see _pte_addr)
        self._l1_tables = {}
        self.procs = {}
        self._next_pid = 1
        self._entry, self._peek_table = _readers(self.phys)
        self._clear_page, self._copy_page = _page_writers(machine)
        self._boot(direct_map_page_size)

    def _boot(self, dm_size):
        phys = self.phys
        self.kernel_top = self._alloc_frame(table=True)
        pml4 = self.kernel_top
        if self.levels == 5:
            pml4 = self._alloc_frame(table=True)
            phys.write_u64(self.kernel_top + 8 * _DIRECT_SLOT5, pml4 | KERNEL_TABLE)
        pdpt = self._alloc_frame(table=True)
        phys.write_u64(pml4 + 8 * _DIRECT_SLOT, pdpt | KERNEL_TABLE)
        for gb in range(0, self.memory_bytes, 1 << 30):
            pd = self._alloc_frame(table=True)
            phys.write_u64(pdpt + 8 * (gb >> 30), pd | KERNEL_TABLE)
            for mb2 in range(gb, min(gb + (1 << 30), self.memory_bytes), 1 << 21):
                epa = pd + 8 * ((mb2 >> 21) & 511)
                if dm_size == 1 << 21 and mb2 + (1 << 21) <= self.memory_bytes:
                    phys.write_u64(epa, mb2 | KERNEL_DATA | PS)
                    continue
                pt = self._alloc_frame(table=True)
                phys.write_u64(epa, pt | KERNEL_TABLE)
                n = min(512, (self.memory_bytes - mb2) // PAGE)
                ptes = (np.arange(n, dtype=np.uint64) * np.uint64(PAGE)
                        + np.uint64(mb2)) | np.uint64(KERNEL_DATA)
                phys.write(pt, ptes.astype("<u8").tobytes())
        # The kernel-half entries every top table copies.
        top = np.frombuffer(phys.read(self.kernel_top, PAGE), dtype="<u8")
        self._kernel_half = [(i, int(top[i])) for i in range(256, 512) if top[i]]
        self.zero_frame = self._alloc_frame()           # the shared zero page
        self.refcount[self.zero_frame // PAGE] = 1 << 30  # never freed
        self.boot_frames = self.nframes - len(self._free)
        idle = Process(0, None, self.kernel_top)
        self.procs[0] = idle
        self.current = 0
        # The paging mode the kernel is entered in (see the module docstring).
        cpu = self.vcpu.cpu
        la57 = bits.CR4_LA57 if self.levels == 5 else 0
        if (cpu.cr4 & bits.CR4_LA57) != la57:
            cpu.cr4 = (cpu.cr4 & ~bits.CR4_LA57) | la57
        self._load_cr3(self.kernel_top)

    def pte(self, pid, va):
        """pid's level-1 entry for va (0 when no table holds it)."""
        proc = self._proc(pid)
        epa = self._pte_addr(proc.cr3, check_u64(va, "va") & ~(PAGE - 1), create=False)
        return 0 if epa is None else self._read(epa)

    def table_frames(self):
        """Guest-physical addresses of every live page-table frame (sorted)."""
        return sorted(self._table_frames)

    def snapshot_tables(self):
        """{table gpa: its 4 KiB as bytes} for every live page-table frame
        (A/D bits included), read from guest memory."""
        self._sync()
        return {gpa: self.phys.read(gpa, PAGE) for gpa in sorted(self._table_frames)}

    @property
    def frames_in_use(self):
        return self.nframes - len(self._free)
