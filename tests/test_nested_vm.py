"""The nested-paging (EPT) VM: what the hypervisor does and no longer does.

SDM Vol. 3C 29.3 (EPT translation), 29.3.3.2 (EPT violations); the cost
model of Bhargava et al. (ASPLOS 2008): a 2-D walk of a 4-level guest on a
4-level EPT makes up to (4+1)(4+1)-1 = 24 memory references.
"""
import numpy as np
import pytest

import ptemu
from ptemu import PTE_P, PTE_W, PTE_U
from ptemu.hypervisor import Hypervisor, GuestMemoryError
from ptemu.pagetable import PageTableBuilder

GUEST = 4 << 20
HOST = 64 << 20
FL = PTE_P | PTE_W | PTE_U


def guest_tables(vm):
    """Guest tables written through phys (paging off / DMA), CR3 loaded."""
    b = PageTableBuilder(_GuestPhysMemory(vm), table_start=0x1000, table_end=0x10000)
    return b


class _GuestPhysMemory(ptemu.PhysicalMemory):
    """PageTableBuilder needs a PhysicalMemory; route it through vm.phys."""

    def __init__(self, vm):  # noqa: D401 - no super(): only the methods the builder uses
        self._vm = vm

    @property
    def size(self):
        return self._vm.memory_bytes

    def read_u64(self, pa):
        return self._vm.phys.read_u64(pa)

    def write_u64(self, pa, value):
        self._vm.phys.write_u64(pa, value)

    def write(self, pa, data):
        self._vm.phys.write(pa, data)


@pytest.fixture
def vm():
    hv = Hypervisor(HOST)
    return hv.create_vm(GUEST, paging="nested")


def test_load_store_through_guest_tables_and_ept(vm):
    """A store and a load through the guest's own tables reach the host frame
    the EPT maps the guest frame to (SDM 29.3.1)."""
    b = guest_tables(vm)
    b.map(0x7000, 0x20000, flags=FL)
    vm.vcpu.write_cr3(b.cr3)
    vm.vcpu.store_u64(0x7008, 0x1122334455667788)
    assert vm.vcpu.load_u64(0x7008) == 0x1122334455667788
    assert vm.phys.read_u64(0x20008) == 0x1122334455667788
    hpa = vm.gpa_to_hpa(0x20008)
    assert vm.hypervisor.host.read_u64(hpa) == 0x1122334455667788
    assert vm.vcpu.access(0x7010, "r") == 0x20010


def test_exits_only_on_first_touch_no_cr3_or_invlpg_exits(vm):
    """With EPT the hypervisor sees no CR3 load, no INVLPG and no guest page
    fault: only EPT violations, once per guest frame first touched."""
    b = guest_tables(vm)
    for i in range(4):
        b.map(0x400000 + i * 4096, 0x100000 + i * 4096, flags=FL)
    before = vm.stats["exit_ept_violation"]
    vm.vcpu.write_cr3(b.cr3)
    vm.vcpu.invlpg(0x400000)
    assert vm.stats["exit_ept_violation"] == before
    for i in range(4):
        vm.vcpu.load_u64(0x400000 + i * 4096)
    first = vm.stats["exit_ept_violation"]
    assert first - before == 4       # the four data frames (tables were backed by phys writes)
    for i in range(4):
        vm.vcpu.load_u64(0x400000 + i * 4096 + 8)
    assert vm.stats["exit_ept_violation"] == first
    with pytest.raises(ptemu.PageFault) as pf:
        vm.vcpu.load_u64(0x800000)
    assert pf.value.error_code == 0 and pf.value.cr2 == 0x800000      # SDM 4.7
    assert vm.stats["exit_ept_violation"] == first                     # no exit for it


