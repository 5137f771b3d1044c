"""TLB and paging-structure-cache invalidation, one scenario per rule of
SDM Vol. 3A 4.10.4.1 (and the caching rules of 4.10.1 - 4.10.3 they rest on).

Every scenario shows both sides of staleness:

* software changes a paging-structure entry in memory and does NOT
  invalidate: a TLB (or paging-structure-cache) hit still gives the OLD
  translation (SDM 4.10.2.3: "the processor may retain a TLB entry unmodified
  even if software subsequently modifies the relevant paging-structure
  entries in memory");
* after an invalidation that does not cover the entry, still the OLD one;
* after the invalidation that covers it, the NEW one.

Hardware "is always free to invalidate additional entries" (4.10.4.1), so
keeping an entry the SDM does not require to be invalidated is ptemu's
choice: it invalidates what the SDM lists -- plus, for INVPCID type 0 and a
page fault, every PSC entry of the PCID rather than only those the address
would use.  The tests assert the required invalidations, and, where ptemu
keeps an entry, that it is kept (the model's precision).
"""
import pytest

import ptemu
from ptemu import (CpuState, Mmu, PhysicalMemory, Tlb, PageFault, GeneralProtection,
                   PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_G, PTE_NX,
                   CR4_PGE, CR4_PCIDE, CR4_SMEP, CR4_SMAP, CR0_WP)
from ptemu.pagetable import PageTableBuilder

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NOFLUSH = 1 << 63
ADDR = 0x000FFFFFFFFFF000
RW = PTE_P | PTE_W

# Linear addresses used throughout (all canonical, 4-level paging).
VA = 0x0000_5555_5540_0000          # 2 MiB aligned: VA .. VA+2M share one PDE
VA2 = VA + 0x1000                   # same page table as VA
GVA = 0xFFFF_FFFF_8000_0000         # a "kernel" page in the upper half
LVA = 0x0000_6000_0000_0000         # a 2 MiB page
HVA = 0x0000_7000_0000_0000         # a 1 GiB page
FAR = 0x0000_1000_0000_0000         # an unrelated page, never mapped

# Frames: OLD and NEW for each page.
OLD, NEW = 0x200000, 0x300000
OLD2, NEW2 = 0x201000, 0x301000
GOLD, GNEW = 0x202000, 0x302000
L_OLD, L_NEW = 0x400000, 0x600000          # 2 MiB frames
H_OLD, H_NEW = 0x4000_0000, 0x8000_0000    # 1 GiB frames (not backed; never read)


class Env:
    """A hand-built 4-level address space with a TLB.

    PCIDE=1 environments start in PCID 1.  Tables come from 0x1000..1 MiB.
    """

    def __init__(self, pcide=False, pge=True, smep=False, tlb=None):
        self.mem = PhysicalMemory(4 * MiB)
        self.pt = PageTableBuilder(self.mem, table_start=0x1000, table_end=MiB)
        self.root = self.pt.cr3
        cr4 = (CR4_PGE if pge else 0) | (CR4_PCIDE if pcide else 0) | (CR4_SMEP if smep else 0)
        self.cpu = CpuState.long_mode(cr3=self.root | (1 if pcide else 0), cr4=cr4)
        self.tlb = Tlb.simple() if tlb is None else tlb
        self.mmu = Mmu(self.mem, self.cpu, self.tlb)

    def map(self, va, pa, flags=RW, size=4 * KiB, **kw):
        return self.pt.map(va, pa, size, flags, **kw)

    def tr(self, va, access="r", user=False):
        return self.mmu.translate(va, access, user=user)

    def pa(self, va, access="r", user=False):
        return self.tr(va, access, user).pa

    def switch(self, pcid, noflush=False):
        """MOV CR3 to the same tables under another PCID."""
        self.mmu.write_cr3(self.root | pcid | (NOFLUSH if noflush else 0))


def assert_stale(env, va, old_pa, access="r"):
    t = env.tr(va, access)
    assert t.tlb_hit, "expected a TLB hit for %#x" % va
    assert t.pa == old_pa, "expected the stale translation %#x, got %#x" % (old_pa, t.pa)


def assert_fresh(env, va, new_pa, access="r"):
    t = env.tr(va, access)
    assert not t.tlb_hit, "expected a walk for %#x" % va
    assert t.pa == new_pa, "expected the new translation %#x, got %#x" % (new_pa, t.pa)


# ---------------------------------------------------------------------------
# The baseline: a TLB entry outlives a change to memory (SDM 4.10.2.3)
# ---------------------------------------------------------------------------

