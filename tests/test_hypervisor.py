"""The hypervisor and its VMs as the machine contract sees them: host frames,
lazy backing, isolation between VMs, guest-physical memory (DMA), the vCPU's
initial state, counters, exit logs, paravirtual hypercalls, clear errors.

Guest-visible expectations cite the Intel SDM Vol. 3A; the rest follows
/work/shared/API.md ("Hypervisor"), the machine contract and
docs/shadow-mmu.md.
"""
import pytest

import ptemu
from ptemu import bits
from ptemu.hypervisor import (Hypervisor, HostMemoryExhausted,
                              HypercallRejected, audit, COUNTERS, ExitRecord)

P, W, U, A, D, PS = (bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_A, bits.PTE_D, bits.PTE_PS)
PAGE = 4096


def tables(vm, maps, root=1):
    """Guest 4-level tables: PML4 at gfn root, PDPT root+1, PD root+2, one PT at
    root+3 for va < 2 MiB; maps: {virtual page: (gfn, flags)}."""
    ph = vm.phys
    r = root * PAGE
    ph.write_u64(r, (r + PAGE) | P | W | U)
    ph.write_u64(r + PAGE, (r + 2 * PAGE) | P | W | U)
    ph.write_u64(r + 2 * PAGE, (r + 3 * PAGE) | P | W | U)
    for vp, (gfn, flags) in maps.items():
        ph.write_u64(r + 3 * PAGE + 8 * vp, gfn * PAGE | flags)
    return r


def test_exported_from_ptemu():
    assert ptemu.Hypervisor is Hypervisor


@pytest.mark.parametrize("size", [0, 4095, 4097, -4096, "4096", 1 << 64])
def test_bad_host_size(size):
    with pytest.raises(ptemu.InvalidInput):
        Hypervisor(size)


@pytest.mark.parametrize("kw, msg", [
    (dict(guest_memory_bytes=0), "multiple of 4096"),
    (dict(guest_memory_bytes=1000), "multiple of 4096"),
    (dict(guest_memory_bytes=PAGE, paging="ept"), "paging must be"),
    (dict(guest_memory_bytes=PAGE, paging="nested", unsync=True), "shadow paging options"),
    (dict(guest_memory_bytes=PAGE, paging="nested", shadow_limit=16), "shadow paging options"),
    (dict(guest_memory_bytes=PAGE, paging="paravirt", unsync=True), "shadow paging only"),
    (dict(guest_memory_bytes=PAGE, shadow_limit=4), "shadow_limit"),
    (dict(guest_memory_bytes=PAGE, prev_roots=-1), "prev_roots"),
    (dict(guest_memory_bytes=PAGE, tlb="big"), "tlb"),
])
def test_create_vm_refuses_clearly(kw, msg):
    hv = Hypervisor(64 * PAGE)
    with pytest.raises(ptemu.InvalidInput, match=msg):
        hv.create_vm(**kw)


def test_machine_contract_attributes_and_initial_vcpu():
    """A new vCPU: CR0.PG|PE|WP, CR4.PAE, EFER.LME|LMA|NXE, CPL 0 (the contract)."""
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(16 * PAGE, unsync=True)
    assert (vm.paging, vm.unsync, vm.memory_bytes, vm.phys.size) == ("shadow", True,
                                                                    16 * PAGE, 16 * PAGE)
    cpu = vm.vcpu.cpu
    assert cpu.cr0 == bits.CR0_PG | bits.CR0_PE | bits.CR0_WP
    assert cpu.cr4 == bits.CR4_PAE
    assert cpu.efer == bits.EFER_LME | bits.EFER_LMA | bits.EFER_NXE
    assert cpu.cpl == 0
    assert set(COUNTERS) <= set(vm.stats)
    assert vm.stats.exits_by_reason() == {"page_fault": 0, "cr3_write": 0, "cr_write": 0,
                                          "invlpg": 0, "hypercall": 0}
    pv = hv.create_vm(16 * PAGE, paging="paravirt")
    assert (pv.paging, pv.unsync) == ("paravirt", False)


