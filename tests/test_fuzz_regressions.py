"""What the fuzzers found, as regression tests -- and the fuzzers' own oracles.

Each finding of fuzz/fuzz_walker.py or fuzz/fuzz_hostile_guest.py becomes a
hand-written test here, with the expectation derived from the SDM (not from
the implementation), and the date and harness that found it.  The last
tests run both harnesses briefly on fixed inputs (so that they keep working
without atheris) and check that their oracles do catch a planted bug.
"""
import os
import random
import sys

import numpy as np
import pytest

import ptemu
from ptemu import bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "fuzz"))

import fuzz_walker  # noqa: E402
from _common import ByteInput, Finding  # noqa: E402

try:
    from ptemu.hypervisor import Hypervisor, audit
    import fuzz_hostile_guest
except ImportError:  # pragma: no cover - the hypervisor is optional here
    Hypervisor = None

needs_hv = pytest.mark.skipif(Hypervisor is None, reason="ptemu.hypervisor not available")

P, W, U, A, D = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D
PAGE = 4096


def booted_vm(leaf_flags=P | W | U, frames=16):
    """A shadow VM whose guest identity-maps its 16 frames at va 0 (PML4 at
    gfn 1, PDPT 2, PD 3, PT 4), CR3 loaded -- the hostile harness's start."""
    hv = Hypervisor((frames + 48) * PAGE)
    vm = hv.create_vm(frames * PAGE)
    fuzz_hostile_guest._boot_tables(vm, leaf_flags)
    vm.vcpu.write_cr3(1 * PAGE)
    return hv, vm


# ---------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------
@needs_hv
def test_hostile_read_then_write_sets_guest_dirty_bit():
    """fuzz_hostile_guest, first input (2026-11-24): a read of a page whose
    guest PTE is clean (D=0) made the shadow leaf writable, so the guest's
    later write never exited and the guest's D bit stayed clear.

    SDM 4.8: the processor sets D in the PTE on the first write to the page;
    the guest must see D=1 after its store.  The shadow may be writable only
    while the guest entry is dirty (fixed in shadow.py `fill`: W only with
    the guest leaf's D)."""
    _, vm = booted_vm()
    va = 5 * PAGE
    vm.vcpu.access(va, "r")
    pte = vm.phys.read_u64(4 * PAGE + 5 * 8)
    assert pte & A and not pte & D                  # a read sets A only (SDM 4.8)
    assert audit(vm) == []
    vm.vcpu.store_u64(va + 0x10, 0x1234)
    pte = vm.phys.read_u64(4 * PAGE + 5 * 8)
    assert pte & D, "guest PTE %#x lost its dirty bit" % pte
    assert vm.phys.read_u64(5 * PAGE + 0x10) == 0x1234
    assert audit(vm) == []


@needs_hv
def test_hostile_supervisor_write_wp0_pkru_wd_is_allowed():
    """fuzz_hostile_guest, seed 1 input 7486 (2026-11-24): with CR4.PKE=1,
    PKRU.WD set for key 0 and CR0.WP=0, a CPL-0 write to a user page raised
    ShadowMmuError("no progress"): the real CPU keeps WP=1, so the real walk
    applies WD and faults forever while the guest's own walk succeeds.

    SDM 4.6.2: PKRU.WD prevents supervisor-mode writes to user-mode pages
    only if CR0.WP=1; with WP=0 the write is allowed.  The native walker
    agrees (checked first); the VM must give the guest the same answer."""
    _, vm = booted_vm()
    image = vm.phys.read(0, vm.memory_bytes)
    cpu = ptemu.CpuState.long_mode(cr3=PAGE, cr4=bits.CR4_PKE, pkru=0b10)
    cpu.cr0 = cpu.cr0 & ~bits.CR0_WP
    native = ptemu.Mmu(ptemu.PhysicalMemory.from_array(
        np.frombuffer(bytearray(image), dtype=np.uint8)), cpu)
    assert native.translate(0xd000, "w", user=False).pa == 0xd000

    v = vm.vcpu
    v.write_cr4(v.cpu.cr4 | bits.CR4_PKE)
    v.cpu.pkru = 0b10                               # key 0: WD=1, AD=0
    v.write_cr0(v.cpu.cr0 & ~bits.CR0_WP)
    assert v.access(0xd000, "w") == 0xd000
    v.store_u64(0xd008, 7)
    assert vm.phys.read_u64(0xd008) == 7
    assert audit(vm) == []