def test_tlb_hit_ignores_pte_change_until_invlpg():
    """SDM 4.10.2.3 / 4.10.4.1 (INVLPG): stale until INVLPG of that page;
    INVLPG of another page does not cover it."""
    env = Env()
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    assert env.pa(VA + 0x123) == OLD + 0x123
    assert env.pa(VA2) == OLD2
    env.map(VA, NEW)
    env.map(VA2, NEW2)
    assert_stale(env, VA + 0x123, OLD + 0x123)
    env.mmu.invlpg(VA2)                        # another page: VA's entry survives
    assert_stale(env, VA, OLD)
    env.mmu.invlpg(VA + 0xFF8)                 # any address in the page will do
    assert_fresh(env, VA + 0x123, NEW + 0x123)
    assert_fresh(env, VA2, NEW2)               # and VA2 was flushed by its own INVLPG


def test_unmapped_pte_still_translates_from_tlb_until_invlpg():
    """SDM 4.10.4.3: freeing a page without INVLPG leaves it reachable through
    the TLB; after INVLPG the access faults not-present (error code 0)."""
    env = Env()
    env.map(VA, OLD)
    env.pa(VA)
    env.pt.unmap(VA)
    assert_stale(env, VA, OLD)
    env.mmu.invlpg(VA)
    with pytest.raises(PageFault) as ei:
        env.pa(VA)
    assert ei.value.error_code == 0 and ei.value.cr2 == VA


# ---------------------------------------------------------------------------
# MOV to CR3 (SDM 4.10.4.1)
# ---------------------------------------------------------------------------

def test_mov_cr3_pcide0_flushes_nonglobal_keeps_global():
    """SDM 4.10.4.1: MOV to CR3 with CR4.PCIDE=0 invalidates the TLB entries
    of PCID 000H except those for global pages (4.10.2.4)."""
    env = Env(pge=True)
    env.map(VA, OLD)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(VA), env.pa(GVA)
    env.map(VA, NEW)
    env.map(GVA, GNEW, RW | PTE_G)
    assert_stale(env, VA, OLD)
    env.mmu.write_cr3(env.root)
    assert env.cpu.cr3 == env.root
    assert_fresh(env, VA, NEW)
    assert_stale(env, GVA, GOLD)               # global: survives any number of CR3 writes
    env.mmu.write_cr3(env.root)
    assert_stale(env, GVA, GOLD)
    assert env.tlb.stats.flushes_by_cause["cr3"] == 2


def test_mov_cr3_pcide0_flushes_paging_structure_caches():
    """SDM 4.10.4.1: MOV to CR3 (PCIDE=0) also invalidates every
    paging-structure-cache entry of PCID 000H.  A PDE re-pointed to another
    page table is used only after the flush."""
    env = Env()
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)
    env.pa(VA)                                 # caches the PDE (-> old table)
    env.pt.set_entry(VA, 2, pt2 | RW | PTE_U | PTE_A)
    t = env.tr(VA2)                            # TLB miss, PDE-cache hit: old table
    assert (t.pa, t.tlb_hit, t.mem_refs, t.first_level) == (OLD2, False, 1, 1)
    env.mmu.write_cr3(env.root)
    t = env.tr(VA2)
    assert (t.pa, t.mem_refs) == (NEW2, 4)
    assert env.tlb.valid_psc_entries(2) == 1   # the new PDE, cached afresh


def test_mov_cr3_pcide1_flushes_only_the_new_pcid():
    """SDM 4.10.1, 4.10.4.1: with PCIDE=1, MOV to CR3 invalidates the
    non-global entries of the PCID in bits 11:0 of the new value only;
    entries of other PCIDs survive and are used again after switching back."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    assert env.cpu.pcid == 1
    env.pa(VA)                                 # cached for PCID 1
    env.map(VA, NEW)
    env.switch(2)                              # flushes PCID 2 only
    assert env.cpu.pcid == 2
    assert_fresh(env, VA, NEW)                 # PCID 1's entry is not used by PCID 2
    env.switch(1, noflush=True)                # back, keeping PCID 1's entries
    assert_stale(env, VA, OLD)
    env.switch(2, noflush=True)
    assert_stale(env, VA, NEW)                 # PCID 2's own entry, cached above
    env.switch(1)                              # without bit 63: PCID 1 is flushed
    assert_fresh(env, VA, NEW)


def test_mov_cr3_bit63_flushes_nothing_and_is_not_stored():
    """SDM 4.10.4.1: with PCIDE=1 and bit 63 set, MOV to CR3 is not required
    to invalidate anything (ptemu invalidates nothing, PSCs included); bit 63
    is not stored in CR3."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)
    env.pa(VA)
    env.map(VA, NEW)
    env.pt.set_entry(VA, 2, pt2 | RW | PTE_U | PTE_A)
    env.mmu.write_cr3(env.root | 1 | NOFLUSH)
    assert env.cpu.cr3 == env.root | 1
    assert env.cpu.cr3 >> 63 == 0
    assert_stale(env, VA, OLD)
    t = env.tr(VA2)                            # stale PDE cache of PCID 1 still there
    assert (t.pa, t.mem_refs) == (OLD2, 1)
    assert env.tlb.stats.flushes_by_cause["cr3"] == 0