def test_a_frame_is_zero_when_handed_out_fresh_or_again():
    """alloc_frame gives zeroed frames: one given back dirty is zeroed when
    handed out again, and so is one never handed out that a caller wrote
    through the public host memory (no stale bytes reach a VM)."""
    hv = Hypervisor(8 * PAGE)
    hv.host.array[7 * PAGE:8 * PAGE] = 0x5A           # a frame no one owns, written
    taken = [hv.alloc_frame() for _ in range(8)]
    assert taken[-1] == 7 * PAGE and not hv.host.array[7 * PAGE:8 * PAGE].any()
    for f in taken:
        hv.free_frame(f)
    a = hv.alloc_frame()
    assert not hv.host.array[a:a + PAGE].any()
    hv.host.array[a:a + PAGE] = 0xAB
    hv.free_frame(a)
    assert hv.alloc_frame() == a                      # lowest free frame first
    assert not hv.host.array[a:a + PAGE].any()
    vm = hv.create_vm(4 * PAGE)
    vm.phys.write(0, b"\xcd" * PAGE)
    dirty = vm.gpa_to_hpa(0)
    hv.destroy_vm(vm)
    vm = hv.create_vm(4 * PAGE)
    vm.phys.write_u64(0, 1)
    assert vm.gpa_to_hpa(0) == dirty                  # the frame given back, zeroed
    assert vm.phys.read(8, PAGE - 8) == bytes(PAGE - 8)


def test_a_whole_frame_written_into_an_unbacked_one_is_its_only_content():
    """A guest write of a whole frame backs it with that content in one copy
    (alloc_frame's fill): no stale host bytes, the neighbours untouched, and a
    shadowed frame still takes the path that tells its shadows."""
    hv = Hypervisor(16 * PAGE)
    hv.host.array[:] = 0x5A                           # stale bytes everywhere
    vm = hv.create_vm(8 * PAGE)
    data = bytes(range(256)) * 16
    vm.phys.write(3 * PAGE, data)
    hpa = vm.gpa_to_hpa(3 * PAGE)
    assert hv.host.array[hpa:hpa + PAGE].tobytes() == data
    assert vm.phys.read(3 * PAGE, PAGE) == data and vm.stats["frames_backed"] == 1
    vm.phys.write(5 * PAGE, bytes(PAGE))              # clear_page of a fresh frame
    hpa5 = vm.gpa_to_hpa(5 * PAGE)
    assert not hv.host.array[hpa5:hpa5 + PAGE].any()
    assert vm.gpa_to_hpa(4 * PAGE) is None            # nothing else backed
    assert vm.phys.read(2 * PAGE, PAGE) == bytes(PAGE)
    with pytest.raises(ptemu.InvalidInput):
        vm.phys.write(7 * PAGE + 8, data)             # past the end: refused, nothing backed
    assert vm.gpa_to_hpa(7 * PAGE) is None
    free = hv.free_frames
    with pytest.raises(ValueError):
        hv.alloc_frame(fill=b"short")                 # a fill of the wrong size ...
    assert hv.free_frames == free                     # ... leaves the frame free


def test_guest_memory_is_backed_lazily_lowest_frame_first():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(32 * PAGE)
    assert vm.gpa_to_hpa(5 * PAGE) is None
    assert vm.phys.read_u64(5 * PAGE) == 0               # fresh memory reads as zero
    assert vm.gpa_to_hpa(5 * PAGE) is None               # ... and reading backs nothing
    vm.phys.write_u64(5 * PAGE + 8, 77)
    vm.phys.write_u64(2 * PAGE, 78)
    assert vm.gpa_to_hpa(5 * PAGE + 8) == 0 * PAGE + 8
    assert vm.gpa_to_hpa(2 * PAGE) == 1 * PAGE
    assert vm.phys.read_u64(5 * PAGE + 8) == 77
    assert vm.stats["frames_backed"] == 2
    assert hv.free_frames == 62
    with pytest.raises(ptemu.InvalidInput):
        vm.gpa_to_hpa(32 * PAGE)


