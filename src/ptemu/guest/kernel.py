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

The kernel-half PML4 entries are copied into every process's top table, so
all processes share the kernel's PDPT and below.

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

Data movement (clear_page, copy_page) is modelled as `machine.phys` writes
(DMA-like: bulk copies through the direct map would be 512 stores a page);
it never writes a live page-table frame of a process, and a hypervisor
handles a phys write to a frame it shadows as a trapped page-table write.
"""
import bisect
from collections import defaultdict

import numpy as np

from ptemu import bits
from ptemu._native import (PtemuError, InvalidInput, MmuFault, PageFault, GeneralProtection,
                           check_u64, check_array)
from ptemu.memory import PhysicalMemory
from ptemu.mmu import TRACE_DTYPE

__all__ = ["Kernel", "Process", "Vma", "SegmentationFault", "GuestKernelError",
           "GuestOutOfMemory", "DIRECT_MAP", "USER_TOP", "PTE_COW", "PTE_PROTNONE",
           "DEFAULT_LAYOUT"]

PAGE = 4096
#: Base of the direct map of guest-physical memory (Linux page_offset_base).
DIRECT_MAP = 0xffff888000000000
#: The user half ends here (canonical lower half, 4-level).
USER_TOP = 0x0000800000000000
_DIRECT_SLOT = (DIRECT_MAP >> 39) & 511        # 273

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


def _readers(phys):
    """(read one u64, read one table) of guest-physical memory, side-effect
    free: straight from the backing array when phys is a PhysicalMemory."""
    if isinstance(phys, PhysicalMemory):
        if phys.frames is None and phys.array is not None:
            words = phys.array.view("<u8")
            return (lambda gpa: int(words[gpa >> 3]),
                    lambda gpa: words[gpa >> 3:(gpa >> 3) + 512].copy())
        table = phys.table
        return (lambda gpa: int(table(gpa & ~0xFFF)[(gpa & 0xFFF) >> 3]),
                lambda gpa: table(gpa).copy())
    return (phys.read_u64,
            lambda gpa: np.frombuffer(phys.read(gpa, PAGE), dtype="<u8"))


def _page_writers(machine):
    """(clear_page(gpa), copy_page(dst, src)) on guest memory.  On a VM
    these are phys writes, which the hypervisor checks against the frames
    it shadows; on the native machine, where nothing needs to know, they
    are plain numpy copies (as fast as the hardware's rep stos/movs)."""
    phys = machine.phys
    if getattr(machine, "paging", None) == "native" and isinstance(phys, PhysicalMemory) \
            and phys.frames is None and phys.array is not None:
        mem = phys.array

        def clear_page(gpa):
            mem[gpa:gpa + PAGE] = 0

        def copy_page(dst, src):
            mem[dst:dst + PAGE] = mem[src:src + PAGE]
        return clear_page, copy_page

    def clear_page(gpa):
        phys.write(gpa, _ZERO_PAGE)

    def copy_page(dst, src):
        phys.write(dst, phys.read(src, PAGE))
    return clear_page, copy_page


class Kernel:
    """A guest kernel on `machine` (see the module docstring).

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
    """

    def __init__(self, machine, *, direct_map_page_size=1 << 21, paravirt=None,
                 flush_ceiling=33, zero_page=True, zap_on_exit=True, batch=512,
                 record_faults=False):
        self.machine = machine
        self.vcpu = machine.vcpu
        self.phys = machine.phys
        if direct_map_page_size not in (PAGE, 1 << 21):
            raise InvalidInput("direct_map_page_size must be 4096 or 2 MiB")
        if paravirt is None:
            paravirt = getattr(machine, "paging", "native") == "paravirt"
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
        self._pending = []                 # paravirt: (gpa, value) not yet sent
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
        self._free = list(range(self.nframes - 1, 0, -1))   # pop() gives the lowest
        self._table_frames = set()          # frames holding live page tables
        self.procs = {}
        self._next_pid = 1
        self._peek, self._peek_table = _readers(self.phys)
        self._clear_page, self._copy_page = _page_writers(machine)
        self._boot(direct_map_page_size)

    # ======================================================================
    # Boot: the direct map, written through phys while paging is off.
    # ======================================================================
    def _boot(self, dm_size):
        phys = self.phys
        self.kernel_top = self._alloc_frame(table=True)
        pdpt = self._alloc_frame(table=True)
        phys.write_u64(self.kernel_top + 8 * _DIRECT_SLOT, pdpt | KERNEL_TABLE)
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
        self._load_cr3(self.kernel_top)

    # ======================================================================
    # The frame allocator
    # ======================================================================
    @property
    def free_frames(self):
        return len(self._free)

    def _alloc_frame(self, table=False):
        if not self._free:
            raise GuestOutOfMemory("guest out of memory: all %d frames in use" % self.nframes)
        fn = self._free.pop()
        gpa = fn * PAGE
        self.refcount[fn] = 1
        self._clear_page(gpa)
        if table:
            self._table_frames.add(gpa)
            self.stats["table_alloc"] += 1
        else:
            self.stats["frame_alloc"] += 1
        return gpa

    def _get(self, gpa):
        self.refcount[gpa // PAGE] += 1

    def _put(self, gpa):
        fn = gpa // PAGE
        rc = int(self.refcount[fn]) - 1
        if rc < 0:
            raise GuestKernelError("frame %#x freed twice" % gpa)
        self.refcount[fn] = rc
        if rc == 0:
            self._free.append(fn)
            self.stats["frame_free"] += 1

    def _free_table(self, gpa):
        self._table_frames.discard(gpa)
        self.refcount[gpa // PAGE] = 0
        self._free.append(gpa // PAGE)
        self.stats["table_free"] += 1

    # ======================================================================
    # Page-table access: reads from guest memory, writes by guest stores
    # through the direct map or by mmu_update hypercalls.
    # ======================================================================
    def _sync(self):
        """Paravirtual: send the pending mmu_update batch."""
        if self._pending:
            batch, self._pending = self._pending, []
            self.vcpu.hypercall("mmu_update", batch)
            self.stats["mmu_update_batches"] += 1

    def _read(self, gpa):
        if self._pending:
            self._sync()
        return self._peek(gpa)

    def _read_table(self, gpa):
        """A copy of the table at gpa as 512 uint64."""
        if self._pending:
            self._sync()
        return self._peek_table(gpa)

    def _write(self, gpa, value):
        """Change one page-table entry the way the guest must."""
        self.stats["pte_write"] += 1
        if self.paravirt:
            self._pending.append((gpa, value))
            if len(self._pending) >= self.batch:
                self._sync()
            return
        try:
            self.vcpu.store_u64(DIRECT_MAP + gpa, value)
        except MmuFault as exc:
            raise GuestKernelError("kernel oops: a store to the direct map at %#x faulted: %s"
                                   % (DIRECT_MAP + gpa, exc)) from exc

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
        the way is missing and create is False."""
        table = top
        for level in (4, 3, 2):
            epa = table + 8 * ((va >> (12 + 9 * (level - 1))) & 511)
            e = self._read(epa)
            if not e & P:
                if not create:
                    return None
                new = self._alloc_frame(table=True)
                self._write(epa, new | USER_TABLE)
                e = new
            elif e & PS:
                raise GuestKernelError("user half holds a large page at %#x" % va)
            table = e & ADDR
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

        rec(top, 4, 0)
        return out

    # ======================================================================
    # Processes
    # ======================================================================
    def _proc(self, pid, alive=True):
        proc = self.procs.get(pid)
        if proc is None or pid == 0:
            raise InvalidInput("no process %r" % (pid,))
        if alive and proc.state != "running":
            raise InvalidInput("process %d has exited" % pid)
        return proc

    def switch_to(self, pid):
        """Schedule pid: a context switch is a CR3 load (new_baseptr)."""
        if pid == self.current:
            return
        proc = self.procs.get(pid)
        if proc is None or proc.state != "running":
            raise InvalidInput("cannot switch to %r: no such running process" % (pid,))
        self._load_cr3(proc.cr3)
        self.current = pid
        self.stats["context_switch"] += 1

    def _set_layout(self, proc, layout):
        proc.vmas = []
        for start, length, prot in (DEFAULT_LAYOUT if layout is None else layout):
            self._add_vma(proc, start, length, prot)

    def spawn(self, layout=None):
        """A new process with a fresh address space (layout: (start,
        length, prot) triples; DEFAULT_LAYOUT if None).  Returns its pid."""
        pid = self._next_pid
        proc = Process(pid, 0, 0)
        self._set_layout(proc, layout)          # validate before allocating
        proc.cr3 = self._new_top()
        self._next_pid += 1
        self.procs[pid] = proc
        self.procs[0].children.add(pid)
        self.stats["spawn"] += 1
        return pid

    def fork(self, pid):
        """Copy-on-write fork of pid; returns the child's pid."""
        parent = self._proc(pid)
        self.switch_to(pid)
        child = Process(self._next_pid, pid, 0)
        child.vmas = [v.copy() for v in parent.vmas]
        child.mmap_next = parent.mmap_next
        self._next_pid += 1
        child.cr3 = self._new_top()
        top = self._read_table(parent.cr3)
        for i in np.flatnonzero(top[:256] & np.uint64(P)).tolist():
            sub = self._copy_table(int(top[i]) & ADDR, 3)
            self._write(child.cr3 + 8 * i, sub | USER_TABLE)
        # dup_mmap: the parent's writable entries just became read-only.
        self._flush_tlb()
        self.procs[child.pid] = child
        parent.children.add(child.pid)
        self.stats["fork"] += 1
        return child.pid

    def _copy_table(self, src, level):
        t = self._read_table(src)
        dst = self._alloc_frame(table=True)
        if level == 1:
            mask = (t & np.uint64(P | PTE_PROTNONE)) != 0
            for i in np.flatnonzero(mask).tolist():
                e = int(t[i])
                frame = e & ADDR
                if not (e & P or frame):
                    continue
                shared = (e & ~W & _U64) | PTE_COW
                if shared != e:
                    self._write(src + 8 * i, shared)
                self._write(dst + 8 * i, shared & ~A & _U64)
                if frame != self.zero_frame:
                    self._get(frame)
                self.stats["fork_pte"] += 1
        else:
            for i in np.flatnonzero(t & np.uint64(P)).tolist():
                sub = self._copy_table(int(t[i]) & ADDR, level - 1)
                self._write(dst + 8 * i, sub | USER_TABLE)
        return dst

    def _destroy_mm(self, top):
        """Tear down an address space that no CR3 holds any more (the CR3
        switch away from it flushed its translations)."""
        tables = []
        t = self._read_table(top)
        for i in np.flatnonzero(t[:256] & np.uint64(P)).tolist():
            self._destroy_table(int(t[i]) & ADDR, 3, tables)
        tables.append(top)
        self._sync()            # no pending update may land in a freed frame
        for gpa in tables:
            self._free_table(gpa)

    def _destroy_table(self, table, level, tables):
        t = self._read_table(table)
        if level == 1:
            for i in np.flatnonzero(t & np.uint64(P | PTE_PROTNONE)).tolist():
                e = int(t[i])
                frame = e & ADDR
                if not (e & P or frame):
                    continue
                if self.zap_on_exit:
                    self._write(table + 8 * i, 0)
                if frame != self.zero_frame:
                    self._put(frame)
        else:
            for i in np.flatnonzero(t & np.uint64(P)).tolist():
                self._destroy_table(int(t[i]) & ADDR, level - 1, tables)
        tables.append(table)

    def exec(self, pid, layout=None):
        """Replace pid's address space by a fresh one with `layout`."""
        proc = self._proc(pid)
        self.switch_to(pid)
        old = proc.cr3
        self._set_layout(proc, layout)
        proc.mmap_next = _MMAP_BASE
        proc.cr3 = self._new_top()
        self._load_cr3(proc.cr3)        # exec_mmap: activate the new mm
        self._destroy_mm(old)
        self.stats["exec"] += 1

    def exit(self, pid, code=0):
        """pid exits: its address space is torn down; it stays a zombie
        until its parent wait()s for it.  Its children go to pid 0."""
        proc = self._proc(pid)
        self.switch_to(pid)
        parent = self.procs.get(proc.parent)
        nxt = proc.parent if parent is not None and parent.state == "running" else 0
        self._load_cr3(self.procs[nxt].cr3)
        self.current = nxt
        self.stats["context_switch"] += 1
        self._destroy_mm(proc.cr3)
        proc.cr3 = None
        proc.vmas = []
        proc.state = "zombie"
        proc.exit_code = code
        for c in proc.children:
            if c in self.procs:
                self.procs[c].parent = 0
                self.procs[0].children.add(c)
        proc.children = set()
        self.stats["exit"] += 1

    def wait(self, pid):
        """Reap the zombie pid; its exit code."""
        proc = self.procs.get(pid)
        if proc is None or pid == 0:
            raise InvalidInput("no process %r" % (pid,))
        if proc.state != "zombie":
            raise InvalidInput("process %d has not exited" % pid)
        del self.procs[pid]
        parent = self.procs.get(proc.parent)
        if parent is not None:
            parent.children.discard(pid)
        return proc.exit_code

    # ======================================================================
    # Virtual memory areas: mmap, munmap, mprotect
    # ======================================================================
    @staticmethod
    def _check_range(start, length):
        start = check_u64(start, "address")
        length = check_u64(length, "length")
        if start % PAGE or length % PAGE or not length:
            raise InvalidInput("address %#x and length %#x must be page aligned, length > 0"
                               % (start, length))
        if start + length > USER_TOP:
            raise InvalidInput("range %#x+%#x leaves the user half" % (start, length))
        return start, start + length

    def _add_vma(self, proc, start, length, prot):
        start, end = self._check_range(start, length)
        prot = _check_prot(prot)
        i = bisect.bisect_left([v.start for v in proc.vmas], start)
        if (i > 0 and proc.vmas[i - 1].end > start) or (i < len(proc.vmas)
                                                       and proc.vmas[i].start < end):
            raise InvalidInput("range %#x-%#x overlaps a mapping" % (start, end))
        proc.vmas.insert(i, Vma(start, end, prot))

    def find_vma(self, pid, va):
        """The Vma of pid containing va, or None."""
        return self._find_vma(self._proc(pid), va)

    @staticmethod
    def _find_vma(proc, va):
        vmas = proc.vmas
        lo, hi = 0, len(vmas)
        while lo < hi:
            mid = (lo + hi) // 2
            v = vmas[mid]
            if va < v.start:
                hi = mid
            elif va >= v.end:
                lo = mid + 1
            else:
                return v
        return None

    def _split(self, proc, start, end):
        """Split VMAs at start and end; the VMAs inside [start, end)."""
        out = []
        new = []
        for v in proc.vmas:
            if v.end <= start or v.start >= end:
                new.append(v)
                continue
            if v.start < start:
                new.append(Vma(v.start, start, v.prot))
            mid = Vma(max(v.start, start), min(v.end, end), v.prot)
            new.append(mid)
            out.append(mid)
            if v.end > end:
                new.append(Vma(end, v.end, v.prot))
        proc.vmas = new
        return out

    def mmap(self, pid, length, prot="rw", addr=None):
        """Anonymous private memory, demand paged; returns its address."""
        proc = self._proc(pid)
        length = check_u64(length, "length")
        if addr is None:
            addr = proc.mmap_next
            proc.mmap_next = addr + length + PAGE       # a guard gap
        self._add_vma(proc, addr, length, prot)
        self.stats["mmap"] += 1
        return addr

    def munmap(self, pid, addr, length):
        """Unmap [addr, addr+length): clear the entries by stores, free the
        frames, then INVLPG each page that was present (or flush all)."""
        proc = self._proc(pid)
        start, end = self._check_range(addr, length)
        self.switch_to(pid)
        inside = self._split(proc, start, end)
        proc.vmas = [v for v in proc.vmas if v not in inside]
        flush = []
        for va, epa, e in self._leaves(proc.cr3, start, end):
            self._write(epa, 0)
            frame = e & ADDR
            if frame != self.zero_frame:
                self._put(frame)
            if e & P:
                flush.append(va)
        self._flush_pages(flush)
        self.stats["munmap"] += 1

    def mprotect(self, pid, addr, length, prot):
        """Change the rights of [addr, addr+length) (every page must be
        mapped); changed present entries are invalidated as munmap does."""
        proc = self._proc(pid)
        start, end = self._check_range(addr, length)
        prot = _check_prot(prot)
        covered = start
        for v in proc.vmas:
            if v.end <= covered or v.start >= end:
                continue
            if v.start > covered:
                break
            covered = v.end
        if covered < end:
            raise InvalidInput("mprotect: %#x-%#x is not wholly mapped" % (start, end))
        self.switch_to(pid)
        for v in self._split(proc, start, end):
            v.prot = prot
        flush = []
        for va, epa, e in self._leaves(proc.cr3, start, end):
            new = self._protect_pte(e, prot)
            if new != e:
                self._write(epa, new)
                if e & P:
                    flush.append(va)
        self._flush_pages(flush)
        self.stats["mprotect"] += 1

    @staticmethod
    def _protect_pte(e, prot):
        if not prot:
            return ((e & ~P & _U64) | PTE_PROTNONE) if e & P else e
        if not e & P:
            e = (e & ~PTE_PROTNONE & _U64) | P
        e &= ~(W | NX) & _U64
        if "w" in prot and not e & PTE_COW:
            e |= W
        if "x" not in prot:
            e |= NX
        return e

    # ======================================================================
    # The #PF handler
    # ======================================================================
    def handle_fault(self, pid, va, error_code):
        """The kernel's #PF handler for a user-mode fault of pid at va.

        Returns what it did: "zero_page", "demand_zero", "cow_copy",
        "cow_reuse" or "spurious"; raises SegmentationFault otherwise.
        """
        proc = self._proc(pid)
        if self.fault_log is not None:
            self.fault_log.append((pid, va, error_code))
        self.stats["page_fault"] += 1
        kind = self._fault(proc, va, error_code)
        self.stats["pf_" + kind] += 1
        return kind

    def _segv(self, proc, va, ec):
        self.stats["segv"] += 1
        raise SegmentationFault(proc.pid, PageFault(va, ec))

    def _fault(self, proc, va, ec):
        if ec & bits.PF_RSVD:
            raise GuestKernelError("pid %d: reserved bit set in a page-table entry for %#x "
                                   "(error code %#x)" % (proc.pid, va, ec))
        if not ec & bits.PF_U:
            raise GuestKernelError("kernel oops: supervisor #PF at %#x (error code %#x)"
                                   % (va, ec))
        write, fetch = ec & bits.PF_W, ec & bits.PF_I
        vma = self._find_vma(proc, va) if va < USER_TOP else None
        if (vma is None or (write and "w" not in vma.prot)
                or (fetch and "x" not in vma.prot) or not vma.prot):
            self._segv(proc, va, ec)
        page = va & ~(PAGE - 1)
        epa = self._pte_addr(proc.cr3, page, create=True)
        e = self._read(epa)
        if not e & P:
            if e & PTE_PROTNONE:
                self._segv(proc, va, ec)     # the vma says otherwise: cannot happen
            if write or not self.zero_page:
                frame = self._alloc_frame()
                self._write(epa, frame | _leaf_flags(vma.prot))
                return "demand_zero"
            self._write(epa, self.zero_frame | PTE_COW | (_leaf_flags(vma.prot) & ~W))
            return "zero_page"
        if write and not e & W:
            if not e & PTE_COW:
                self._segv(proc, va, ec)
            frame = e & ADDR
            if frame != self.zero_frame and self.refcount[frame // PAGE] == 1:
                # wp_page_reuse: no INVLPG; the #PF invalidated the stale
                # read-only translation (SDM 4.10.4.1).
                self._write(epa, (e | W) & ~PTE_COW & _U64)
                return "cow_reuse"
            new = self._alloc_frame()
            if frame != self.zero_frame:
                self._copy_page(new, frame)
                self._put(frame)
            # wp_page_copy: the new entry is dirty, not young (A clear).
            flags = e & ~(ADDR | A | PTE_COW) & _U64
            self._write(epa, new | flags | W | D)
            self._invlpg(page)           # the frame changed: ptep_clear_flush
            return "cow_copy"
        # The entry allows the access: a stale translation faulted.
        if (not write or e & W) and (not fetch or not e & NX) and e & U:
            return "spurious"
        self._segv(proc, va, ec)

    # ======================================================================
    # Running user code
    # ======================================================================
    def _enter_user(self, pid):
        self.switch_to(pid)
        self._sync()

    def run(self, pid, trace, start=0):
        """Run trace[start:] (TRACE_DTYPE, user accesses) as pid; every true
        fault goes to the #PF handler and the access is retried.  Returns
        the number of faults handled; SegmentationFault stops the run."""
        self._proc(pid)                 # an unknown pid is refused here
        trace = check_array(trace, TRACE_DTYPE, "trace")
        n = len(trace)
        self._enter_user(pid)
        run = self.vcpu.run
        handled = 0
        last = (-1, 0)
        repeats = 0
        while start < n:
            r = run(trace, start)
            self.stats["user_accesses"] += r.index - start
            if r.index >= n:
                break
            start = r.index
            if r.vector != 14:
                self.stats["segv"] += 1
                raise SegmentationFault(pid, r.fault, start)
            key = (start, r.error_code)
            repeats = repeats + 1 if key == last else 0
            last = key
            if repeats >= 3:
                raise GuestKernelError("pid %d: the fault at trace index %d (%#x, error code "
                                       "%#x) does not go away" % (pid, start, r.cr2,
                                                                  r.error_code))
            try:
                self.handle_fault(pid, r.cr2, r.error_code)
            except SegmentationFault as exc:
                exc.index = start
                exc.fault = r.fault
                raise
            self._sync()
            handled += 1
        return handled

    def _user_access(self, pid, va, fn):
        proc = self._proc(pid)
        va = check_u64(va, "virtual address")
        if va & 7:
            raise InvalidInput("load/store need an 8-byte aligned address, not %#x" % va)
        self._enter_user(pid)
        cpu = self.vcpu.cpu
        for _ in range(4):
            cpu.cpl = 3
            try:
                return fn(va)
            except PageFault as f:
                cpu.cpl = 0
                self.handle_fault(proc.pid, f.cr2, f.error_code)
                self._sync()
            except GeneralProtection as g:
                cpu.cpl = 0
                self.stats["segv"] += 1
                raise SegmentationFault(pid, g) from None
            finally:
                cpu.cpl = 0
        raise GuestKernelError("pid %d: the fault at %#x does not go away" % (pid, va))

    def load(self, pid, va):
        """A user-mode 8-byte load by pid (faults handled as for run)."""
        self.stats["user_accesses"] += 1
        return self._user_access(pid, va, self.vcpu.load_u64)

    def store(self, pid, va, value):
        """A user-mode 8-byte store by pid."""
        value = check_u64(value, "value")
        self.stats["user_accesses"] += 1
        vcpu = self.vcpu
        self._user_access(pid, va, lambda v: vcpu.store_u64(v, value))

    # ======================================================================
    # Inspection (no side effects on the guest)
    # ======================================================================
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