def test_mov_cr3_bit63_with_pcide0_is_reserved():
    """SDM 4.5 / MOV CR3: with CR4.PCIDE=0 bit 63 is an ordinary reserved
    bit of CR3 (bits 63:MAXPHYADDR): #GP(0), CR3 and the TLB unchanged."""
    env = Env()
    env.map(VA, OLD)
    env.pa(VA)
    env.map(VA, NEW)
    with pytest.raises(GeneralProtection):
        env.mmu.write_cr3(env.root | NOFLUSH)
    assert env.cpu.cr3 == env.root
    assert_stale(env, VA, OLD)


def test_mov_cr3_pcide1_flushes_pscs_of_new_pcid_only():
    """SDM 4.10.3, 4.10.4.1: paging-structure-cache entries are tagged with
    the PCID; MOV to CR3 (PCIDE=1) invalidates those of the new PCID."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    env.map(VA + 0x2000, OLD2 + 0x1000)
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)
    env.mem.write_u64(pt2 + 2 * 8, (NEW2 + 0x1000) | RW)
    env.pa(VA)                                 # PCID 1 caches the PDE -> old table
    env.pt.set_entry(VA, 2, pt2 | RW | PTE_U | PTE_A)
    env.switch(2)
    t = env.tr(VA2)                            # PCID 2 cannot use PCID 1's PSC entry
    assert (t.pa, t.mem_refs) == (NEW2, 4)
    env.switch(1, noflush=True)
    t = env.tr(VA + 0x2000)                    # PCID 1's stale PDE-cache entry
    assert (t.pa, t.mem_refs) == (OLD2 + 0x1000, 1)


# ---------------------------------------------------------------------------
# Global pages (SDM 4.10.2.4)
# ---------------------------------------------------------------------------

def test_global_needs_pge():
    """SDM 4.10.2.4: a translation is global only if G=1 in the leaf AND
    CR4.PGE=1; with PGE=0 a G=1 leaf is flushed by MOV to CR3 like any other."""
    env = Env(pge=False)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(GVA)
    env.map(GVA, GNEW, RW | PTE_G)
    assert_stale(env, GVA, GOLD)
    env.mmu.write_cr3(env.root)
    assert_fresh(env, GVA, GNEW)


def test_global_needs_g_in_the_leaf_not_above():
    """SDM 4.10.2.4: G counts in the entry that maps the page; G in the PDE
    of a 4 KiB page (bit 8 is ignored there) does not make it global."""
    env = Env(pge=True)
    env.map(GVA, GOLD, RW, table_flags=PTE_P | PTE_W | PTE_U | PTE_G)
    assert env.pt.get_entry(GVA, 2) & PTE_G
    env.pa(GVA)
    env.map(GVA, GNEW, RW)
    assert_stale(env, GVA, GOLD)
    env.mmu.write_cr3(env.root)
    assert_fresh(env, GVA, GNEW)


def test_global_large_page_survives_cr3():
    """SDM 4.10.2.4: a 2 MiB leaf with G=1 (PGE=1) is global as well."""
    env = Env(pge=True)
    env.map(LVA, L_OLD, RW | PTE_G, size=2 * MiB)
    env.pa(LVA + 0x1234)
    env.map(LVA, L_NEW, RW | PTE_G, size=2 * MiB)
    env.mmu.write_cr3(env.root)
    assert_stale(env, LVA + 0x5678, L_OLD + 0x5678)


def test_global_entry_is_shared_by_all_pcids_and_survives_their_cr3_writes():
    """SDM 4.10.2.4, 4.10.4.1: a global entry cached under PCID 1 is used in
    PCID 2; MOV to CR3 of any PCID keeps it."""
    env = Env(pcide=True, pge=True)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(GVA)
    env.map(GVA, GNEW, RW | PTE_G)
    env.switch(2)
    assert_stale(env, GVA, GOLD)
    env.switch(1)
    assert_stale(env, GVA, GOLD)


# ---------------------------------------------------------------------------
# MOV to CR4 (SDM 4.10.4.1)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("pge_before", [True, False])
def test_toggling_pge_flushes_everything(pge_before):
    """SDM 4.10.4.1: a MOV to CR4 that changes PGE (either way) invalidates
    all TLB entries, global ones included, and all PSC entries of all PCIDs."""
    env = Env(pge=pge_before)
    env.map(VA, OLD)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(VA), env.pa(GVA)
    env.map(VA, NEW)
    env.map(GVA, GNEW, RW | PTE_G)
    env.mmu.write_cr4(env.cpu.cr4)             # no change: no flush
    assert_stale(env, VA, OLD)
    assert_stale(env, GVA, GOLD)
    env.mmu.write_cr4(env.cpu.cr4 ^ CR4_PGE)
    assert env.tlb.valid_entries() == 0
    assert all(env.tlb.valid_psc_entries(level) == 0 for level in (2, 3, 4))
    assert_fresh(env, VA, NEW)
    assert_fresh(env, GVA, GNEW)
    assert env.tlb.stats.flushes_by_cause["cr4"] == 1


def test_cr4_write_that_changes_no_listed_bit_flushes_nothing():
    """SDM 4.10.4.1 lists PGE, PCIDE 1->0, PAE and SMEP 0->1; setting SMAP is
    none of them, so the stale entry stays."""
    env = Env()
    env.map(VA, OLD)
    env.pa(VA)
    env.map(VA, NEW)
    env.mmu.write_cr4(env.cpu.cr4 | CR4_SMAP)
    assert_stale(env, VA, OLD)


def test_clearing_pcide_flushes_everything():
    """SDM 4.10.4.1: changing CR4.PCIDE from 1 to 0 invalidates all TLB
    entries (globals too) and all PSC entries, for all PCIDs."""
    env = Env(pcide=True, pge=True)
    env.map(VA, OLD)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(VA), env.pa(GVA)                    # PCID 1
    env.switch(2)
    env.pa(VA)                                 # PCID 2
    env.map(VA, NEW)
    env.map(GVA, GNEW, RW | PTE_G)
    assert env.tlb.valid_entries() == 3
    env.mmu.write_cr4(env.cpu.cr4 & ~CR4_PCIDE)
    assert env.cpu.pcid == 0
    assert env.tlb.valid_entries() == 0
    assert all(env.tlb.valid_psc_entries(level) == 0 for level in (2, 3, 4))
    assert_fresh(env, VA, NEW)
    assert_fresh(env, GVA, GNEW)


def test_setting_pcide_flushes_nothing():
    """SDM 4.10.1, 4.10.4.1: entries cached with PCIDE=0 belong to PCID 000H;
    setting PCIDE (CR3[11:0]=0, so the PCID stays 000H) is not listed as an
    invalidating change, and they remain usable."""
    env = Env(pcide=False)
    env.map(VA, OLD)
    env.pa(VA)
    env.map(VA, NEW)
    env.mmu.write_cr4(env.cpu.cr4 | CR4_PCIDE)
    assert env.cpu.pcid == 0
    assert_stale(env, VA, OLD)
    env.switch(5)                              # PCID 5 has nothing of PCID 0's
    assert_fresh(env, VA, NEW)


def test_setting_smep_flushes_the_current_pcid_only():
    """SDM 4.10.4.1: changing SMEP from 0 to 1 invalidates the entries of the
    current PCID; other PCIDs keep theirs.  Clearing SMEP is not listed."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    env.switch(2)
    env.pa(VA)                                 # PCID 2
    env.switch(1)
    env.pa(VA)                                 # PCID 1
    env.map(VA, NEW)
    env.mmu.write_cr4(env.cpu.cr4 | CR4_SMEP)
    assert_fresh(env, VA, NEW)
    env.switch(2, noflush=True)
    assert_stale(env, VA, OLD)
    env.mmu.write_cr4(env.cpu.cr4 & ~CR4_SMEP)  # 1 -> 0: not listed
    assert_stale(env, VA, OLD)