def test_populate_backs_everything_up_front():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(16 * PAGE, populate=True)
    assert [vm.gpa_to_hpa(g * PAGE) for g in range(16)] == [g * PAGE for g in range(16)]
    with pytest.raises(HostMemoryExhausted):
        hv.create_vm(64 * PAGE, populate=True)


def test_two_vms_same_guest_physical_different_host_frames():
    """MOS 7.6: each VM's guest-physical page 10 is its own host frame."""
    hv = Hypervisor(128 * PAGE)
    vms = [hv.create_vm(32 * PAGE) for _ in range(2)]
    for i, vm in enumerate(vms):
        cr3 = tables(vm, {7: (10, P | W | U)})
        vm.phys.write_u64(10 * PAGE, 100 + i)
        vm.vcpu.write_cr3(cr3)
    assert [vm.vcpu.load_u64(7 * PAGE) for vm in vms] == [100, 101]
    vms[0].vcpu.store_u64(7 * PAGE, 555)
    assert vms[1].vcpu.load_u64(7 * PAGE) == 101
    assert vms[0].gpa_to_hpa(10 * PAGE) != vms[1].gpa_to_hpa(10 * PAGE)
    assert not vms[0].host_frames() & vms[1].host_frames()
    assert len(vms[0].host_frames() | vms[1].host_frames()) + hv.free_frames == 128
    for vm in vms:
        assert audit(vm) == []


def test_phys_reads_writes_and_range_errors():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(4 * PAGE)
    ph = vm.phys
    ph.write(PAGE - 4, b"abcdefgh")                     # across a frame boundary
    assert ph.read(PAGE - 4, 8) == b"abcdefgh"
    assert ph.read_u64(PAGE - 4) == int.from_bytes(b"abcdefgh", "little")
    ph.write_u64(3 * PAGE + 3, 0x1122334455667788)      # misaligned u64
    assert ph.read(3 * PAGE + 3, 8) == (0x1122334455667788).to_bytes(8, "little")
    for bad in (lambda: ph.read_u64(4 * PAGE - 4), lambda: ph.write_u64(4 * PAGE, 1),
                lambda: ph.read(0, 4 * PAGE + 1), lambda: ph.write(4 * PAGE - 1, b"xy"),
                lambda: ph.write_u64(0, -1), lambda: ph.read_u64("0")):
        with pytest.raises(ptemu.InvalidInput):
            bad()


def test_vcpu_checks_arguments():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(16 * PAGE)
    vc = vm.vcpu
    vc.write_cr3(tables(vm, {1: (9, P | W)}))
    for bad in (lambda: vc.load_u64(PAGE + 4), lambda: vc.store_u64(PAGE, 1 << 64),
                lambda: vc.access(PAGE, "rw"), lambda: vc.access(-1),
                lambda: vc.write_cr3("x"), lambda: vc.invlpg(None)):
        with pytest.raises(ptemu.InvalidInput):
            bad()
    with pytest.raises(ptemu.InvalidInput, match="paravirt"):
        vc.hypercall("flush_tlb")


def test_host_memory_exhausted_is_named():
    hv = Hypervisor(8 * PAGE)
    vm = hv.create_vm(64 * PAGE)
    with pytest.raises(HostMemoryExhausted):
        for g in range(64):
            vm.phys.write_u64(g * PAGE, 1)
    assert isinstance(HostMemoryExhausted("x"), MemoryError)


def test_destroy_vm_returns_every_frame():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(32 * PAGE)
    vm.vcpu.write_cr3(tables(vm, {7: (10, P | W)}))
    vm.vcpu.load_u64(7 * PAGE)
    assert hv.free_frames < 64
    hv.destroy_vm(vm)
    assert hv.free_frames == 64 and hv.vms == []
    with pytest.raises(ptemu.InvalidInput):
        hv.destroy_vm(vm)
    with pytest.raises(ptemu.InvalidInput, match="destroyed"):
        vm.vcpu.load_u64(7 * PAGE)              # its frames may belong to others now


