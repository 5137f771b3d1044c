"""The walk context an Mmu keeps between calls (issue 12): derived from the
CPU state once and used until any byte of that state changes -- however it
changes (CpuState assignment, a write straight into the C struct as MOV CR3
does, a second Mmu sharing the CpuState).  A stale context would decide
rights or pick tables from the old state; every case here would then give
the old answer.

Hand-built image (4-level paging, 64 KiB of memory, A and D set everywhere
so that no walk writes memory):

  root A @0x1000 -> PDPT @0x2000 -> PD @0x3000 -> PT @0x4000
  PT [0] -> 0x9000, supervisor, read-only (P only)
     [1] -> 0xa000, user, writable (P W U)
  root B @0x5000 -> PDPT @0x6000 -> PD @0x7000 -> PT @0x8000
  PT [0] -> 0xc000 (P W U)

Expectations from the SDM: 4.6.1 (a supervisor write to a read-only page
faults only with CR0.WP=1; a supervisor data access to a user page faults
with CR4.SMAP=1 unless RFLAGS.AC=1), 4.7 (error code P=1, W/R=2), 4.5 (CR3
names the root table).
"""
import numpy as np
import pytest

import ptemu

P, W, U, A, D = 1, 2, 4, 0x20, 0x40
T = P | W | U | A


def _image():
    mem = ptemu.PhysicalMemory(0x10000)
    for root, pdpt, pd, pt in ((0x1000, 0x2000, 0x3000, 0x4000),
                               (0x5000, 0x6000, 0x7000, 0x8000)):
        mem.write_u64(root, pdpt | T)
        mem.write_u64(pdpt, pd | T)
        mem.write_u64(pd, pt | T)
    mem.write_u64(0x4000, 0x9000 | P | A | D)
    mem.write_u64(0x4008, 0xa000 | P | W | U | A | D)
    mem.write_u64(0x8000, 0xc000 | P | W | U | A | D)
    return mem


def _via(mmu, how, va, access, user=False):
    """(pa, vector, error_code) of one access through translate, translate_many or run."""
    if how in ("translate", "translate_cpl"):
        # translate_cpl: user=None (CPL 0 here, so a supervisor access), the
        # one-argument C entry with its own handles over the same cache.
        assert how == "translate" or not user
        try:
            t = (mmu.translate(va, access, user=user) if how == "translate"
                 else mmu.translate(va, access))
            return t.pa, 0, 0
        except ptemu.MmuFault as exc:
            return 0, exc.vector, exc.error_code
    if how == "translate_many":
        r = mmu.translate_many(np.array([va], dtype=np.uint64), access, user=user)
        return int(r.pa[0]), int(r.vector[0]), int(r.error_code[0])
    tr = np.zeros(1, dtype=ptemu.TRACE_DTYPE)
    tr["va"], tr["access"], tr["user"] = va, "rwx".index(access), user
    pa = np.zeros(1, dtype=np.uint64)
    r = mmu.run(tr, pa=pa)
    return int(pa[0]) if r.completed else 0, r.vector, r.error_code


HOW = ["translate", "translate_cpl", "translate_many", "run"]


@pytest.mark.parametrize("tlb", [False, True])
@pytest.mark.parametrize("how", HOW)
def test_wp_change_takes_effect(how, tlb):
    cpu = ptemu.CpuState.long_mode(cr3=0x1000)
    mmu = ptemu.Mmu(_image(), cpu, ptemu.Tlb.default() if tlb else None)
    # 4.6.1: CR0.WP=1, supervisor write to a read-only page -> #PF, P|W
    assert _via(mmu, how, 0x10, "w") == (0, 14, 0x3)
    cpu.cr0 = cpu.cr0 & ~ptemu.CR0_WP
    assert _via(mmu, how, 0x10, "w") == (0x9010, 0, 0)
    cpu.cr0 = cpu.cr0 | ptemu.CR0_WP
    assert _via(mmu, how, 0x10, "w") == (0, 14, 0x3)


@pytest.mark.parametrize("how", HOW)
def test_smap_and_ac_take_effect(how):
    cpu = ptemu.CpuState.long_mode(cr3=0x1000)
    mmu = ptemu.Mmu(_image(), cpu)
    assert _via(mmu, how, 0x1010, "r") == (0xa010, 0, 0)
    cpu.cr4 = cpu.cr4 | ptemu.CR4_SMAP          # 4.6.1: SMAP, AC=0 -> #PF, P
    assert _via(mmu, how, 0x1010, "r") == (0, 14, 0x1)
    cpu.ac = True                                # explicit access with AC=1: allowed
    assert _via(mmu, how, 0x1010, "r") == (0xa010, 0, 0)


@pytest.mark.parametrize("how", HOW)
def test_cr3_written_into_the_struct(how):
    """MOV CR3 (and the hypervisor) write cpu._c.cr3 directly: the next call
    walks from the new root (4.5)."""
    cpu = ptemu.CpuState.long_mode(cr3=0x1000)
    mmu = ptemu.Mmu(_image(), cpu)
    assert _via(mmu, how, 0x10, "r") == (0x9010, 0, 0)
    cpu._c.cr3 = 0x5000
    assert _via(mmu, how, 0x10, "r") == (0xc010, 0, 0)
    mmu.write_cr3(0x1000)
    assert _via(mmu, how, 0x10, "r") == (0x9010, 0, 0)


@pytest.mark.parametrize("how", HOW)
def test_two_mmus_share_a_cpu(how):
    cpu = ptemu.CpuState.long_mode(cr3=0x1000)
    mem = _image()
    a, b = ptemu.Mmu(mem, cpu), ptemu.Mmu(mem, cpu)
    assert _via(a, how, 0x10, "r") == _via(b, how, 0x10, "r") == (0x9010, 0, 0)
    b.write_cr3(0x5000)
    assert _via(a, how, 0x10, "r") == (0xc010, 0, 0)


def test_user_mode_from_cpl():
    """user=None means CPL 3 (API.md); CPL is part of the state compared:
    a user read of the supervisor page faults with P|U (4.6.1, 4.7)."""
    cpu = ptemu.CpuState.long_mode(cr3=0x1000)
    mmu = ptemu.Mmu(_image(), cpu)
    vas = np.array([0x10], dtype=np.uint64)
    assert mmu.translate_many(vas, "r").vector[0] == 0
    cpu.cpl = 3
    r = mmu.translate_many(vas, "r")
    assert (r.vector[0], r.error_code[0]) == (14, 0x5)