# ---------------------------------------------------------------------------
# INVLPG (SDM 4.10.4.1)
# ---------------------------------------------------------------------------

def test_invlpg_is_for_the_current_pcid():
    """SDM 4.10.4.1: INVLPG invalidates the entries for the page associated
    with the current PCID; the same page in another PCID stays cached."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    env.pa(VA)                                 # PCID 1
    env.switch(2)
    env.pa(VA)                                 # PCID 2
    env.map(VA, NEW)
    env.mmu.invlpg(VA)                         # in PCID 2
    assert_fresh(env, VA, NEW)
    env.switch(1, noflush=True)
    assert_stale(env, VA, OLD)


def test_invlpg_removes_global_entries_in_every_pcid():
    """SDM 4.10.4.1: INVLPG also invalidates global entries for that page,
    regardless of the PCID they were cached under."""
    env = Env(pcide=True, pge=True)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(GVA)                                # cached (global) under PCID 1
    env.map(GVA, GNEW, RW | PTE_G)
    env.switch(2, noflush=True)
    assert_stale(env, GVA, GOLD)
    env.mmu.invlpg(GVA)                        # executed in PCID 2
    assert_fresh(env, GVA, GNEW)
    env.switch(1, noflush=True)
    assert_stale(env, GVA, GNEW)               # the global entry of GNEW, not GOLD


@pytest.mark.parametrize("size,va,old,new", [
    (2 * MiB, LVA, L_OLD, L_NEW),
    (1 * GiB, HVA, H_OLD, H_NEW),
])
def test_invlpg_of_any_address_in_a_large_page_removes_it(size, va, old, new):
    """SDM 4.10.2.3, 4.10.4.1: a TLB entry for a large page is for the whole
    page; INVLPG of any address inside it (another 4 KiB page) removes it.
    INVLPG just past its end does not."""
    env = Env()
    env.map(va, old, RW, size=size)
    assert env.pa(va + 0x1234) == old + 0x1234
    env.map(va, new, RW, size=size)
    assert_stale(env, va + 0x1234, old + 0x1234)
    env.mmu.invlpg(va + size)                  # the next large page
    env.mmu.invlpg(va - 0x1000)                # the page just before
    assert_stale(env, va + 0x1234, old + 0x1234)
    env.mmu.invlpg(va + size - 0x1000)         # the last 4 KiB of the large page
    assert_fresh(env, va + 0x1234, new + 0x1234)


def test_invlpg_flushes_all_pscs_of_the_current_pcid():
    """SDM 4.10.3, 4.10.4.1: a PDE re-pointed to another page table is not
    seen by a walk for another 4 KiB page of the same 2 MiB region while the
    PDE-cache entry lives; INVLPG of an unrelated address drops every PSC
    entry of the current PCID (but not the TLB entry of the first page)."""
    env = Env()
    a, b, c = VA, VA + 0x1000, VA + 0x2000
    env.map(a, OLD)
    env.map(b, OLD2)
    env.map(c, OLD2 + 0x1000)
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 0 * 8, NEW | RW)
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)
    env.mem.write_u64(pt2 + 2 * 8, (NEW2 + 0x1000) | RW)
    t = env.tr(a)
    assert (t.pa, t.mem_refs) == (OLD, 4)      # cold: PML4E, PDPTE, PDE, PTE
    env.pt.set_entry(a, 2, pt2 | RW | PTE_U | PTE_A)
    t = env.tr(b)                              # stale PDE-cache entry: old table
    assert (t.pa, t.tlb_hit, t.mem_refs, t.first_level) == (OLD2, False, 1, 1)
    env.mmu.invlpg(FAR)                        # unrelated, never mapped
    assert env.tlb.valid_psc_entries(2) == 0
    t = env.tr(c)                              # full walk through the new PDE
    assert (t.pa, t.mem_refs) == (NEW2 + 0x1000, 4)
    assert_stale(env, a, OLD)                  # TLB entries of other pages survive


def test_invlpg_keeps_pscs_of_other_pcids():
    """SDM 4.10.4.1: INVLPG drops the PSC entries of the current PCID only."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)
    env.pa(VA)                                 # PCID 1 caches the PDE
    env.switch(2)
    env.pa(VA)                                 # PCID 2 too
    env.pt.set_entry(VA, 2, pt2 | RW | PTE_U | PTE_A)
    env.mmu.invlpg(FAR)                        # PCID 2's PSCs go
    t = env.tr(VA2)
    assert (t.pa, t.mem_refs) == (NEW2, 4)
    env.switch(1, noflush=True)
    t = env.tr(VA2)                            # PCID 1's PDE-cache entry is still used
    assert (t.pa, t.mem_refs) == (OLD2, 1)