def test_guest_cpu_assignments_are_picked_up():
    """Plain assignments to vcpu.cpu (CPL here) take effect at the next access:
    a user-mode read of a supervisor page is #PF P|U (SDM 4.6.1, 4.7)."""
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(32 * PAGE)
    vc = vm.vcpu
    vc.write_cr3(tables(vm, {7: (10, P | W)}))
    vc.load_u64(7 * PAGE)
    vc.cpu.cpl = 3
    with pytest.raises(ptemu.PageFault) as e:
        vc.load_u64(7 * PAGE)
    assert e.value.error_code == bits.PF_P | bits.PF_U
    assert vc.real_cpu.cpl == 3


def test_exit_log():
    hv = Hypervisor(64 * PAGE)
    vm = hv.create_vm(32 * PAGE)
    log = []
    vm.log_exits(log)
    vm.vcpu.write_cr3(tables(vm, {7: (10, P | W)}))
    vm.vcpu.load_u64(7 * PAGE)
    exits = [r for r in log if isinstance(r, ExitRecord)]
    assert [(r.number, r.reason) for r in exits] == [(1, "cr3_write"), (2, "page_fault")]
    assert "hidden fault" in exits[1].detail
    assert [r for r in log if not isinstance(r, ExitRecord)][0][0] == "backing"
    n = len(log)
    vm.log_exits(None)
    vm.vcpu.invlpg(0)
    assert len(log) == n
    with pytest.raises(ptemu.InvalidInput):
        vm.log_exits(42)


# -- paravirtual ----------------------------------------------------------------------------------
def _pv():
    hv = Hypervisor(128 * PAGE)
    vm = hv.create_vm(32 * PAGE, paging="paravirt")
    cr3 = tables(vm, {7: (10, P | W | U), 8: (11, P | W | U)})
    vm.phys.write_u64(10 * PAGE, 0xA)
    vm.phys.write_u64(11 * PAGE, 0xB)
    vm.phys.write_u64(12 * PAGE, 0xC)
    vm.vcpu.hypercall("new_baseptr", cr3)
    return hv, vm, cr3


def test_paravirt_new_baseptr_is_a_hypercall_not_a_cr3_exit():
    hv, vm, cr3 = _pv()
    st = vm.stats
    assert (st["exit_hypercall"], st["hypercall"], st["exit_cr3_write"]) == (1, 1, 0)
    assert vm.vcpu.cpu.cr3 == cr3 and vm.vcpu.real_cpu.cr3 == vm.shadow.root.hpa
    assert vm.vcpu.load_u64(7 * PAGE) == 0xA


def test_paravirt_mmu_update_updates_shadow_without_page_fault_exits():
    """mmu_update writes the guest entries and the shadow directly: after it, the
    remapped page reads from its new frame with no #PF exit (an accessed entry is
    installed at once) and no flood counting."""
    hv, vm, cr3 = _pv()
    vc = vm.vcpu
    assert vc.load_u64(7 * PAGE) == 0xA
    pt = cr3 + 3 * PAGE
    exits = vm.stats["exit_page_fault"]
    n = vc.hypercall("mmu_update", [(pt + 7 * 8, 12 * PAGE | P | W | U | A),
                                    (pt + 9 * 8, 10 * PAGE | P | U)])
    assert n == 2
    assert vm.phys.read_u64(pt + 7 * 8) == 12 * PAGE | P | W | U | A
    assert vc.load_u64(7 * PAGE) == 0xC
    assert vm.stats["exit_page_fault"] == exits
    assert vm.stats["mmu_update_entries"] == 2 and vm.stats["pf_emulate"] == 0
    for i in range(5):
        vc.hypercall("mmu_update", [(pt + (100 + i) * 8, 0)])
    assert vm.stats["mmu_flooded"] == 0
    assert audit(vm) == []


