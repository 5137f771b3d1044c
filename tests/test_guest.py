"""The guest kernel model (ptemu.guest.Kernel) on the native reference machine.

Everything here runs on NativeMachine: the guest's own tables are the ones
the MMU walks, with Tlb.default() between, so a missing INVLPG or CR3 flush
in the kernel shows up as a stale translation (SDM 4.10.4: a translation
stays usable until invalidated).  Expectations come from the SDM:

* #PF error code (SDM 4.7): P (bit 0) 0 = not present, 1 = protection;
  W/R (bit 1) write; U/S (bit 2) user mode; I/D (bit 4) instruction fetch
  (EFER.NXE = 1 here).  CR2 = the faulting linear address.
* A and D (SDM 4.8): A set in every entry a successful walk used, D in the
  leaf on a write; a fault sets neither.
* Invalidation (SDM 4.10.4.1): MOV CR3 drops non-global translations,
  INVLPG drops one page, a #PF drops the faulting page's translations.

and from the kernel's documented policy (Linux's): a read fault on anonymous
memory maps the shared zero page read-only + COW, a write fault a fresh
zeroed frame; fork makes private pages read-only + COW in both processes.
"""
import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PageFault, InvalidInput, TRACE_DTYPE
from ptemu.guest import (NativeMachine, Kernel, SegmentationFault, GuestKernelError,
                         DIRECT_MAP, PTE_COW, PTE_PROTNONE)
from ptemu.workloads import (synth_trace, ContextSwitchWorkload, ForkWorkload, read_trace,
                             write_trace)

P, W, U, A, D, PS, NX = (ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D,
                         ptemu.PTE_PS, ptemu.PTE_NX)
PF_P, PF_W, PF_U, PF_I = ptemu.PF_P, ptemu.PF_W, ptemu.PF_U, ptemu.PF_I
ADDR = 0x000FFFFFFFFFF000
PAGE = 4096
HEAP = 0x10000000           # DEFAULT_LAYOUT: heap, 256 pages rw-
TEXT = 0x400000             # DEFAULT_LAYOUT: text, 16 pages r-x
MEM = 8 << 20


def boot(mem=MEM, **kw):
    m = NativeMachine(mem)
    return m, Kernel(m, record_faults=True, **kw)


def mappings(machine, cr3):
    """{va: Mapping} of the tables at cr3, read from guest memory by ptemu's own
    enumeration (no kernel code involved)."""
    la57 = bool(machine.vcpu.cpu.cr4 & ptemu.CR4_LA57)      # the guest's paging depth
    mmu = Mmu(machine.phys, CpuState.long_mode(cr3=cr3, la57=la57))
    return {m.va: m for m in mmu.mappings()}


def user_maps(machine, cr3):
    return {va: m for va, m in mappings(machine, cr3).items() if va < 1 << 63}


def trace(*recs):
    t = np.zeros(len(recs), dtype=TRACE_DTYPE)
    for i, (acc, va) in enumerate(recs):
        t[i] = (va, {"r": 0, "w": 1, "x": 2}[acc], True)
    return t