def test_invlpg_of_non_canonical_address_is_a_nop():
    """SDM Vol. 2 INVLPG: in 64-bit mode a non-canonical operand makes INVLPG
    a no-op (no #GP, nothing invalidated), even if its low 48 bits name a
    cached page."""
    env = Env()
    env.map(VA, OLD)
    env.pa(VA)
    env.map(VA, NEW)
    env.mmu.invlpg(VA | 1 << 60)
    assert_stale(env, VA, OLD)
    assert env.tlb.valid_psc_entries(2) == 1


# ---------------------------------------------------------------------------
# INVPCID (SDM 4.10.4.1, Vol. 2 INVPCID)
# ---------------------------------------------------------------------------

def _two_pcids_and_a_global():
    """VA and VA2 cached in PCIDs 1 and 2, GVA cached global; all remapped."""
    env = Env(pcide=True, pge=True)
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    env.map(GVA, GOLD, RW | PTE_G)
    for pcid in (1, 2):
        env.switch(pcid, noflush=True)
        env.pa(VA), env.pa(VA2), env.pa(GVA)
    env.map(VA, NEW)
    env.map(VA2, NEW2)
    env.map(GVA, GNEW, RW | PTE_G)
    return env                                 # current PCID 2


def test_invpcid_type0_one_address_one_pcid_not_globals():
    """SDM INVPCID type 0: mappings for the address in the given PCID,
    except global translations; other addresses and PCIDs untouched."""
    env = _two_pcids_and_a_global()
    env.mmu.invpcid(0, 1, VA)                  # executed in PCID 2, for PCID 1
    env.mmu.invpcid(0, 1, GVA)                 # a global translation: kept
    assert_stale(env, VA, OLD)                 # PCID 2's entry untouched
    env.switch(1, noflush=True)
    assert_fresh(env, VA, NEW)
    assert_stale(env, VA2, OLD2)
    assert_stale(env, GVA, GOLD)


