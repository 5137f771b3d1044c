"""The bad-input contract (docs/bad-input.md), case by case.

Every case gives a named exception with a clear message, and leaves the
physical memory (every byte), the TLB (valid entries, every counter) and the
CPU state as they were.  The cases are the ones docs/bad-input.md lists, in
the same order; `test_every_documented_case_is_tested` keeps the two in step.

Where the architecture defines the answer (a paging-structure reference past
the end of memory, a non-canonical address, a reserved CR3 bit), the answer
is the architectural fault -- cited per case; everything else is refused by
the Python layer before C runs, as ptemu.InvalidInput (a ValueError) or
ptemu.ImageError (an OSError).
"""
import os
import re

import numpy as np
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory, Tlb
from ptemu.pagetable import PageTableBuilder

P, W, U, A, D = ptemu.PTE_P, ptemu.PTE_W, ptemu.PTE_U, ptemu.PTE_A, ptemu.PTE_D
MEM = 0x10000
VA = 0x0000_0000_0040_3000        # mapped below, 4 KiB, to PA 0x8000
OTHER = 0x0000_0000_0040_5000     # mapped too: its TLB entry must survive a fault elsewhere
DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "bad-input.md")


class World:
    """Memory with a 4-level mapping, a CPU in 64-bit mode, a TLB holding two
    translations; `snapshot()` is everything that must not change."""

    def __init__(self):
        self.mem = PhysicalMemory(MEM)
        b = PageTableBuilder(self.mem, table_start=0x1000, table_end=0x8000)
        b.map(VA, 0x8000, flags=P | W | U)
        b.map(OTHER, 0x9000, flags=P | W | U)
        self.cpu = CpuState.long_mode(cr3=b.cr3)
        self.tlb = Tlb.simple()
        self.mmu = Mmu(self.mem, self.cpu, self.tlb)
        self.mmu.translate(VA, "w")
        self.mmu.translate(OTHER, "r")
        assert self.tlb.valid_entries() == 2

    def snapshot(self):
        return (self.mem.array.tobytes(), self.tlb.valid_entries(), self.tlb.stats,
                repr(self.cpu), self.cpu.eager_accessed)


@pytest.fixture
def world():
    return World()


def _raises(world, exc, pattern, fn, *args, **kw):
    before = world.snapshot()
    with pytest.raises(exc) as ei:
        fn(*args, **kw)
    assert re.search(pattern, str(ei.value)), str(ei.value)
    after = world.snapshot()
    assert after[0] == before[0], "memory changed"
    assert after[1:] == before[1:], "TLB or CPU state changed"
    return ei.value


# ---------------------------------------------------------------------------
# 1. References past the end of memory: a defined #PF, not an error
# ---------------------------------------------------------------------------
def test_cr3_past_memory_is_defined_page_fault(world):
    # csrc/walk.c header: a paging-structure entry outside memory reads as
    # nonexistent memory (all ones, reserved bits 51:MAXPHYADDR set), so the
    # walk ends in #PF with P and RSVD (SDM 4.7: RSVD is reported with P=1),
    # plus W/R for a write (SDM 4.7 bit 1).  Nothing is written (no A bit,
    # SDM 4.8: A/D only after a successful walk in ptemu's order).
    w = world
    w.mmu.write_cr3(MEM)                       # the PML4 would start at the end
    before = w.snapshot()
    with pytest.raises(ptemu.PageFault) as ei:
        w.mmu.translate(0x1000, "w", user=False)
    f = ei.value
    assert f.error_code == ptemu.PF_P | ptemu.PF_RSVD | ptemu.PF_W
    assert f.cause == "outside-memory" and f.level == 4 and f.cr2 == 0x1000
    assert "outside physical memory" in str(f)
    assert w.mem.array.tobytes() == before[0]
    # Nothing was cached by the failed walk; the #PF itself invalidates the
    # faulting page (SDM 4.10.4.1), counted as a fault invalidation.
    assert w.tlb.valid_entries() == before[1]
    assert w.tlb.stats.fault_invalidations == before[2].fault_invalidations + 1