@needs_hv
def test_hostile_run_wp0_pkru_wd_is_allowed():
    """fuzz_hostile_guest, seed 1 input 55636 (2026-11-24): the same state
    (CR4.PKE, PKRU.WD for key 0, CR0.WP=0) and a supervisor write in a bulk
    `vcpu.run` raised ShadowMmuError("no progress on trace[i]").  SDM 4.6.2:
    the write is allowed, so the run completes (index == len(trace))."""
    _, vm = booted_vm()
    v = vm.vcpu
    v.write_cr4(v.cpu.cr4 | bits.CR4_PKE)
    v.cpu.pkru = 0b10
    v.write_cr0(v.cpu.cr0 & ~bits.CR0_WP)
    trace = np.zeros(3, dtype=ptemu.TRACE_DTYPE)
    trace["va"] = [0xc000, 0xc008, 0xd000]
    trace["access"] = [0, 1, 1]
    res = v.run(trace)
    assert (res.index, res.vector) == (3, 0)
    assert vm.phys.read_u64(4 * PAGE + 0xc * 8) & D     # the write set D (SDM 4.8)


# ---------------------------------------------------------------------------
# The harnesses still run, and their oracles bite
# ---------------------------------------------------------------------------
def test_walker_sparse_table_across_the_end_of_a_segments_file_bytes():
    """fuzz_walker op_sparse, 2026-12-01 (CI's 60 s run): an ELF-style segment
    at pa 0 of 12 KiB whose file holds only 12284 bytes (p_filesz < p_memsz,
    the rest reads as zeros) has its page table at 0x2000..0x2fff crossing
    from the file bytes into the zero tail.  Every word of that table is in
    memory, so mappings() must list what it maps (SDM 4.5: a 1 GiB leaf in
    the PDPT), as it does for the same bytes laid out plainly; it skipped
    the table instead."""
    plain = ptemu.PhysicalMemory(3 * PAGE)
    plain.write_u64(0x0000, 0x1000 | P | W)            # PML4[0] -> PDPT at 0x1000
    plain.write_u64(0x1000, 0x2000 | P | W)            # PDPT[0] -> PD at 0x2000
    plain.write_u64(0x2000, 0x0 | P | W | ptemu.PTE_PS)   # PD[0]: 2 MiB page at 0
    plain.write_u64(0x2ff8, 0x200000 | P | ptemu.PTE_PS)  # PD[511]: its last 4 bytes
    file = plain.array[:12284].copy()                  # ... beyond the file's end:
    segs = [(0, 0, 12284, 3 * PAGE)]                   # the high half reads as 0
    sp = ptemu.PhysicalMemory._from_segments("<test>", segs, _file=file)
    assert sp.read_u64(0x2ff8) == 0x200000 | P | ptemu.PTE_PS     # low half in the file
    cpu = ptemu.CpuState.long_mode(cr3=0)
    got = list(ptemu.Mmu(sp, cpu).mappings())
    assert [(m.va, m.pa, m.page_size) for m in got] == [
        (0, 0, 2 << 20), (511 << 21, 0x200000, 2 << 20)]
    assert got == list(ptemu.Mmu(plain, cpu).mappings())
    assert sp.table(0x2000)[511] == 0x200000 | P | ptemu.PTE_PS
    # A table with a hole in it is still not wholly in memory.
    holed = ptemu.PhysicalMemory._from_segments("<test>", [(0, 0, 0x2800, 0x2800)],
                                                _file=plain.array[:0x2800].copy())
    assert holed.table(0x2000) is None