def test_invpcid_type0_flushes_the_pscs_its_address_uses():
    """SDM 4.10.4.1: INVPCID type 0 invalidates the mappings of the PCID
    "that would be used to translate the linear address" -- its
    paging-structure-cache entries too: INVPCID of VA2 drops the PDE-cache
    entry of VA2's 2 MiB region, so a third page there walks the new PDE,
    while VA's own TLB entry (another page) stays."""
    env = Env(pcide=True)
    env.map(VA, OLD)
    env.map(VA2, OLD2)
    env.map(VA + 0x2000, OLD2 + 0x1000)
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)
    env.mem.write_u64(pt2 + 2 * 8, (NEW2 + 0x1000) | RW)
    env.pa(VA)
    env.pt.set_entry(VA, 2, pt2 | RW | PTE_U | PTE_A)
    env.mmu.invpcid(0, 2, VA2)                 # another PCID: PCID 1's PSCs stay
    t = env.tr(VA + 0x2000)
    assert (t.pa, t.mem_refs) == (OLD2 + 0x1000, 1)
    env.mmu.invpcid(0, 1, VA2)
    t = env.tr(VA2)
    assert (t.pa, t.mem_refs) == (NEW2, 4)
    assert_stale(env, VA, OLD)


def test_invpcid_type1_one_pcid_not_globals():
    """SDM INVPCID type 1: all mappings of the PCID except global ones."""
    env = _two_pcids_and_a_global()
    env.mmu.invpcid(1, 1)
    assert_stale(env, VA, OLD)                 # PCID 2
    env.switch(1, noflush=True)
    assert_fresh(env, VA, NEW)
    assert_fresh(env, VA2, NEW2)
    assert_stale(env, GVA, GOLD)


def test_invpcid_type2_everything_including_globals():
    """SDM INVPCID type 2: all mappings of all PCIDs, globals included."""
    env = _two_pcids_and_a_global()
    env.mmu.invpcid(2, 0)
    assert env.tlb.valid_entries() == 0
    assert_fresh(env, VA, NEW)
    assert_fresh(env, GVA, GNEW)
    env.switch(1, noflush=True)
    assert_fresh(env, VA2, NEW2)


def test_invpcid_type3_everything_but_globals():
    """SDM INVPCID type 3: all mappings of all PCIDs except globals."""
    env = _two_pcids_and_a_global()
    env.mmu.invpcid(3, 0)
    assert_fresh(env, VA, NEW)
    assert_stale(env, GVA, GOLD)
    env.switch(1, noflush=True)
    assert_fresh(env, VA2, NEW2)
    assert_stale(env, GVA, GOLD)
    assert env.tlb.stats.flushes_by_cause["invpcid"] == 1