def test_entry_past_memory_is_defined_page_fault(world):
    # The PDE for VA points at a page table past the end of memory: the PTE
    # read is outside memory -> #PF P|RSVD at level 1 (walk.c header, SDM 4.7).
    w = world
    pde_pa = w.mmu.translate(VA, update_ad=False).entries[2][0]
    w.mem.write_u64(pde_pa, 0x7f000 | P | W | U | A)     # a PT at 0x7f000: past 64 KiB
    w.mmu.invlpg(VA)                                     # drops VA and the PSCs (SDM 4.10.4.1)
    snap = w.snapshot()
    with pytest.raises(ptemu.PageFault) as ei:
        w.mmu.translate(VA, "r", user=True)
    f = ei.value
    assert f.error_code == ptemu.PF_P | ptemu.PF_RSVD | ptemu.PF_U
    assert f.cause == "outside-memory" and f.level == 1
    assert w.mem.array.tobytes() == snap[0]
    assert w.tlb.valid_entries() == snap[1]


def test_batch_and_run_report_the_same_fault(world):
    # The same defined fault through translate_many and run (vector 14).
    w = world
    w.mmu.write_cr3(MEM)
    r = w.mmu.translate_many(np.array([0x1000, VA], dtype=np.uint64), "r", user=False)
    assert r.vector.tolist() == [14, 14]
    assert r.error_code.tolist() == [ptemu.PF_P | ptemu.PF_RSVD] * 2
    trace = np.zeros(1, dtype=ptemu.TRACE_DTYPE)
    trace[0] = (VA, 1, False)
    res = w.mmu.run(trace)
    assert (res.index, res.vector, res.error_code) == (0, 14, ptemu.PF_P | ptemu.PF_RSVD
                                                       | ptemu.PF_W)
    assert res.cause == "outside-memory"


# ---------------------------------------------------------------------------
# 2. Physical memory sizes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("size, pattern", [
    (0, "must be positive"),
    (12, "not a multiple of 8"),
    (4097, "not a multiple of 8"),
    (-8, "must not be negative"),
    (1 << 64, "does not fit in 64 bits"),
    (4096.0, "must be an integer"),
    ("4096", "must be an integer"),
])
def test_physical_memory_bad_size(world, size, pattern):
    _raises(world, ptemu.InvalidInput, pattern, PhysicalMemory, size)


@pytest.mark.parametrize("array, pattern", [
    (np.zeros(0, np.uint8), "must be positive"),
    (np.zeros(12, np.uint8), "not a multiple of 8"),
    (np.zeros(16, np.uint16), "1-D uint8"),
    (np.zeros((4, 4), np.uint8), "1-D uint8"),
    (np.zeros(32, np.uint8)[::2], "C-contiguous"),
])
def test_from_array_bad(world, array, pattern):
    _raises(world, ptemu.InvalidInput, pattern, PhysicalMemory.from_array, array)


def test_from_array_read_only(world):
    a = np.zeros(64, np.uint8)
    a.flags.writeable = False
    _raises(world, ptemu.InvalidInput, "writable", PhysicalMemory.from_array, a)


# ---------------------------------------------------------------------------
# 3. Image files
# ---------------------------------------------------------------------------
def test_image_missing(world, tmp_path):
    e = _raises(world, ptemu.ImageError, "no such file", PhysicalMemory.from_file,
                tmp_path / "nope.raw")
    assert isinstance(e, OSError)


def test_image_truncated(world, tmp_path):
    p = tmp_path / "cut.raw"
    p.write_bytes(bytes(4096 + 100))
    _raises(world, ptemu.ImageError, r"not a whole number of 4 KiB pages \(truncated\?\)",
            PhysicalMemory.from_file, p)


def test_image_empty(world, tmp_path):
    p = tmp_path / "empty.raw"
    p.write_bytes(b"")
    _raises(world, ptemu.ImageError, "is empty", PhysicalMemory.from_file, p)


def test_image_not_a_regular_file(world, tmp_path):
    _raises(world, ptemu.ImageError, "not a regular file", PhysicalMemory.from_file, tmp_path)


def test_image_path_through_a_file(world, tmp_path):
    # A path whose parent is a file: the OS refuses (ENOTDIR); still ImageError.
    f = tmp_path / "plain"
    f.write_bytes(bytes(4096))
    _raises(world, ptemu.ImageError, "image .*plain/x", PhysicalMemory.from_file, f / "x")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads files whatever their mode")
