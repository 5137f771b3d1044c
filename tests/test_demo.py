"""`ptemu demo`: the textbook scenario of Modern Operating Systems (4th ed.,
section 7.6), its facts checked on the machines themselves, not on the text.

VM 1 maps virtual pages 7, 4, 3 -> guest-physical 10, 11, 12; VM 2 maps 4, 5,
6 -> its own 10, 11, 12; each shadow maps those virtual pages straight onto
the host frames backing them, disjoint between the VMs; VM 1's store remapping
virtual page 7 onto guest-physical 200 traps (its page-table page is
write-protected) and the shadow follows.
"""
import io

from ptemu.hypervisor import audit
from ptemu.hypervisor.demo import TextbookDemo, run_demo, PT, PML4, PT_WINDOW

PAGE = 4096


def shadow_pa(vm, va, access="r"):
    """What the REAL MMU (host memory, shadow root as CR3) makes of va: a probe
    walk of the shadow tables, no exit, no A/D."""
    return vm.vcpu.mmu.translate(va, access, update_ad=False).pa


def test_textbook_scenario_facts():
    d = TextbookDemo(io.StringIO())
    vm1, vm2 = d.vm1, d.vm2
    d.boot(vm1, d.VM1_MAPPINGS)
    # The CR3 load trapped and the real CR3 is a shadow root, not the guest's table.
    assert vm1.stats["exit_cr3_write"] == 1
    assert vm1.vcpu.cpu.cr3 == PML4 * PAGE
    assert vm1.vcpu.real_cpu.cr3 == vm1.shadow.root.hpa != vm1.gpa_to_hpa(PML4 * PAGE)
    # The shadow maps 7 -> hpa(10), 4 -> hpa(11), 3 -> hpa(12).
    for vpage, gfn in d.VM1_MAPPINGS:
        assert shadow_pa(vm1, vpage * PAGE + 0x123) == vm1.gpa_to_hpa(gfn * PAGE + 0x123)
    assert vm1.stats["pf_fixed"] == 3

    d.boot(vm2, d.VM2_MAPPINGS)
    for vpage, gfn in d.VM2_MAPPINGS:
        assert shadow_pa(vm2, vpage * PAGE) == vm2.gpa_to_hpa(gfn * PAGE)
    # The same guest-physical pages, different host frames; no frame shared at all.
    for gfn in (10, 11, 12):
        assert vm1.gpa_to_hpa(gfn * PAGE) != vm2.gpa_to_hpa(gfn * PAGE)
    assert not vm1.host_frames() & vm2.host_frames()
    # VM 1's virtual page 4 and VM 2's virtual page 4 reach different memory.
    assert shadow_pa(vm1, 4 * PAGE) != shadow_pa(vm2, 4 * PAGE)

    # The page-table page is write-protected in the shadow (SDM 4.6: a write to a
    # read-only page faults, which is what makes the guest's store exit).
    d.remap()
    st = vm1.stats
    assert st["pf_emulate"] == 1 and st["mmu_pte_write"] == 1
    assert vm1.phys.read_u64(PT * PAGE + 7 * 8) & 0x000FFFFFFFFFF000 == 200 * PAGE
    assert shadow_pa(vm1, 7 * PAGE) == vm1.gpa_to_hpa(200 * PAGE)
    assert vm1.gpa_to_hpa(200 * PAGE) >> 12 not in vm2.host_frames()
    # The guest's window onto its page table is read-only in the shadow.
    assert not vm1.vcpu.mmu.translate(PT_WINDOW * PAGE, update_ad=False).writable
    # VM 2 is untouched: its virtual page 4 still reaches its own guest frame 10.
    assert vm2.vcpu.load_u64(4 * PAGE) == (2 << 32) | 10
    assert audit(vm1) == [] and audit(vm2) == []


def test_demo_output_tells_every_step_and_is_deterministic():
    a, b = io.StringIO(), io.StringIO()
    assert run_demo(a) == 0
    run_demo(b)
    text = a.getvalue()
    assert text == b.getvalue()
    for needle in ("== VM 1 ==", "== VM 2 ==", "cr3_write", "page_fault", "hidden fault",
                   "host frame chosen", "shadow page tables", "write-protected page table",
                   "emulate the store", "invlpg", "remaps virtual page 7 onto guest-physical "
                   "page 200", "host frames in both: none", "Exits by reason"):
        assert needle in text, needle
    # every exit of the run is printed, numbered per VM
    assert text.count("VM 1 exit #") == 7 and text.count("VM 2 exit #") == 4