# ---------------------------------------------------------------------------
# The native machine itself
# ---------------------------------------------------------------------------
class TestNativeMachine:
    def test_new_vcpu_state(self):
        # machine contract: a new vCPU has CR0.PG|PE|WP, CR4.PAE, EFER.LME|LMA|NXE, CPL 0
        m = NativeMachine(1 << 20)
        cpu = m.vcpu.cpu
        assert cpu.cr0 & (ptemu.CR0_PG | ptemu.CR0_PE | ptemu.CR0_WP) == \
            ptemu.CR0_PG | ptemu.CR0_PE | ptemu.CR0_WP
        assert cpu.cr4 & ptemu.CR4_PAE
        assert cpu.efer & (ptemu.EFER_LME | ptemu.EFER_LMA | ptemu.EFER_NXE) == \
            ptemu.EFER_LME | ptemu.EFER_LMA | ptemu.EFER_NXE
        assert cpu.cpl == 0
        assert m.paging == "native" and m.phys.size == m.memory_bytes == 1 << 20

    def test_bad_size(self):
        with pytest.raises(InvalidInput):
            NativeMachine(4095)
        with pytest.raises(InvalidInput):
            NativeMachine(0)

    def _machine_with_page(self, flags):
        m = NativeMachine(1 << 20)
        from ptemu.pagetable import PageTableBuilder
        b = PageTableBuilder(m.phys, table_start=0x1000, table_end=0x10000)
        b.map(0x7000, 0x20000, flags=flags)
        m.vcpu.write_cr3(b.cr3)
        return m, b

    def test_load_store_and_true_fault(self):
        m, b = self._machine_with_page(P | W | U)
        m.vcpu.store_u64(0x7008, 0x1122334455667788)
        assert m.phys.read_u64(0x20008) == 0x1122334455667788
        assert m.vcpu.load_u64(0x7008) == 0x1122334455667788
        # SDM 4.7: not-present write in supervisor mode: W only; CR2 = va
        with pytest.raises(PageFault) as ei:
            m.vcpu.store_u64(0x9000, 1)
        assert ei.value.error_code == PF_W and ei.value.cr2 == 0x9000
        with pytest.raises(InvalidInput):
            m.vcpu.load_u64(0x7004)          # misaligned
        with pytest.raises(InvalidInput):
            m.vcpu.store_u64(0x7008, -1)

    def test_user_mode_comes_from_cpl(self):
        # SDM 4.6: a user-mode (CPL 3) access to a supervisor page is a
        # protection fault: P|U (read)
        m, b = self._machine_with_page(P | W)
        m.vcpu.cpu.cpl = 3
        with pytest.raises(PageFault) as ei:
            m.vcpu.load_u64(0x7000)
        assert ei.value.error_code == PF_P | PF_U

    def test_run_stops_at_first_true_fault(self):
        m, b = self._machine_with_page(P | U)          # read-only user page
        t = trace(("r", 0x7000), ("r", 0x7ff8), ("w", 0x7010), ("r", 0x7000))
        r = m.vcpu.run(t)
        # SDM 4.6/4.7: user write to a read-only page: P|W|U, CR2 = va
        assert (r.index, r.vector, r.error_code, r.cr2) == (2, 14, PF_P | PF_W | PF_U, 0x7010)
        assert isinstance(r.fault, PageFault)
        r = m.vcpu.run(t, 3)
        assert r.index == 4 and r.fault is None
        bad = t.copy()
        bad["access"][1] = 7
        with pytest.raises(InvalidInput):
            m.vcpu.run(bad)

    def test_invlpg_and_cr3_flush_the_tlb(self):
        # SDM 4.10.4: a cached translation survives a change of the entry until
        # INVLPG (or MOV CR3) drops it.
        m, b = self._machine_with_page(P | W | U)
        assert m.vcpu.access(0x7000) == 0x20000
        b.map(0x7000, 0x30000, flags=P | W | U)     # behind the TLB's back
        assert m.vcpu.access(0x7000) == 0x20000       # stale, as the SDM allows
        m.vcpu.invlpg(0x7000)
        assert m.vcpu.access(0x7000) == 0x30000
        b.map(0x7000, 0x40000, flags=P | W | U)
        m.vcpu.write_cr3(b.cr3)
        assert m.vcpu.access(0x7000) == 0x40000
        assert m.stats["invlpg"] == 1 and m.stats["cr3_write"] == 2

    def test_hypercalls_performed_directly(self):
        m, b = self._machine_with_page(P | W | U)
        epa = b.entry_pa(0x7000, 1)
        assert m.vcpu.access(0x7000) == 0x20000
        assert m.vcpu.hypercall("mmu_update", [(epa, 0x50000 | P | W | U)]) == 1
        assert m.phys.read_u64(epa) == 0x50000 | P | W | U
        assert m.vcpu.access(0x7000) == 0x20000        # not yet invalidated
        m.vcpu.hypercall("invlpg", 0x7000)
        assert m.vcpu.access(0x7000) == 0x50000
        m.vcpu.hypercall("mmu_update", [(epa, 0x60000 | P | W | U)])
        m.vcpu.hypercall("flush_tlb")
        assert m.vcpu.access(0x7000) == 0x60000
        m.vcpu.hypercall("new_baseptr", b.cr3)
        assert m.vcpu.cpu.cr3 == b.cr3
        assert m.stats["hypercall"] == 5 and m.stats["mmu_update_entries"] == 2

    def test_hypercall_errors(self):
        m = NativeMachine(1 << 20)
        with pytest.raises(InvalidInput):
            m.vcpu.hypercall("reboot")
        with pytest.raises(InvalidInput):
            m.vcpu.hypercall("mmu_update", [(0x1000, 5), (1 << 20, 0)])   # 2nd outside
        assert m.phys.read_u64(0x1000) == 0                  # nothing applied
        with pytest.raises(InvalidInput):
            m.vcpu.hypercall("mmu_update", [(0x1004, 5)])    # misaligned entry
        with pytest.raises(InvalidInput):
            m.vcpu.hypercall("mmu_update", [5])
        with pytest.raises(InvalidInput):
            m.vcpu.hypercall("invlpg")


# ---------------------------------------------------------------------------
# Boot: the direct map lives in guest memory
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [4, 5])
@pytest.mark.parametrize("dm", [1 << 21, PAGE])
def test_direct_map_in_guest_memory(dm, levels):
    size = (3 << 20) + 16 * PAGE              # not a multiple of 2 MiB: the tail is 4 KiB
    m, k = boot(size, direct_map_page_size=dm, levels=levels)
    maps = mappings(m, m.vcpu.cpu.cr3)
    assert m.vcpu.cpu.cr3 == k.kernel_top
    covered = 0
    for va, mp in maps.items():
        assert va >= DIRECT_MAP                 # the idle address space has no user half
        assert mp.pa == va - DIRECT_MAP         # direct map: va = DIRECT_MAP + gpa
        assert not mp.user and mp.writable and not mp.executable
        covered += mp.page_size
    assert covered == size
    sizes = {mp.page_size for mp in maps.values()}
    assert sizes == ({1 << 21, PAGE} if dm == 1 << 21 else {PAGE})
    # kernel data access goes through it: a supervisor load of the zero page
    assert m.vcpu.load_u64(DIRECT_MAP + k.zero_frame) == 0