@pytest.mark.parametrize("kind,pcid,va,pcide", [
    (4, 0, 0, True),                       # type > 3
    (-1, 0, 0, True),
    (0, 0x1000, VA, True),                 # descriptor bits 63:12 not zero
    (1, 0x1000, 0, True),
    (2, 0x1000, 0, True),
    (3, 1 << 40, 0, True),
    (0, 1, VA, False),                     # PCID != 0 with CR4.PCIDE=0, types 0/1
    (1, 1, 0, False),
    (0, 1, 0x0000_8000_0000_0000, True),   # type 0, non-canonical address
])
def test_invpcid_gp_cases_invalidate_nothing(kind, pcid, va, pcide):
    """SDM Vol. 2 INVPCID, exceptions: #GP(0) for a type above 3, for
    INVPCID_DESC[63:12] != 0, for type 0/1 with a non-zero PCID while
    CR4.PCIDE=0, and for type 0 with a non-canonical address.  A faulting
    instruction has no effect."""
    env = Env(pcide=pcide, pge=True)
    env.map(VA, OLD)
    env.map(GVA, GOLD, RW | PTE_G)
    env.pa(VA), env.pa(GVA)
    env.map(VA, NEW)
    env.map(GVA, GNEW, RW | PTE_G)
    with pytest.raises(GeneralProtection):
        env.mmu.invpcid(kind, pcid, va)
    assert_stale(env, VA, OLD)
    assert_stale(env, GVA, GOLD)


@pytest.mark.parametrize("kind,pcid,va", [
    (2, 7, 0),                             # types 2/3 ignore the PCID field's value
    (3, 7, 0),
    (1, 0, 0x0000_8000_0000_0000),         # the address is used by type 0 only
])
def test_invpcid_non_gp_cases_with_pcide0(kind, pcid, va):
    """SDM Vol. 2 INVPCID: the PCID!=0 check with PCIDE=0 is for types 0 and
    1 only, and the canonical check for type 0 only."""
    env = Env(pcide=False)
    env.map(VA, OLD)
    env.pa(VA)
    env.map(VA, NEW)
    env.mmu.invpcid(kind, pcid, va)
    assert_fresh(env, VA, NEW)


# ---------------------------------------------------------------------------
# Page faults invalidate (SDM 4.10.4.1, 4.10.4.3)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("grant,access,user,ec", [
    (PTE_W, "w", False, ptemu.PF_P | ptemu.PF_W),         # R/W 0 -> 1
    (PTE_U, "r", True, ptemu.PF_P | ptemu.PF_U),          # U/S 0 -> 1
])
def test_spurious_fault_then_success(grant, access, user, ec):
    """SDM 4.10.4.3: raising rights without invalidating may give one
    "spurious" #PF from the stale entry; SDM 4.10.4.1: that #PF invalidates
    the page's entries, so the retried access succeeds (Linux relies on this
    instead of flushing when it makes a PTE writable)."""
    env = Env()
    env.map(VA, OLD, PTE_P | PTE_A | PTE_D)    # read-only, supervisor
    env.pa(VA)                                 # cached read-only
    env.map(VA, OLD, PTE_P | PTE_A | PTE_D | grant)
    with pytest.raises(PageFault) as ei:
        env.tr(VA + 8, access, user)
    assert ei.value.error_code == ec and ei.value.cr2 == VA + 8
    t = env.tr(VA + 8, access, user)
    assert t.pa == OLD + 8 and not t.tlb_hit
    s = env.tlb.stats
    assert s.fault_invalidations == 1 and s.flushes_by_cause["page_fault"] == 1


def test_not_present_is_not_cached():
    """SDM 4.10.2.3: the TLBs cache only translations whose entries all have
    P=1; mapping a page after a not-present fault needs no invalidation."""
    env = Env()
    with pytest.raises(PageFault) as ei:
        env.pa(VA)
    assert ei.value.error_code == 0
    env.map(VA, NEW)
    assert env.pa(VA) == NEW


def test_page_fault_invalidates_stale_psc_and_does_not_recur():
    """SDM 4.10.4.1: a #PF invalidates the PSC entries that would be used
    for its address, so a fault caused only by a stale PDE-cache entry does
    not recur.  TLB entries of other pages are not covered."""
    env = Env()
    env.map(VA, OLD)                           # old table: VA2 not present
    pt2 = env.pt.alloc_frame()
    env.mem.write_u64(pt2 + 1 * 8, NEW2 | RW)  # new table: VA2 present
    env.pa(VA)
    env.pt.set_entry(VA, 2, pt2 | RW | PTE_U | PTE_A)
    with pytest.raises(PageFault) as ei:
        env.pa(VA2)                            # walked from the stale PDE cache
    assert ei.value.error_code == 0 and ei.value.level == 1
    t = env.tr(VA2)
    assert (t.pa, t.mem_refs) == (NEW2, 4)
    assert_stale(env, VA, OLD)


def test_page_fault_from_tlb_hit_invalidates_only_that_page():
    """SDM 4.10.4.1: the #PF invalidates the entries for the faulting page;
    another page's stale entry stays."""
    env = Env()
    env.map(VA, OLD, PTE_P | PTE_A | PTE_D)
    env.map(VA2, OLD2, PTE_P | PTE_A | PTE_D)
    env.pa(VA), env.pa(VA2)
    env.map(VA, NEW, RW | PTE_A | PTE_D)
    env.map(VA2, NEW2, RW | PTE_A | PTE_D)
    with pytest.raises(PageFault):
        env.tr(VA, "w")
    assert env.pa(VA, "w") == NEW
    assert_stale(env, VA2, OLD2)