def test_image_unreadable(world, tmp_path):
    p = tmp_path / "secret.raw"
    p.write_bytes(bytes(4096))
    p.chmod(0)
    try:
        _raises(world, ptemu.ImageError, "permission denied", PhysicalMemory.from_file, p)
    finally:
        p.chmod(0o600)


def test_image_unreadable_as_root_via_access(world, tmp_path, monkeypatch):
    # As root the mode bits do not stop a read; the check itself is the
    # os.access() call, exercised here with access denied.
    p = tmp_path / "secret.raw"
    p.write_bytes(bytes(4096))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    _raises(world, ptemu.ImageError, "permission denied", PhysicalMemory.from_file, p)


# ---------------------------------------------------------------------------
# 4. numpy arrays: dtype, shape, byte order, contiguity, writability
# ---------------------------------------------------------------------------
VAS = np.array([VA, OTHER, VA + 8, OTHER + 16], dtype=np.uint64)


@pytest.mark.parametrize("vas, pattern", [
    (VAS.astype(np.int64), "vas must have dtype uint64, not int64"),
    (VAS.astype(np.uint32), "vas must have dtype uint64, not uint32"),
    (VAS.astype(np.float64), "vas must have dtype uint64, not float64"),
    (VAS.astype(">u8"), r"vas must have dtype uint64, not >u8"),
    (VAS.reshape(2, 2), r"vas must be 1-D, not of shape \(2, 2\)"),
    (VAS[::2], "vas must be C-contiguous"),
    ([VA, -1], "must not be negative"),
    ([VA, 1 << 64], "does not fit in 64 bits"),
    ("abc", "virtual address must be an integer"),
])
def test_translate_many_bad_vas(world, vas, pattern):
    _raises(world, ptemu.InvalidInput, pattern, world.mmu.translate_many, vas)


def test_translate_many_read_only_input_is_fine(world):
    # An input array need not be writable (only outputs must be).
    vas = VAS.copy()
    vas.flags.writeable = False
    r = world.mmu.translate_many(vas, update_ad=False)
    assert r.pa.tolist() == [0x8000, 0x9000, 0x8008, 0x9010]


@pytest.mark.parametrize("access, pattern", [
    (np.array([0, 1, 2, 3], np.uint8), "access codes must be 0 .read., 1 .write. or 2 .fetch."),
    (np.array([0, 1, 2], np.uint8), "access must have length 4, not 3"),
    (np.array([0, 1, 2, 0], np.int32), "access must have dtype uint8"),
    (np.array([b"r", b"w", b"q", b"x"], dtype="S1"), "access codes must be 0"),
    ("rw", "access must be 'r', 'w' or 'x'"),
])
def test_translate_many_bad_access(world, access, pattern):
    _raises(world, ptemu.InvalidInput, pattern, world.mmu.translate_many, VAS, access)


def _trace(n=3):
    t = np.zeros(n, dtype=ptemu.TRACE_DTYPE)
    t["va"] = [VA, OTHER, VA][:n]
    t["access"] = [0, 1, 0][:n]
    return t


def test_run_read_only_output(world):
    pa = np.zeros(3, np.uint64)
    pa.flags.writeable = False
    _raises(world, ptemu.InvalidInput, "pa must be writable", world.mmu.run, _trace(), pa=pa)
    assert not pa.any()


@pytest.mark.parametrize("make, pattern", [
    (lambda: np.zeros(4, np.uint64), "pa must have length 3, not 4"),
    (lambda: np.zeros(3, np.int64), "pa must have dtype uint64"),
    (lambda: np.zeros(6, np.uint64)[::2], "pa must be C-contiguous"),
    (lambda: np.zeros(3, ">u8"), "pa must have dtype uint64"),
])
def test_run_bad_output(world, make, pattern):
    _raises(world, ptemu.InvalidInput, pattern, world.mmu.run, _trace(), pa=make())