def test_walker_sparse_oracle_knows_back_to_back_segments_are_one_run():
    """fuzz_walker op_sparse's oracle, 2026-12-01: segments (0, 0, 4, 4) and
    (4, 4, ...) lie back to back in memory and in the file, so the word at 0
    is memory (the image reader makes them one run) -- the oracle called it
    a hole and flagged a correct walk.  A word across a zero-tail split or
    into a hole is still outside."""
    segs = [(0, 0, 4, 4), (4, 4, 3572, 3572), (3576, 3599, 520, 520)]
    assert fuzz_walker._inside_one(segs, 0)
    assert not fuzz_walker._inside_one(segs, 3572)        # file parts not back to back
    file = np.arange(4200, dtype=np.uint64).astype(np.uint8)
    sp = ptemu.PhysicalMemory._from_segments("<test>", segs, _file=file)
    assert sp.gather_u64(np.array([0, 3568, 3576], dtype=np.uint64)).tolist() == [
        int.from_bytes(bytes(file[0:8]), "little"),
        int.from_bytes(bytes(file[3568:3576]), "little"),
        int.from_bytes(bytes(file[3599:3607]), "little")]
    assert sp.gather_u64(np.array([3572], dtype=np.uint64)).tolist() == [0]
    assert not fuzz_walker._inside_one([(0, 0, 12, 16)], 4)  # across the zero-tail split
    assert fuzz_walker._inside_one([(0, 0, 12, 16)], 8)      # the tail holds bytes 8..11


def test_walker_harness_runs_clean_on_fixed_inputs():
    rng = random.Random(20261124)
    for _ in range(150):
        fuzz_walker.one_input(rng.randbytes(rng.randrange(400)))


def _walker_ctx():
    mem = ptemu.PhysicalMemory(0x8000)
    from ptemu.pagetable import PageTableBuilder
    b = PageTableBuilder(mem, table_start=0x1000, table_end=0x6000)
    b.map(0x5000, 0x7000, flags=P | W | U)
    ctx = fuzz_walker.Ctx()
    ctx.mem, ctx.cpu, ctx.tlb = mem, ptemu.CpuState.long_mode(cr3=b.cr3), None
    ctx.la57, ctx.vas = False, [0x5000]
    ctx.mmu = ptemu.Mmu(mem, ctx.cpu)
    return ctx


# op_reference input: va from ctx.vas[0], access 'r', user None, update_ad=True
_REF_INPUT = bytes([0x08, 0, 0, 0, 0])


def test_walker_reference_oracle_agrees_on_a_good_walk():
    fuzz_walker.op_reference(ByteInput(_REF_INPUT), _walker_ctx())


def test_walker_reference_oracle_catches_a_wrong_translation(monkeypatch):
    real = fuzz_walker.refwalk
    if real is None:
        pytest.skip("tests/refwalk.py not importable")

    class Lying:
        @staticmethod
        def walk_cpu(image, cpu, va, acc, **kw):
            out, after = real.walk_cpu(image, cpu, va, acc, **kw)
            out.pa ^= 0x1000
            return out, after

    monkeypatch.setattr(fuzz_walker, "refwalk", Lying)
    with pytest.raises(Finding, match="ptemu .* refwalk"):
        fuzz_walker.op_reference(ByteInput(_REF_INPUT), _walker_ctx())


def test_walker_refused_call_must_not_change_state():
    ctx = _walker_ctx()

    def bad():
        ctx.mem.write_u64(0x100, 1)
        raise ptemu.InvalidInput("refused after writing")

    with pytest.raises(Finding, match="changed memory"):
        fuzz_walker._refused(ctx, "bad", bad)


@needs_hv
def test_hostile_harness_runs_on_fixed_inputs():
    rng = random.Random(7)
    for _ in range(12):
        fuzz_hostile_guest.one_input(rng.randbytes(rng.randrange(300)))


@needs_hv
def test_hostile_isolation_oracle_catches_a_leaf_onto_the_victim():
    w = fuzz_hostile_guest.World(ByteInput(b""))
    w.vm.vcpu.access(3 * PAGE, "r")
    fuzz_hostile_guest.check_invariants(w)
    # Corrupt the hostile VM's shadow leaf for va 0x3000 to map a victim frame.
    leaf = [m for m in w.vm.vcpu.mmu.mappings() if m.va == 3 * PAGE]
    assert leaf
    victim_frame = min(w.victim.frames_owned & set(
        int(f) // PAGE for f in w.victim.p2m.tolist()))
    entries = w.vm.vcpu.mmu.walk_entries(3 * PAGE)[0]
    spte_pa, spte = entries[-1]
    w.hv.host.write_u64(spte_pa, (spte & ~0x000ffffffffff000) | victim_frame * PAGE)
    with pytest.raises(Finding):
        fuzz_hostile_guest.check_invariants(w)