def test_kernel_half_shared_by_every_process():
    m, k = boot()
    a, b = k.spawn(), k.spawn()
    k.store(a, HEAP, 1)
    # Same entries (so the same PDPT below), up to A: the processor sets A in
    # whichever copy a walk used (SDM 4.8).
    half = lambda top: np.frombuffer(m.phys.read(top + 256 * 8, 256 * 8), "<u8") & ~np.uint64(A)
    ref = half(k.kernel_top)
    assert np.count_nonzero(ref) == 1            # PML4 slot 273: the direct map
    for pid in (a, b):
        assert (half(k.procs[pid].cr3) == ref).all()


# ---------------------------------------------------------------------------
# Demand paging
# ---------------------------------------------------------------------------
def test_demand_paging_faults_and_tables():
    m, k = boot()
    pid = k.spawn()
    t = trace(("r", HEAP), ("w", HEAP + 8), ("w", HEAP + PAGE), ("x", TEXT))
    assert k.run(pid, t) == 4
    # SDM 4.7: read of a not-present page U; the write that follows finds the
    # zero page read-only: P|W|U; write of a not-present page W|U; fetch of a
    # not-present page I|U (NXE=1).
    assert k.fault_log == [(pid, HEAP, PF_U), (pid, HEAP + 8, PF_P | PF_W | PF_U),
                           (pid, HEAP + PAGE, PF_W | PF_U), (pid, TEXT, PF_I | PF_U)]
    maps = user_maps(m, k.procs[pid].cr3)
    assert sorted(maps) == [TEXT, HEAP, HEAP + PAGE]
    # SDM 4.8: A and D set by the successful accesses; the fetch sets no D.
    for va in (HEAP, HEAP + PAGE):
        assert maps[va].flags & (P | W | U | A | D | NX) == P | W | U | A | D | NX
    assert maps[TEXT].flags & (P | W | U | A | D | NX) == P | U | A
    assert maps[TEXT].pa == k.zero_frame and maps[TEXT].flags & PTE_COW
    assert maps[HEAP].pa != k.zero_frame != maps[HEAP + PAGE].pa


def test_demand_zero_fill_of_a_reused_frame():
    # The allocator is LIFO (documented policy), so b's first data frame is
    # the frame a wrote; demand paging must hand it over zero-filled.
    m, k = boot()
    a = k.spawn()
    for off in (0, 8, 2048, 4088):
        k.store(a, HEAP + off, 0xdeadbeef)
    frame = user_maps(m, k.procs[a].cr3)[HEAP].pa
    assert m.phys.read_u64(frame + 2048) == 0xdeadbeef
    k.exit(a)
    k.wait(a)
    b = k.spawn()
    k.store(b, HEAP + 2 * PAGE, 1)            # write fault: a fresh (reused) frame
    assert user_maps(m, k.procs[b].cr3)[HEAP + 2 * PAGE].pa == frame
    assert [k.load(b, HEAP + 2 * PAGE + off) for off in (0, 8, 2048, 4088)] == [1, 0, 0, 0]


def test_zero_page_read_then_write():
    m, k = boot()
    pid = k.spawn()
    assert k.load(pid, HEAP + 64) == 0
    k.store(pid, HEAP + 64, 5)
    assert k.load(pid, HEAP + 64) == 5
    assert m.phys.read_u64(k.zero_frame + 64) == 0          # the zero page stays zero
    assert k.stats["pf_zero_page"] == 1 and k.stats["pf_cow_copy"] == 1


def test_segfaults():
    m, k = boot()
    pid = k.spawn()
    with pytest.raises(SegmentationFault) as ei:
        k.load(pid, 0x20000000)                      # no VMA: not present, read, user
    assert ei.value.error_code == PF_U and ei.value.va == 0x20000000
    with pytest.raises(SegmentationFault) as ei:
        k.store(pid, TEXT, 1)                        # r-x VMA: write refused
    assert ei.value.error_code == PF_W | PF_U
    k.store(pid, HEAP, 1)
    with pytest.raises(SegmentationFault) as ei:
        k.run(pid, trace(("r", HEAP), ("x", HEAP + 8)))
    # SDM 4.6: fetch from a present NX page: P|U|I
    assert ei.value.error_code == PF_P | PF_U | PF_I and ei.value.index == 1
    with pytest.raises(SegmentationFault) as ei:
        k.run(pid, trace(("r", 0x0000900000000000)))   # non-canonical: #GP, no CR2
    assert isinstance(ei.value.fault, ptemu.GeneralProtection)
    assert k.stats["segv"] == 4


# ---------------------------------------------------------------------------
# Context switches
# ---------------------------------------------------------------------------
def test_context_switch_keeps_processes_apart():
    m, k = boot()
    pids = [k.spawn() for _ in range(5)]           # more than any small root cache
    for i, pid in enumerate(pids):
        k.store(pid, HEAP + 8 * i, 1000 + i)
    for round_ in range(3):
        for i, pid in enumerate(pids):
            assert k.load(pid, HEAP + 8 * i) == 1000 + i
            assert m.vcpu.cpu.cr3 == k.procs[pid].cr3
            for j in range(5):
                if j != i:
                    assert k.load(pid, HEAP + 8 * j) == 0
    frames = [user_maps(m, k.procs[p].cr3)[HEAP].pa for p in pids]
    assert len(set(frames)) == 5