@pytest.mark.parametrize("make, pattern", [
    (lambda: _trace().astype([("va", "<u8"), ("access", "u1"), ("user", "?")]),
     "trace must have dtype"),
    (lambda: _trace()[::2], "trace must be C-contiguous"),
    (lambda: _trace().reshape(1, 3), "trace must be 1-D"),
    (lambda: np.zeros(3, np.uint64), "trace must have dtype"),
])
def test_run_bad_trace(world, make, pattern):
    _raises(world, ptemu.InvalidInput, pattern, world.mmu.run, make())


def test_run_bad_access_code_and_start(world):
    t = _trace()
    t["access"][1] = 7
    _raises(world, ptemu.InvalidInput, "trace access codes must be 0", world.mmu.run, t)
    _raises(world, ptemu.InvalidInput, "start 4 is past the end of the trace",
            world.mmu.run, _trace(), 4)
    _raises(world, ptemu.InvalidInput, "start must not be negative", world.mmu.run, _trace(), -1)


# ---------------------------------------------------------------------------
# 5. Integers: negative, wider than 64 bits, not integers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("call, pattern", [
    (lambda m: m.translate(-1), "virtual address must not be negative"),
    (lambda m: m.translate(1 << 64), "virtual address 0x10000000000000000 does not fit"),
    (lambda m: m.translate(1.5), "virtual address must be an integer"),
    (lambda m: m.translate(VA, "z"), "access must be 'r', 'w' or 'x'"),
    (lambda m: m.translate(VA, user="yes"), "user must be None, True or False"),
    (lambda m: m.write_cr3(-4096), "CR3 must not be negative"),
    (lambda m: m.write_cr3(1 << 64), "CR3 .* does not fit in 64 bits"),
    (lambda m: m.write_cr4(-1), "CR4 must not be negative"),
    (lambda m: m.invlpg(-1), "virtual address must not be negative"),
    (lambda m: m.invlpg(1 << 70), "does not fit in 64 bits"),
    (lambda m: m.invpcid(0, -1), "pcid must not be negative"),
    (lambda m: m.invpcid(0, 0, 1 << 64), "does not fit in 64 bits"),
    (lambda m: m.memory.write_u64(0x100, -1), "value must not be negative"),
    (lambda m: m.memory.write_u64(0x100, 1 << 64), "value .* does not fit in 64 bits"),
    (lambda m: m.memory.write_u64(-8, 0), "physical address must not be negative"),
    (lambda m: m.memory.read_u64(MEM - 4), "outside memory"),
    (lambda m: m.memory.write(MEM - 4, bytes(8)), "outside memory"),
])
def test_bad_integers(world, call, pattern):
    _raises(world, ptemu.InvalidInput, pattern, call, world.mmu)


@pytest.mark.parametrize("field, value, pattern", [
    ("cr3", -1, "cr3 must not be negative"),
    ("cr3", 1 << 64, "does not fit in 64 bits"),
    ("cr0", 1 << 32 | ptemu.CR0_PG | ptemu.CR0_PE, "bits 63:32 are reserved"),
    ("cpl", 4, "cpl must be 0..3"),
    ("cpl", -1, "cpl must be 0..3"),
    ("pkru", 1 << 32, "pkru is a 32-bit register"),
    ("pkrs", -1, "pkrs must not be negative"),
])
def test_cpu_state_bad_integers(world, field, value, pattern):
    _raises(world, ptemu.InvalidInput, pattern, setattr, world.cpu, field, value)


# ---------------------------------------------------------------------------
# 6. MAXPHYADDR out of range (SDM 4.1.4: CPUID.80000008H:EAX[7:0], at most 52)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0, 31, 53, 64, True, "52", 52.0])
def test_maxphyaddr_out_of_range(world, m):
    _raises(world, ptemu.InvalidInput, "maxphyaddr must be 32..52", setattr, world.cpu,
            "maxphyaddr", m)
    _raises(world, ptemu.InvalidInput, "maxphyaddr must be 32..52", CpuState.long_mode,
            maxphyaddr=m)