@pytest.mark.parametrize("ept_levels, refs", [(4, 24), (5, 29)])
def test_two_d_walk_costs_24_or_29_references_against_4(ept_levels, refs):
    """A cold TLB miss walks 4 guest entries, each behind an EPT walk, and the
    data address too: 4 x 5 + 4 = 24 references on a 4-level EPT (Bhargava
    et al.), 4 x 6 + 5 = 29 on a 5-level one, which create_vm(ept_levels=5)
    builds (EPTP bits 5:3 = walk length - 1, SDM Vol. 3C 29.3.2 / 25.6.11)."""
    vm = Hypervisor(HOST).create_vm(GUEST, paging="nested", ept_levels=ept_levels)
    assert vm.ept.levels == ept_levels
    assert (vm.ept.eptp >> 3) & 7 == ept_levels - 1
    b = guest_tables(vm)
    b.map(0x7000, 0x20000, flags=FL)
    vm.vcpu.write_cr3(b.cr3)
    vm.vcpu.load_u64(0x7000)            # backs the data frame
    vm.vcpu.tlb.flush_all()
    t = vm.vcpu.mmu.translate(0x7000)
    assert t.mem_refs == refs
    from ptemu.guest import NativeMachine
    native = NativeMachine(GUEST, tlb=False)
    nb = PageTableBuilder(native.phys, table_start=0x1000, table_end=0x10000)
    nb.map(0x7000, 0x20000, flags=FL)
    native.vcpu.write_cr3(nb.cr3)
    assert native.vcpu.mmu.translate(0x7000).mem_refs == 4


@pytest.mark.parametrize("kw", [{"ept_levels": 3}, {"ept_levels": 6}, {"ept_levels": True},
                                {"ept_levels": "5"}, {"ept_levels": 5, "paging": "shadow"},
                                {"ept_levels": 5, "paging": "paravirt"}])
def test_create_vm_ept_levels_checked(kw):
    """ept_levels is 4 or 5 and only for nested paging: anything else is
    InvalidInput before any host frame is taken."""
    hv = Hypervisor(HOST)
    free = len(hv._free)
    kw = dict(kw)
    paging = kw.pop("paging", "nested")
    with pytest.raises(ptemu.InvalidInput, match="ept_levels"):
        hv.create_vm(GUEST, paging=paging, **kw)
    assert len(hv._free) == free and not hv.vms


def test_run_resumes_after_ept_exits_and_stops_at_guest_fault(vm):
    b = guest_tables(vm)
    for i in range(8):
        b.map(0x400000 + i * 4096, 0x100000 + i * 4096, flags=FL)
    vm.vcpu.write_cr3(b.cr3)
    tr = np.zeros(20, dtype=ptemu.TRACE_DTYPE)
    tr["va"][:16] = 0x400000 + (np.arange(16, dtype=np.uint64) % 8) * 4096
    tr["va"][16:] = 0x900000
    tr["access"][::2] = 1
    r = vm.vcpu.run(tr)
    # trace[16] is a write: W=1, P=0 (SDM 4.7)
    assert r.index == 16 and r.vector == 14 and r.error_code == 0x2 and r.cr2 == 0x900000
    assert vm.stats["exit_ept_violation"] >= 8
    # The exits were the hypervisor's (docs/machine-contract.md): none reaches the result.
    assert r.exit_reason == 0
    done = vm.vcpu.run(tr[:16])
    assert (done.index, done.vector, done.exit_reason) == (16, 0, 0) and done.completed


def test_isolation_guest_mapping_outside_its_memory(vm):
    """A guest PTE may name any guest-physical address; one outside the VM is
    never mapped in the EPT -- the access is refused, no host frame given."""
    b = guest_tables(vm)
    b.map(0x7000, GUEST + 0x5000, flags=FL)     # past the VM's memory
    vm.vcpu.write_cr3(b.cr3)
    frames = vm.host_frames()
    with pytest.raises(GuestMemoryError):
        vm.vcpu.load_u64(0x7000)
    assert vm.host_frames() == frames
    assert vm.ept.host_address(GUEST + 0x5000) is None


def test_two_vms_get_disjoint_host_frames():
    hv = Hypervisor(HOST)
    a, b = hv.create_vm(GUEST, paging="nested"), hv.create_vm(GUEST, paging="nested")
    for v in (a, b):
        t = guest_tables(v)
        t.map(0x7000, 0x20000, flags=FL)
        v.vcpu.write_cr3(t.cr3)
        v.vcpu.store_u64(0x7000, v.id)
    assert a.vcpu.load_u64(0x7000) == a.id and b.vcpu.load_u64(0x7000) == b.id
    assert not a.host_frames() & b.host_frames()


def test_hypercalls_refused(vm):
    with pytest.raises(ptemu.InvalidInput):
        vm.vcpu.hypercall("flush_tlb")