# ---------------------------------------------------------------------------
# fork and copy-on-write
# ---------------------------------------------------------------------------
def test_fork_gives_independent_copies():
    m, k = boot()
    parent = k.spawn()
    for i in range(4):
        k.store(parent, HEAP + i * PAGE, 100 + i)
    child = k.fork(parent)
    pm, cm = user_maps(m, k.procs[parent].cr3), user_maps(m, k.procs[child].cr3)
    for i in range(4):
        va = HEAP + i * PAGE
        assert pm[va].pa == cm[va].pa                     # shared frame
        assert not pm[va].writable and not cm[va].writable
        assert pm[va].flags & PTE_COW and cm[va].flags & PTE_COW
        assert pm[va].flags & A and not cm[va].flags & A   # child copy is "old"
    del k.fault_log[:]
    assert k.load(child, HEAP) == 100
    k.store(child, HEAP, 200)                 # COW break in the child
    k.store(parent, HEAP + PAGE, 301)         # COW break in the parent
    assert [k.load(parent, HEAP + i * PAGE) for i in range(4)] == [100, 301, 102, 103]
    assert [k.load(child, HEAP + i * PAGE) for i in range(4)] == [200, 101, 102, 103]
    # SDM 4.7: write to a present read-only user page: P|W|U, CR2 = the address
    cow = [f for f in k.fault_log if f[2] == PF_P | PF_W | PF_U]
    assert cow == [(child, HEAP, 7), (parent, HEAP + PAGE, 7)]
    assert k.stats["pf_cow_copy"] == 2
    pm, cm = user_maps(m, k.procs[parent].cr3), user_maps(m, k.procs[child].cr3)
    assert pm[HEAP].pa != cm[HEAP].pa and pm[HEAP + PAGE].pa != cm[HEAP + PAGE].pa
    assert pm[HEAP + 2 * PAGE].pa == cm[HEAP + 2 * PAGE].pa


def test_fork_flushes_the_parents_writable_translations():
    # The parent's TLB holds writable translations from before the fork; only
    # the kernel's flush makes its next write fault (SDM 4.10.4.1).
    m, k = boot()
    parent = k.spawn()
    k.store(parent, HEAP, 1)
    k.store(parent, HEAP, 2)                  # TLB now caches HEAP writable+dirty
    child = k.fork(parent)
    assert k.current == parent
    del k.fault_log[:]
    k.store(parent, HEAP, 3)
    assert k.fault_log == [(parent, HEAP, PF_P | PF_W | PF_U)]
    assert k.load(child, HEAP) == 2


def test_cow_reuse_after_child_exit():
    m, k = boot()
    parent = k.spawn()
    k.store(parent, HEAP, 1)
    child = k.fork(parent)
    frame = user_maps(m, k.procs[parent].cr3)[HEAP].pa
    k.exit(child)
    assert k.wait(child) == 0
    k.store(parent, HEAP, 2)                  # still read-only + COW: faults, reuses
    assert k.stats["pf_cow_reuse"] == 1 and k.stats["pf_cow_copy"] == 0
    mp = user_maps(m, k.procs[parent].cr3)[HEAP]
    assert mp.pa == frame and mp.writable and not mp.flags & PTE_COW


def test_fork_chain_values():
    m, k = boot()
    a = k.spawn()
    k.store(a, HEAP, 1)
    b = k.fork(a)
    k.store(b, HEAP, 2)
    c = k.fork(b)
    k.store(c, HEAP, 3)
    d = k.fork(a)
    assert [k.load(p, HEAP) for p in (a, b, c, d)] == [1, 2, 3, 1]
    k.exit(b)
    k.wait(b)
    assert k.load(c, HEAP) == 3 and k.procs[c].parent == 0


# ---------------------------------------------------------------------------
# munmap, mprotect, exec, exit
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("npages", [4, 40])      # below / above the 33-page ceiling
def test_munmapped_pages_fault(npages):
    m, k = boot()
    pid = k.spawn()
    base = k.mmap(pid, 64 * PAGE)
    for i in range(npages + 1):
        k.store(pid, base + i * PAGE, i + 1)
    for i in range(npages + 1):
        assert k.load(pid, base + i * PAGE) == i + 1      # every one now in the TLB
    inv0, fl0 = k.stats["invlpg"], k.stats["tlb_flush"]
    k.munmap(pid, base, npages * PAGE)
    if npages <= 33:
        assert k.stats["invlpg"] - inv0 == npages and k.stats["tlb_flush"] == fl0
    else:
        assert k.stats["tlb_flush"] - fl0 == 1 and k.stats["invlpg"] == inv0
    for i in range(npages):
        with pytest.raises(SegmentationFault) as ei:
            k.load(pid, base + i * PAGE)
        assert ei.value.error_code == PF_U                 # not present, read, user
    assert k.load(pid, base + npages * PAGE) == npages + 1
    assert all(va >= base + npages * PAGE or va < base
               for va in user_maps(m, k.procs[pid].cr3))


def test_munmap_frees_frames():
    m, k = boot()
    pid = k.spawn()
    base = k.mmap(pid, 8 * PAGE)
    k.store(pid, base, 1)                 # the page tables for the region now exist
    free0 = k.free_frames
    for i in range(1, 8):
        k.store(pid, base + i * PAGE, 1)
    assert k.free_frames == free0 - 7
    k.munmap(pid, base, 8 * PAGE)
    assert k.free_frames == free0 + 1     # the tables stay (as Linux, within a VMA gap)