# ---------------------------------------------------------------------------
# 7. Paging modes ptemu does not model, and contradictory states
# ---------------------------------------------------------------------------
def test_la57_without_pae(world):
    # SDM 4.1.1: 5-level paging is IA-32e paging with CR4.LA57=1, which
    # needs CR4.PAE=1; LA57 alone is no paging mode at all.
    _raises(world, ptemu.InvalidInput, r"CR4.LA57 requires CR4.PAE", CpuState,
            cr4=ptemu.CR4_LA57)
    _raises(world, ptemu.InvalidInput, r"CR4.LA57 requires CR4.PAE", setattr, world.cpu,
            "cr4", ptemu.CR4_LA57)


@pytest.mark.parametrize("kw, pattern", [
    (dict(cr0=ptemu.CR0_PG | ptemu.CR0_PE, cr4=0, efer=0), "only 4-level and 5-level paging"),
    (dict(cr0=ptemu.CR0_PG | ptemu.CR0_PE, cr4=ptemu.CR4_PAE, efer=0),
     "only 4-level and 5-level paging"),
    (dict(cr0=ptemu.CR0_PG, cr4=ptemu.CR4_PAE, efer=ptemu.EFER_LME), "CR0.PG requires CR0.PE"),
    (dict(cr0=0, efer=ptemu.EFER_LMA), "EFER.LMA is set only in long mode"),
    (dict(cr0=0, cr4=ptemu.CR4_PCIDE), "CR4.PCIDE requires long mode"),
])
def test_unmodelled_or_contradictory_state(world, kw, pattern):
    # SDM 2.5 / 4.1.1: 32-bit and PAE paging are real modes ptemu does not
    # model (refused, not walked wrongly); PG without PE, and LMA or PCIDE
    # outside IA-32e mode, are states no processor can be in.
    _raises(world, ptemu.InvalidInput, pattern, CpuState, **kw)


def test_architectural_refusals_are_general_protection(world):
    # MOV to CR3 with reserved bits (SDM 4.5.2: bits 62:MAXPHYADDR) and MOV to
    # CR4 changing LA57 in IA-32e mode (SDM 2.5, "MOV CR4" #GP) are #GP(0),
    # and leave state alone.
    _raises(world, ptemu.GeneralProtection, "reserved bits set in CR3", world.mmu.write_cr3,
            1 << 60)
    _raises(world, ptemu.GeneralProtection, "LA57 cannot change in long mode",
            world.mmu.write_cr4, world.cpu.cr4 | ptemu.CR4_LA57)
    _raises(world, ptemu.GeneralProtection, "INVPCID type 4", world.mmu.invpcid, 4, 0)


def test_non_canonical_is_general_protection(world):
    # SDM 4.5.1 / 3.3.7.1: bits 63:47 must equal bit 47; else #GP(0), no walk.
    e = _raises(world, ptemu.GeneralProtection, "not canonical", world.mmu.translate,
                0x0000_8000_0000_0000)
    assert e.error_code == 0


# ---------------------------------------------------------------------------
# 8. Wrong object types
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, pattern", [
    (("memory", "cpu"), "memory must be a PhysicalMemory"),
    ((None, None), "memory must be a PhysicalMemory"),
])
def test_mmu_bad_objects(world, args, pattern):
    _raises(world, ptemu.InvalidInput, pattern, Mmu, *args)


def test_mmu_bad_cpu_and_tlb(world):
    _raises(world, ptemu.InvalidInput, "cpu must be a CpuState", Mmu, world.mem, object())
    _raises(world, ptemu.InvalidInput, "tlb must be a Tlb or None", Mmu, world.mem, world.cpu,
            "tlb")


@pytest.mark.parametrize("entries, ways, pattern", [
    (0, 1, "entries and ways must be positive"),
    (12, 4, "3 sets is not a power of two"),
    (10, 4, "not a multiple of 4 ways"),
])
def test_tlb_bad_geometry(world, entries, ways, pattern):
    _raises(world, ptemu.InvalidInput, pattern, Tlb.simple, entries, ways)


# ---------------------------------------------------------------------------
# The document and the tests stay in step
# ---------------------------------------------------------------------------
def test_every_documented_case_is_tested():
    """Each `test_...` name docs/bad-input.md cites exists in this module."""
    with open(DOC) as fh:
        text = fh.read()
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", text))
    assert len(cited) >= 20
    missing = sorted(n for n in cited if n not in globals())
    assert not missing, missing
