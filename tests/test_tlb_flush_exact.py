"""Flushes drop exactly the entries SDM Vol. 3A 4.10.4.1 names, wherever
they sit: csrc/tlb.c visits only the sets its occupancy map marks
(ptemu_tlb_array.occ, one bit per set, folded modulo PTEMU_TLB_OCC_BITS),
so a set the map missed would keep an entry that must go.

The reference below works on a copy of every array's raw words and applies
each flush kind's rule to every way of every set, the way the SDM states it
(an independent transcription: it does not share tlb.c's code):

* all: every TLB and paging-structure-cache entry, globals included;
* non-global (MOV CR3 with CR4.PCIDE=0, INVPCID type 3): every non-global
  TLB entry of every PCID; every PSC entry;
* one PCID (MOV CR3 with PCIDE=1, INVPCID type 1): the PCID's non-global
  TLB entries; the PCID's PSC entries;
* one PCID with its global-tagged entries too (this model's kind 3);
* INVLPG: the TLB entries of the page holding va, at each entry's own page
  size, of the current PCID or global; the current PCID's PSC entries;
* one address (INVPCID type 0): the same, of the PCID only, globals kept.

Everything else in the arrays -- stamps of kept entries, data words, the
clock, the counters -- must be byte-identical too.
"""
import random

import numpy as np
import pytest

from ptemu import CpuState, Mmu, PhysicalMemory, Tlb, TlbArray, TRACE_DTYPE, bits
from ptemu._native import ffi, lib
from ptemu.pagetable import PageTableBuilder

SHIFT = {0: 12, 1: 21, 2: 30}          # a TLB key's size field -> page shift
KINDS = (lib.PTEMU_FLUSH_ALL, lib.PTEMU_FLUSH_NONGLOBAL, lib.PTEMU_FLUSH_PCID,
         lib.PTEMU_FLUSH_PCID_ALL, lib.PTEMU_FLUSH_INVLPG, lib.PTEMU_FLUSH_ADDR)
G = lib.PTEMU_TE_G
PCID_SHIFT = lib.PTEMU_TD_PCID_SHIFT


def _arrays(tlb):
    """(is_psc, ptemu_tlb_array) for every array in use."""
    c = tlb.c_handle
    out = [(False, c.arr[i]) for i in range(len(tlb.arrays))]
    return out + [(True, c.psc[level]) for level in sorted(tlb.psc_geometry)]


def _words(a):
    return np.frombuffer(ffi.buffer(a.slots, 3 * a.sets * a.ways * 8), dtype=np.uint64).copy()


def _goes(is_psc, key, data, kind, pcid, va):
    epcid, glob = int(data) >> PCID_SHIFT, bool(int(data) & G)
    if kind in (lib.PTEMU_FLUSH_ALL, lib.PTEMU_FLUSH_NONGLOBAL) and is_psc:
        return True
    if is_psc:
        return epcid == pcid
    if kind == lib.PTEMU_FLUSH_ALL:
        return True
    if kind == lib.PTEMU_FLUSH_NONGLOBAL:
        return not glob
    if kind == lib.PTEMU_FLUSH_PCID:
        return epcid == pcid and not glob
    if kind == lib.PTEMU_FLUSH_PCID_ALL:
        return epcid == pcid
    same_page = int(key) >> 3 == va >> SHIFT[(int(key) >> 1) & 3]
    if kind == lib.PTEMU_FLUSH_INVLPG:
        return same_page and (epcid == pcid or glob)
    return same_page and epcid == pcid and not glob          # ADDR


def _reference(is_psc, a, words, kind, pcid, va):
    """The words of array a after the flush, by the rule above."""
    ways, want = a.ways, words.copy()
    for s in range(a.sets):
        row = s * 3 * ways
        for w in range(ways):
            key, data = words[row + w], words[row + 2 * ways + w]
            if key and _goes(is_psc, key, data, kind, pcid, va):
                want[row + w] = want[row + ways + w] = 0        # key and stamp
    return want