def test_mprotect():
    m, k = boot()
    pid = k.spawn()
    k.store(pid, HEAP, 7)
    k.mprotect(pid, HEAP, PAGE, "r")
    assert k.load(pid, HEAP) == 7
    with pytest.raises(SegmentationFault) as ei:
        k.store(pid, HEAP, 8)                 # the TLB held it writable: INVLPG needed
    assert ei.value.error_code == PF_P | PF_W | PF_U
    k.mprotect(pid, HEAP, PAGE, "")           # PROT_NONE: P clear, frame kept
    with pytest.raises(SegmentationFault) as ei:
        k.load(pid, HEAP)
    assert ei.value.error_code == PF_U
    assert k.pte(pid, HEAP) & (P | PTE_PROTNONE) == PTE_PROTNONE
    k.mprotect(pid, HEAP, PAGE, "rw")
    k.store(pid, HEAP + 8, 9)
    assert (k.load(pid, HEAP), k.load(pid, HEAP + 8)) == (7, 9)
    k.mprotect(pid, HEAP, 2 * PAGE, "rwx")
    k.run(pid, trace(("x", HEAP)))            # now executable
    with pytest.raises(InvalidInput):
        k.mprotect(pid, 0x30000000, PAGE, "r")     # not mapped


def test_mprotect_keeps_cow():
    m, k = boot()
    p = k.spawn()
    k.store(p, HEAP, 1)
    c = k.fork(p)
    k.mprotect(c, HEAP, PAGE, "r")
    k.mprotect(c, HEAP, PAGE, "rw")           # must not make the shared frame writable
    assert not k.pte(c, HEAP) & W
    k.store(c, HEAP, 2)
    assert (k.load(p, HEAP), k.load(c, HEAP)) == (1, 2)


def test_exec_replaces_the_address_space():
    m, k = boot()
    pid = k.spawn()
    extra = k.mmap(pid, 4 * PAGE)
    k.store(pid, extra, 5)
    k.store(pid, HEAP, 6)
    old_cr3 = k.procs[pid].cr3
    free0 = k.free_frames
    k.exec(pid)
    assert k.procs[pid].cr3 != old_cr3
    assert m.vcpu.cpu.cr3 == k.procs[pid].cr3
    assert k.load(pid, HEAP) == 0
    with pytest.raises(SegmentationFault):
        k.load(pid, extra)
    assert user_maps(m, k.procs[pid].cr3).keys() == {HEAP}
    assert k.free_frames >= free0           # old data frames and tables came back


def test_exit_frees_frames():
    m, k = boot()
    free0 = k.free_frames
    p = k.spawn()
    for i in range(20):
        k.store(p, HEAP + i * PAGE, i)
    children = [k.fork(p) for _ in range(3)]
    for c in children:
        k.store(c, HEAP + 3 * PAGE, 99)
        k.load(c, HEAP + 200 * PAGE)
    assert k.free_frames < free0
    for c in children:
        k.exit(c, code=c)
    for c in children:
        assert k.wait(c) == c
    k.exit(p)
    k.wait(p)
    assert k.free_frames == free0
    assert int(k.refcount[1:].max()) <= 1 << 30       # only boot frames and the zero page
    assert m.vcpu.cpu.cr3 == k.kernel_top
    with pytest.raises(InvalidInput):
        k.load(p, HEAP)


def test_tables_change_only_by_guest_stores():
    """Between two snapshots of every page-table frame, each changed word was
    written by a vcpu.store_u64 through the direct map, except A/D bits the
    hardware sets on walks (SDM 4.8)."""
    m, k = boot()
    stored = {}
    real = m.vcpu.store_u64

    real_stream = m.vcpu.store_stream

    def spy(va, value):
        stored[va - DIRECT_MAP] = value
        return real(va, value)

    def spy_stream(stores):             # the kernel's page-table stores in bulk
        for va, value in stores.tolist():
            stored[va - DIRECT_MAP] = value
        return real_stream(stores)
    m.vcpu.store_u64 = spy
    m.vcpu.store_stream = spy_stream
    p = k.spawn()
    for i in range(20):
        k.store(p, HEAP + i * PAGE, 1)
    before = {g: np.frombuffer(b, "<u8").copy() for g, b in k.snapshot_tables().items()}
    stored.clear()
    c = k.fork(p)
    k.store(c, HEAP, 2)
    k.store(p, HEAP + PAGE, 3)
    k.munmap(p, HEAP + PAGE, PAGE)
    after = k.snapshot_tables()
    n_changed = 0
    for gpa, raw in after.items():
        new = np.frombuffer(raw, "<u8")
        old = before.get(gpa, np.zeros(512, "<u8"))
        for i in np.flatnonzero(new != old).tolist():
            n_changed += 1
            epa = gpa + 8 * i
            if epa in stored:
                assert (stored[epa] ^ int(new[i])) & ~(A | D) == 0
            else:
                assert (int(new[i]) ^ int(old[i])) & ~(A | D) == 0, hex(epa)
    assert n_changed > 40 and len(stored) > 40