@pytest.mark.parametrize("update, why", [
    ((3, 7 * 8, 999 * PAGE | P | W), "outside the VM"),                 # target past memory
    ((3, 7 * 8 + 4, 12 * PAGE | P), "aligned entry"),                  # misaligned entry
    ((3, 7 * 8, 4 * PAGE | P | W), "page-table frame"),                # RW map of the PT
    ((2, 1 * 8, 0 | P | W | PS), "page-table frame"),                  # 2M RW over tables
])
def test_paravirt_validation_refuses_the_whole_batch(update, why):
    hv, vm, cr3 = _pv()
    vm.vcpu.load_u64(7 * PAGE)                           # shadows PML4..PT
    tbl, off, value = update
    good = (cr3 + 3 * PAGE + 8 * 8, 0)
    before = vm.phys.read(0, vm.memory_bytes)
    with pytest.raises(HypercallRejected, match=why) as e:
        vm.vcpu.hypercall("mmu_update", [good, (cr3 + tbl * PAGE + off, value)])
    assert e.value.index == 1
    assert vm.phys.read(0, vm.memory_bytes) == before      # nothing applied
    assert vm.stats["hypercall_rejected"] == 1


def test_paravirt_read_only_pt_mapping_is_allowed_and_raw_stores_still_trap():
    """A read-only mapping of a page table is fine; a plain store into a page table
    traps and is emulated (Xen's writable page tables)."""
    hv, vm, cr3 = _pv()
    vc = vm.vcpu
    vc.load_u64(7 * PAGE)
    pt = cr3 + 3 * PAGE
    vc.hypercall("mmu_update", [(pt + 9 * 8, pt | P)])
    assert vc.load_u64(9 * PAGE + 7 * 8) == 10 * PAGE | P | W | U | A
    vm.phys.write_u64(pt + 20 * 8, pt | P | W)          # boot-time style write, unchecked
    vc.store_u64(20 * PAGE + 8 * 8, 0)
    assert vm.stats["pf_emulate"] == 1
    with pytest.raises(ptemu.PageFault):
        vc.load_u64(8 * PAGE)


def test_paravirt_invlpg_and_flush_tlb():
    hv, vm, cr3 = _pv()
    vc = vm.vcpu
    vc.load_u64(7 * PAGE)
    vc.hypercall("invlpg", 7 * PAGE)
    vc.hypercall("flush_tlb")
    assert vm.stats["invlpg"] == 1 and vm.stats["cr3_write"] == 2
    assert vm.stats["exit_hypercall"] == 3
    for bad in (("nope",), ("invlpg",), ("flush_tlb", 1), ("mmu_update", [(0,)]),
                ("new_baseptr",)):
        with pytest.raises(ptemu.InvalidInput):
            vc.hypercall(*bad)


def test_guest_kernel_runs_on_a_vm():
    """The guest kernel model (ptemu.guest) runs unchanged on shadow, unsync-shadow
    and paravirt VMs and gets what it gets natively (same faults handled, same
    accesses)."""
    from ptemu.guest import Kernel, NativeMachine
    from ptemu.workloads import ForkWorkload
    results = {}
    for mode in ("native", "shadow", "unsync", "paravirt"):
        if mode == "native":
            m = NativeMachine(16 << 20)
        else:
            hv = Hypervisor(40 << 20)
            m = hv.create_vm(16 << 20, paging="paravirt" if mode == "paravirt" else "shadow",
                             unsync=(mode == "unsync"))
        k = Kernel(m)
        r = ForkWorkload(total=40_000, heap_pages=32, child_accesses=3000,
                         parent_accesses=1000, child_touch=16).run(k)
        results[mode] = (r.accesses, r.faults, dict(k.stats))
        if mode != "native":
            assert audit(m) == []
    assert results["shadow"] == results["native"]
    assert results["unsync"] == results["native"]
    assert results["paravirt"][:2] == results["native"][:2]