def _machine(seed):
    """An Mmu with PCIDs and global pages whose TLB has an array of 1,024
    sets (beyond the 512 bits of the occupancy map: sets share bits) beside
    Skylake's default ones, filled by random accesses in several PCIDs."""
    rng = random.Random(seed)
    mem = PhysicalMemory(64 << 20)
    b = PageTableBuilder(mem)
    vas = []
    for i in range(600):
        va = rng.randrange(1 << 35) << 12
        glob = rng.random() < 0.2
        b.map(va, (0x1000000 + (i << 12)),
              flags=bits.PTE_P | bits.PTE_W | bits.PTE_U | (bits.PTE_G if glob else 0))
        vas.append(va)
    for i in range(8):
        va = (rng.randrange(1 << 26) << 21) | (1 << 47) >> 1
        va &= (1 << 47) - 1
        try:
            b.map(va, 0x2000000 + (i << 21), page_size=2 << 20,
                  flags=bits.PTE_P | bits.PTE_W | bits.PTE_U)
        except Exception:
            continue
        vas.append(va)
    default = Tlb.default()
    tlb = Tlb(list(default.arrays) + [TlbArray("big4k", 2, "unified", ("4K",), 4096, 4)],
              psc=default.psc_geometry)
    cpu = CpuState.long_mode(cr3=b.cr3, cr4=bits.CR4_PCIDE | bits.CR4_PGE)
    mmu = Mmu(mem, cpu, tlb)
    for pcid in (1, 2, 3):
        mmu.write_cr3(b.cr3 | pcid)
        t = np.zeros(400, dtype=TRACE_DTYPE)
        t["va"] = [rng.choice(vas) | rng.randrange(4096) & ~7 for _ in range(len(t))]
        r = mmu.run(t)
        assert r.completed
    return mmu, vas, rng


@pytest.mark.parametrize("seed", range(4))
def test_every_flush_kind_drops_exactly_what_the_sdm_names(seed):
    mmu, vas, rng = _machine(seed)
    tlb = mmu.tlb
    assert tlb.valid_entries() > 500                 # the arrays hold plenty
    for step in range(60):
        kind = rng.choice(KINDS)
        pcid = rng.choice((0, 1, 2, 3))
        va = rng.choice(vas) | rng.randrange(1 << 21) if rng.random() < 0.8 else 0
        before = [(is_psc, a, _words(a)) for is_psc, a in _arrays(tlb)]
        clocks = [a.clock for _, a, _ in before]
        lib.ptemu_tlb_flush(tlb.c_handle, kind, pcid, va, lib.PTEMU_FLUSHED_BY_USER)
        for (is_psc, a, words), clock in zip(before, clocks):
            want = _reference(is_psc, a, words, kind, pcid, va)
            got = _words(a)
            assert np.array_equal(got, want), (seed, step, kind, pcid, hex(va), a.sets)
            assert a.clock == clock
        if step % 10 == 9:                           # refill between flushes
            mmu.write_cr3(mmu.cpu.cr3 | rng.choice((1, 2, 3)) | 1 << 63)
            t = np.zeros(200, dtype=TRACE_DTYPE)
            t["va"] = [rng.choice(vas) for _ in range(len(t))]
            assert mmu.run(t).completed


def test_an_entry_written_through_c_handle_is_flushed_after_tlb_init():
    """Entries written straight into `slots` (c_handle) are the caller's to
    announce: ptemu_tlb_init derives the occupancy map (and `live`) from the
    entries again, after which a flush finds them -- in a set no fill ever
    marked."""
    tlb = Tlb.default()
    c = tlb.c_handle
    a = c.arr[0]
    ways, s = a.ways, a.sets - 1                     # the last set: never filled
    row = s * 3 * ways
    a.slots[row] = (0x1234 << 3) | 1                 # key: 4 KiB page, valid
    a.slots[row + ways] = 1                          # stamp
    a.slots[row + 2 * ways] = 5 << PCID_SHIFT        # PCID 5, not global
    assert lib.ptemu_tlb_init(c)
    assert tlb.valid_entries() == 1
    lib.ptemu_tlb_flush(c, lib.PTEMU_FLUSH_PCID, 5, 0, lib.PTEMU_FLUSHED_BY_USER)
    assert tlb.valid_entries() == 0
    assert a.slots[row] == 0 and a.slots[row + ways] == 0


def test_clearing_ready_after_writing_slots_is_enough_for_a_flush():
    """The other way to announce such entries: clear `ready`; the flush
    derives the map first."""
    tlb = Tlb.default()
    c = tlb.c_handle
    a = c.arr[0]
    ways, s = a.ways, a.sets - 1
    row = s * 3 * ways
    a.slots[row] = (0x777 << 3) | 1
    a.slots[row + ways] = 1
    c.ready = 0
    lib.ptemu_tlb_flush(c, lib.PTEMU_FLUSH_ALL, 0, 0, lib.PTEMU_FLUSHED_BY_USER)
    assert c.ready == 1
    assert tlb.valid_entries() == 0