def test_paravirt_kernel_uses_hypercalls_only():
    m, k = boot(paravirt=True)
    stores = []
    real = m.vcpu.store_u64
    m.vcpu.store_u64 = lambda va, v: (stores.append(va), real(va, v))
    p = k.spawn()
    k.store(p, HEAP, 1)
    c = k.fork(p)
    k.store(c, HEAP, 2)
    k.munmap(p, HEAP, PAGE)
    assert (k.load(c, HEAP), k.load(p, HEAP + PAGE)) == (2, 0)
    assert all(va < 1 << 47 for va in stores)          # user stores only
    assert m.stats["hypercall_mmu_update"] > 0 and m.stats["hypercall_new_baseptr"] > 0
    assert m.stats["hypercall_flush_tlb"] >= 1 and m.stats["hypercall_invlpg"] >= 1
    assert m.stats["cr3_write"] == 0 and m.stats["invlpg"] == 0
    # no store went through the direct map: its leaves were never written (SDM 4.8)
    for va, mp in mappings(m, k.kernel_top).items():
        assert not mp.flags & D


def test_store_kernel_dirties_the_direct_map():
    m, k = boot()
    p = k.spawn()
    k.store(p, HEAP, 1)
    top = k.procs[p].cr3
    mp = mappings(m, k.kernel_top)[DIRECT_MAP + (top & ~((1 << 21) - 1))]
    assert mp.page_size == 1 << 21 and mp.flags & (A | D) == A | D


def test_out_of_memory_is_a_clear_error():
    m, k = boot(64 * PAGE * 4)
    p = k.spawn()
    base = k.mmap(p, 512 * PAGE)
    with pytest.raises(GuestKernelError):
        for i in range(512):
            k.store(p, base + i * PAGE, 1)


# ---------------------------------------------------------------------------
# Workloads and traces
# ---------------------------------------------------------------------------
def test_synth_trace_shape():
    rng = np.random.default_rng(1)
    code = np.arange(4, dtype=np.uint64) * PAGE + TEXT
    data = np.arange(32, dtype=np.uint64) * PAGE + HEAP
    t = synth_trace(rng, 20000, code, data, data[:4], fetch_frac=0.25, write_frac=0.3)
    assert t.dtype == TRACE_DTYPE and len(t) == 20000 and t["user"].all()
    page = t["va"] & ~np.uint64(PAGE - 1)
    fetch = t["access"] == 2
    assert np.isin(page[fetch], code).all() and np.isin(page[~fetch], data).all()
    assert 0.15 < fetch.mean() < 0.35
    assert 0.2 < (t["access"][~fetch] == 1).mean() < 0.4
    assert (t["va"] % 8 == 0).all()
    assert 0.8 < np.isin(page[~fetch], data[:4]).mean()
    assert (synth_trace(np.random.default_rng(1), 20000, code, data, data[:4]) == t).all()


def test_context_switch_workload_small():
    w = ContextSwitchWorkload(total=40_000, nproc=4, slice_len=2_000, heap_pages=32,
                              stack_pages=8, text_pages=8, hot_pages=8, seed=3)
    m, k = boot()
    r = w.run(k)
    assert r.accesses == 40_000 == k.stats["user_accesses"]
    assert k.stats["context_switch"] >= 20
    assert r.faults == k.stats["page_fault"] > 0 and k.stats["segv"] == 0
    # rerun on a fresh machine: the same faults, the same memory
    w2 = ContextSwitchWorkload(total=40_000, nproc=4, slice_len=2_000, heap_pages=32,
                               stack_pages=8, text_pages=8, hot_pages=8, seed=3)
    m2, k2 = boot()
    w2.run(k2)
    assert k2.fault_log == k.fault_log
    assert (m2.phys.array == m.phys.array).all()


def test_fork_workload_small():
    w = ForkWorkload(total=60_000, heap_pages=32, child_accesses=3_000, parent_accesses=1_000,
                     child_touch=8, seed=5)
    m, k = boot()
    free0 = k.free_frames
    r = w.run(k)
    assert r.accesses >= 60_000
    assert k.stats["fork"] == len(w.rounds) and k.stats["exit"] == len(w.rounds)
    assert k.stats["pf_cow_copy"] > 0 and k.stats["pf_cow_reuse"] > 0
    assert k.stats["exec"] > 0 and k.stats["munmap"] > 0
    assert list(k.procs) == [0, w.parent]
    k.exit(w.parent)
    k.wait(w.parent)
    assert k.free_frames == free0


def test_read_trace_text(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("# comment\nr 0x1000\nw 2008 s\nx 0x400000 u\n\n"
                 "I  04222cac,3\n L 04222cb0,8\n S 7ff000,8\n M 7ff008,4\n0x5000\n")
    t = read_trace(p)
    assert t["va"].tolist() == [0x1000, 0x2008, 0x400000, 0x4222cac, 0x4222cb0, 0x7ff000,
                                0x7ff008, 0x7ff008, 0x5000]
    assert t["access"].tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 0]
    assert t["user"].tolist() == [True, False, True, True, True, True, True, True, True]
    bad = tmp_path / "bad.txt"
    bad.write_text("r 0x1000\nq 0x2000\n")
    with pytest.raises(InvalidInput, match="bad.txt:2"):
        read_trace(bad)
    bad.write_text("r zz\n")
    with pytest.raises(InvalidInput):
        read_trace(bad)