# ---------------------------------------------------------------------------
# Accessed and dirty flags with a TLB (SDM 4.8, 4.10.2.3)
# ---------------------------------------------------------------------------

def test_write_through_clean_entry_walks_again_and_sets_d():
    """SDM 4.8: every write sets D in the leaf.  A read caches the entry with
    D=0; a later write cannot take it from the TLB and walks again, setting D
    in memory; after that, writes hit."""
    env = Env()
    pte = env.map(VA, OLD, RW)
    env.pa(VA)
    assert env.mem.read_u64(pte) & (PTE_A | PTE_D) == PTE_A
    t = env.tr(VA, "w")
    assert t.pa == OLD and not t.tlb_hit and t.mem_refs >= 1
    assert env.mem.read_u64(pte) & PTE_D
    s = env.tlb.stats
    assert (s.walks, s.dirty_rewalks) == (2, 1)
    t = env.tr(VA, "w")
    assert t.tlb_hit
    assert env.tlb.stats.walks == 2


def test_cleared_d_is_not_set_again_while_cached_dirty():
    """SDM 4.8, 4.10.4.3: software clearing D without invalidating may miss
    later writes; after INVLPG the next write sets D again."""
    env = Env()
    pte = env.map(VA, OLD, RW)
    env.pa(VA, "w")
    env.mem.write_u64(pte, env.mem.read_u64(pte) & ~PTE_D)
    assert env.tr(VA, "w").tlb_hit
    assert not env.mem.read_u64(pte) & PTE_D
    env.mmu.invlpg(VA)
    env.pa(VA, "w")
    assert env.mem.read_u64(pte) & PTE_D


def test_accessed_set_in_every_entry_before_caching():
    """SDM 4.10.2.3: the processor caches a translation only with A=1 in
    every entry used, setting them first; SDM 4.8 / 4.10.4.3: an A cleared
    by software is not set again while the translation is cached."""
    env = Env()
    pte = env.map(VA, OLD, RW)                 # tables created with P|W|U, A=0
    levels = [env.pt.entry_pa(VA, level) for level in (4, 3, 2, 1)]
    assert all(not env.mem.read_u64(epa) & PTE_A for epa in levels)
    env.pa(VA)
    assert env.tlb.valid_entries() == 1
    assert all(env.mem.read_u64(epa) & PTE_A for epa in levels)
    env.mem.write_u64(pte, env.mem.read_u64(pte) & ~PTE_A)
    assert env.tr(VA).tlb_hit
    assert not env.mem.read_u64(pte) & PTE_A
    env.mmu.invlpg(VA)
    env.pa(VA)
    assert env.mem.read_u64(pte) & PTE_A


# ---------------------------------------------------------------------------
# Rights are cached, the decision is not (SDM 4.10.2.2, 4.6)
# ---------------------------------------------------------------------------

def test_wp_change_applies_to_cached_entries():
    """SDM 4.10.2.2: a TLB entry holds the rights (R/W ANDed over the
    levels), not a decision; CR0.WP is applied per access (SDM 4.6), so a
    supervisor write to a cached read-only page succeeds with WP=0 and
    faults with WP=1, both from the TLB, no flush needed."""
    env = Env()
    env.map(VA, OLD, PTE_P | PTE_A | PTE_D)
    env.pa(VA)
    env.mmu.write_cr0(env.cpu.cr0 & ~CR0_WP)
    t = env.tr(VA, "w")
    assert t.tlb_hit and t.pa == OLD and not t.writable
    env.mmu.write_cr0(env.cpu.cr0 | CR0_WP)
    with pytest.raises(PageFault) as ei:
        env.tr(VA, "w")
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_W


def test_nx_is_cached_as_part_of_the_rights():
    """SDM 4.10.2.2: XD ORed over the levels is part of a TLB entry; a
    fetch through a cached data translation of an XD page faults with I/D."""
    env = Env()
    env.map(VA, OLD, RW | PTE_NX | PTE_A | PTE_D)
    env.pa(VA)                                 # Tlb.simple(): one array for data and fetch
    with pytest.raises(PageFault) as ei:
        env.tr(VA, "x")
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_I
    s = env.tlb.stats
    assert (s.walks, s.by_access["fetch"]["l1_hits"]) == (1, 1)   # decided from the TLB