def test_read_trace_npz_roundtrip(tmp_path):
    t = trace(("r", 0x1000), ("w", 0x2000), ("x", 0x3000))
    write_trace(tmp_path / "a.npz", t)
    assert (read_trace(tmp_path / "a.npz") == t).all()
    np.savez(tmp_path / "b.npz", va=np.array([1, 2], np.uint64),
             access=np.array([b"w", b"x"]))
    b = read_trace(tmp_path / "b.npz", user=False)
    assert b["access"].tolist() == [1, 2] and not b["user"].any()
    np.savez(tmp_path / "c.npz", va=np.array([1, 2], np.uint64), access=np.array([0, 5]))
    with pytest.raises(InvalidInput):
        read_trace(tmp_path / "c.npz")
    with pytest.raises(InvalidInput):
        read_trace(tmp_path / "missing.npz")
    np.save(tmp_path / "d.npy", np.array([7, 8], np.uint64))
    assert read_trace(tmp_path / "d.npy")["va"].tolist() == [7, 8]


def test_kernel_picks_hypercalls_on_a_paravirt_machine():
    m = NativeMachine(MEM)
    m.paging = "paravirt"            # what a paravirtual VM says it is
    k = Kernel(m)
    assert k.paravirt
    assert m.stats["hypercall_new_baseptr"] == 1 and m.stats["cr3_write"] == 0
    assert not Kernel(NativeMachine(MEM)).paravirt


def test_kernel_argument_errors():
    m, k = boot()
    pid = k.spawn()
    with pytest.raises(InvalidInput):
        Kernel(NativeMachine(MEM), direct_map_page_size=1 << 30)
    with pytest.raises(InvalidInput):
        k.mmap(pid, PAGE, prot="rwz")
    with pytest.raises(InvalidInput):
        k.mmap(pid, PAGE, addr=HEAP)               # overlaps the heap
    with pytest.raises(InvalidInput):
        k.munmap(pid, HEAP + 1, PAGE)              # unaligned
    with pytest.raises(InvalidInput):
        k.load(pid, HEAP + 4)                      # not 8-byte aligned
    with pytest.raises(InvalidInput):
        k.fork(99)
    with pytest.raises(InvalidInput):
        k.wait(pid)                                # still running
    with pytest.raises(InvalidInput):
        k.spawn([(0x7fffffffe000, 4 * PAGE, "rw")])  # leaves the user half
    with pytest.raises(InvalidInput):
        k.run(pid, np.zeros(3, dtype=np.uint64))


def test_four_k_direct_map_kernel_works():
    m, k = boot(direct_map_page_size=PAGE)
    p = k.spawn()
    k.store(p, HEAP, 11)
    c = k.fork(p)
    k.store(c, HEAP, 12)
    assert (k.load(p, HEAP), k.load(c, HEAP)) == (11, 12)
    # the table stores went through 4 KiB direct-map leaves, which got D (SDM 4.8)
    top = k.procs[c].cr3
    mp = mappings(m, k.kernel_top)[DIRECT_MAP + top]
    assert mp.page_size == PAGE and mp.flags & (A | D) == A | D


# ---------------------------------------------------------------------------
# 5-level paging (Kernel(levels=5): CR4.LA57, a PML5 top table; SDM 4.5)
# ---------------------------------------------------------------------------
#: A user address only 5-level paging reaches: bits 56:48 (the PML5 index)
#: = 0xf0 = 240, every lower index 0.  Non-canonical with 48-bit addresses.
HIGH = 0x00f0000000000000


def _five_level_machine(mode, ept_levels=4):
    if mode == "native":
        return NativeMachine(MEM)
    hv = ptemu.Hypervisor(64 << 20)
    if mode == "nested":
        return hv.create_vm(MEM, paging="nested", ept_levels=ept_levels)
    return hv.create_vm(MEM, paging="shadow" if mode == "unsync" else mode,
                        unsync=mode == "unsync")


def test_5level_boot_puts_the_direct_map_under_pml5_slot_511():
    """SDM 4.5: with CR4.LA57 the top table is a PML5 indexed by bits 56:48.
    DIRECT_MAP = 0xffff888000000000 has bits 56:48 = 0x1ff (511) and bits
    47:39 = 0x111 (273): the PML5's one kernel entry is slot 511, which
    points at a PML4 whose slot 273 holds the PDPT the 4-level kernel puts
    straight in its top table."""
    m4, k4 = boot(levels=4)
    m5, k5 = boot(levels=5)
    assert not m4.vcpu.cpu.cr4 & ptemu.CR4_LA57 and m5.vcpu.cpu.cr4 & ptemu.CR4_LA57
    assert m4.vcpu.cpu.levels == 4 and m5.vcpu.cpu.levels == 5
    top4 = np.frombuffer(m4.phys.read(k4.kernel_top, PAGE), "<u8")
    top5 = np.frombuffer(m5.phys.read(k5.kernel_top, PAGE), "<u8")
    assert np.flatnonzero(top4).tolist() == [273]
    assert np.flatnonzero(top5).tolist() == [511]
    assert int(top5[511]) & 0xFFF & ~A == P | W           # a kernel table entry
    pml4 = np.frombuffer(m5.phys.read(int(top5[511]) & ADDR, PAGE), "<u8")
    assert np.flatnonzero(pml4).tolist() == [273]
    # Below the PML4 the two kernels built the same PDPT (same contents).
    pdpt4 = m4.phys.read(int(top4[273]) & ADDR, PAGE)
    pdpt5 = m5.phys.read(int(pml4[273]) & ADDR, PAGE)
    strip = lambda b: (np.frombuffer(b, "<u8") & ~np.uint64(A | ADDR)).tolist()
    assert strip(pdpt4) == strip(pdpt5)
    # One more table at boot: the PML4 under the PML5.
    assert k5.boot_frames == k4.boot_frames + 1
    # A cold supervisor load through the 2 MiB direct map reads PML5E, PML4E,
    # PDPTE, PDE: 4 entries (3 with 4-level paging).
    for m, k, refs in ((m4, k4, 3), (m5, k5, 4)):
        m.vcpu.tlb.flush_all()
        w0 = m.vcpu.tlb.stats.walk_refs
        m.vcpu.load_u64(DIRECT_MAP + k.zero_frame)
        assert m.vcpu.tlb.stats.walk_refs - w0 == refs


@pytest.mark.parametrize("mode, ept_levels, refs", [
    ("native", 4, 5), ("shadow", 4, 5), ("unsync", 4, 5), ("paravirt", 4, 5),
    ("nested", 4, 29), ("nested", 5, 35)])
def test_5level_guest_uses_its_pml5_entry_on_every_machine(mode, ept_levels, refs):
    """A 5-level guest on each machine kind: a user page at HIGH (PML5 slot
    240) is mapped by the fault handler through a user PML5 entry, which the
    walk marks accessed (SDM 4.8: A in every paging-structure entry used).
    A cold TLB miss reads 5 entries on the native machine and on shadow
    tables (the shadow root is a 5-level page: SDM 4.5); nested, each of
    the 5 guest entries and the data address take an EPT walk:
    (5+1)(4+1)-1 = 29 references on a 4-level EPT, (5+1)(5+1)-1 = 35 on a
    5-level one."""
    m = _five_level_machine(mode, ept_levels)
    k = Kernel(m, levels=5)
    pid = k.spawn()
    assert k.mmap(pid, 2 * PAGE, "rw", addr=HIGH) == HIGH
    k.store(pid, HIGH + 8, 0xfeed)
    assert k.load(pid, HIGH + 8) == 0xfeed
    top = k.procs[pid].cr3
    pml5e = m.phys.read_u64(top + 8 * 240)
    assert pml5e & (P | W | U | A) == P | W | U | A
    pml4e = m.phys.read_u64((pml5e & ADDR) + 0)       # PML4 index 0 (bits 47:39 of HIGH)
    assert pml4e & (P | U | A) == P | U | A
    leaf = k.pte(pid, HIGH)
    assert leaf & (P | W | U | A | D) == P | W | U | A | D
    assert m.phys.read_u64((leaf & ADDR) + 8) == 0xfeed
    if mode != "native" and mode != "nested":
        sh = m.vcpu.shadow
        assert sh.levels == 5 and sh.root.level == 5 and sh.root.gfn == top >> 12
        assert m.vcpu.real_cpu.cr4 & ptemu.CR4_LA57
        assert 240 in sh.root.children                  # the shadow of the PML5 entry
    tlb = m.vcpu.tlb
    tlb.flush_all()
    w0, r0 = tlb.stats.walks, tlb.stats.walk_refs
    assert k.load(pid, HIGH + 8) == 0xfeed
    assert (tlb.stats.walks - w0, tlb.stats.walk_refs - r0) == (1, refs)
    # Past the 5-level user half (bit 56 set, not sign-extended): #GP, SIGSEGV.
    with pytest.raises(SegmentationFault) as exc:
        k.load(pid, 1 << 56)
    assert exc.value.error_code == 0


def test_5level_pml5_entry_is_the_one_the_walk_reads():
    """Clearing the user PML5 entry (and nothing else) makes the page at
    HIGH not present: #PF with P=0, U=1 (SDM 4.5, 4.7); restored, it maps
    the same frame again.  Read by a fresh MMU with no TLB (no cached
    translation can answer for it)."""
    m, k = boot(levels=5)
    pid = k.spawn()
    k.mmap(pid, PAGE, "rw", addr=HIGH)
    k.store(pid, HIGH, 1)
    top = k.procs[pid].cr3
    cpu = CpuState.long_mode(cr3=top, la57=True)
    cpu.cpl = 3
    mmu = Mmu(m.phys, cpu)
    frame = k.pte(pid, HIGH) & ADDR
    assert mmu.translate(HIGH).pa == frame
    e = m.phys.read_u64(top + 8 * 240)
    m.phys.write_u64(top + 8 * 240, 0)
    with pytest.raises(PageFault) as pf:
        Mmu(m.phys, cpu).translate(HIGH)
    assert pf.value.error_code == PF_U and pf.value.cr2 == HIGH
    m.phys.write_u64(top + 8 * 240, e)
    assert Mmu(m.phys, cpu).translate(HIGH).pa == frame
    # The same address is no user address for a 4-level kernel (it leaves
    # the 48-bit lower half), nor 1 << 56 for a 5-level one.
    m4, k4 = boot(levels=4)
    p4 = k4.spawn()
    with pytest.raises(InvalidInput, match="user half"):
        k4.mmap(p4, PAGE, "rw", addr=HIGH)
    with pytest.raises(InvalidInput, match="user half"):
        k.mmap(pid, PAGE, "rw", addr=1 << 56)


@pytest.mark.parametrize("levels", [3, 6, True, "5", None])
def test_kernel_levels_checked(levels):
    with pytest.raises(InvalidInput, match="levels must be 4 or 5"):
        Kernel(NativeMachine(MEM), levels=levels)
