"""CpuState validation, the live cpu of an Mmu, and the MOV-to-CR #GP(0)
cases of Mmu.write_cr0/write_cr3/write_cr4 (Intel SDM Vol. 3A 2.5, 4.1,
4.5.2, 4.10.4.1; Vol. 2 MOV to/from control registers).

A refused state is InvalidInput (a ValueError): legacy 32-bit and PAE
paging are not modelled, and impossible register values are refused.  An
architectural MOV that the SDM says faults is GeneralProtection, and leaves
the state as it was.
"""
import pytest

import ptemu
from ptemu import CpuState, Mmu, PhysicalMemory
from ptemu.pagetable import PageTableBuilder

PE, WP, PG = ptemu.CR0_PE, ptemu.CR0_WP, ptemu.CR0_PG
PAE, LA57, PCIDE, PGE, SMEP = (ptemu.CR4_PAE, ptemu.CR4_LA57, ptemu.CR4_PCIDE,
                               ptemu.CR4_PGE, ptemu.CR4_SMEP)
LME, LMA = ptemu.EFER_LME, ptemu.EFER_LMA
P = ptemu.PTE_P


def state(cpu):
    return (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer, cpu.cpl, cpu.ac, cpu.pkru, cpu.pkrs,
            cpu.maxphyaddr)


# -------------------------------------------------------- validation --------

def test_defaults():
    cpu = CpuState()
    assert state(cpu) == (0, 0, 0, 0, 0, False, 0, 0, 52)
    assert cpu.levels == 0


@pytest.mark.parametrize("kw", [
    dict(cr0=PE, cr4=LA57),                       # LA57 without PAE
    dict(cr0=PG, cr4=PAE, efer=LME),              # PG without PE
    dict(cr0=PG | PE),                            # legacy 32-bit paging
    dict(cr0=PG | PE, cr4=PAE),                   # PAE paging (no LME)
    dict(cr0=PG | PE, efer=LME),                  # LME without PAE
    dict(cr0=PG | PE, cr4=ptemu.CR4_PSE),         # 32-bit paging with PSE
])
def test_unsupported_or_invalid_modes(kw):
    """SDM 4.1.1: CR0.PG=1 with CR4.PAE=0 is 32-bit paging, PAE=1 with
    LME=0 is PAE paging (neither modelled); PG requires PE (SDM 2.5); LA57
    is a 4-level/5-level form needing PAE."""
    with pytest.raises(ptemu.InvalidInput):
        CpuState(**kw)


@pytest.mark.parametrize("m", [31, 53, 0, 12, 64, -1])
def test_maxphyaddr_range(m):
    """MAXPHYADDR is 32..52 on x86-64 (SDM 4.1.4)."""
    with pytest.raises(ptemu.InvalidInput):
        CpuState(maxphyaddr=m)


@pytest.mark.parametrize("m", [32, 36, 46, 52])
def test_maxphyaddr_accepted(m):
    assert CpuState(maxphyaddr=m).maxphyaddr == m


@pytest.mark.parametrize("cpl", [-1, 4, 1.0, None, True])
def test_cpl_range(cpl):
    with pytest.raises(ptemu.InvalidInput):
        CpuState(cpl=cpl)


@pytest.mark.parametrize("name", ["pkru", "pkrs"])
def test_pk_registers_are_32_bit(name):
    """PKRU and IA32_PKRS are 32-bit (SDM 4.6.2)."""
    assert getattr(CpuState(**{name: 0xffffffff}), name) == 0xffffffff
    with pytest.raises(ptemu.InvalidInput):
        CpuState(**{name: 1 << 32})
    with pytest.raises(ptemu.InvalidInput):
        CpuState(**{name: -1})


@pytest.mark.parametrize("reg", ["cr0", "cr3", "cr4", "efer"])
@pytest.mark.parametrize("value", [-1, 1 << 64, "0", 1.0])
def test_registers_must_be_u64(reg, value):
    with pytest.raises(ptemu.InvalidInput):
        CpuState(**{reg: value})


@pytest.mark.parametrize("reg", ["cr0", "cr4"])
def test_cr0_cr4_high_bits_refused(reg):
    """SDM 2.5: bits 63:32 of CR0 and CR4 are reserved."""
    with pytest.raises(ptemu.InvalidInput):
        CpuState(**{reg: 1 << 40})


def test_lma_set_automatically():
    """SDM "Initializing IA-32e Mode" (9.8.5) / 2.2.1: EFER.LMA is set by
    the processor when paging is enabled with PAE and LME; it need not be
    given."""
    cpu = CpuState(cr0=PG | PE, cr4=PAE, efer=LME)
    assert cpu.efer & LMA
    assert cpu.levels == 4
    assert CpuState(cr0=PG | PE, cr4=PAE | LA57, efer=LME).levels == 5


def test_lma_refused_outside_long_mode():
    with pytest.raises(ptemu.InvalidInput):
        CpuState(cr0=PE, efer=LME | LMA)


def test_invalid_assignment_leaves_state():
    """A refused assignment changes nothing."""
    cpu = CpuState.long_mode(cr3=0x1000)
    before = state(cpu)
    for name, value in (("cr4", 0), ("cr0", PG), ("maxphyaddr", 99), ("cpl", 7),
                        ("pkru", 1 << 33), ("cr3", -5), ("efer", 0)):
        with pytest.raises(ptemu.InvalidInput):
            setattr(cpu, name, value)
        assert state(cpu) == before


# ------------------------------------------------------------- live cpu -----

def image():
    mem = PhysicalMemory(1 << 20)
    b = PageTableBuilder(mem)
    b.map(0x1000, 0x80000, flags=P)               # supervisor, read-only
    return mem, b


def test_cpu_is_live_cr0_wp():
    """SDM 4.6.1: CR0.WP decides supervisor writes to read-only pages; a
    change to mmu.cpu.cr0 applies to the next translate."""
    mem, b = image()
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3))
    with pytest.raises(ptemu.PageFault):
        mmu.translate(0x1000, "w")
    mmu.cpu.cr0 = PG | PE                          # WP cleared
    assert mmu.translate(0x1000, "w").pa == 0x80000
    mmu.cpu.cr0 = PG | PE | WP
    with pytest.raises(ptemu.PageFault):
        mmu.translate(0x1000, "w")


def test_cpu_is_live_shared_object():
    """The CpuState given to Mmu is the one it uses (not a copy)."""
    mem, b = image()
    cpu = CpuState.long_mode(cr3=b.cr3)
    mmu = Mmu(mem, cpu)
    assert mmu.cpu is cpu
    cpu.cpl = 3
    with pytest.raises(ptemu.PageFault) as ei:
        mmu.translate(0x1000)
    assert ei.value.error_code == ptemu.PF_P | ptemu.PF_U


def test_cpu_is_live_cr3_cr4_efer():
    mem, b = image()
    other = PageTableBuilder(mem, table_start=0x40000)
    other.map(0x1000, 0x90000, flags=P)
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3))
    assert mmu.translate(0x1000).pa == 0x80000
    mmu.cpu.cr3 = other.cr3
    assert mmu.translate(0x1000).pa == 0x90000
    mmu.cpu.cr4 = PAE                              # still long mode; fine
    mmu.cpu.efer = LME                             # NXE off: live as well
    assert mmu.cpu.efer & LMA


def test_cpu_copy_is_independent():
    cpu = CpuState.long_mode(cr3=0x1000, pkru=5)
    c2 = cpu.copy()
    assert state(c2) == state(cpu)
    c2.cr3 = 0x2000
    assert cpu.cr3 == 0x1000


# -------------------------------------------------- MOV to CRn #GP cases ----

def long_mmu(maxphyaddr=52, cr4=0):
    mem, b = image()
    return Mmu(mem, CpuState.long_mode(cr3=b.cr3, maxphyaddr=maxphyaddr, cr4=cr4))


@pytest.mark.parametrize("bit", [40, 51, 62])
def test_write_cr3_reserved_bits_gp(bit):
    """SDM 4.5.2 / MOV CR3: bits 62:MAXPHYADDR of the source are reserved
    (#GP(0)); the state is unchanged."""
    mmu = long_mmu(maxphyaddr=40)
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr3(0x2000 | (1 << bit))
    assert state(mmu.cpu) == before


def test_write_cr3_below_maxphyaddr_ok():
    mmu = long_mmu(maxphyaddr=40)
    mmu.write_cr3((1 << 39) | 0x2000)
    assert mmu.cpu.cr3 == (1 << 39) | 0x2000


def test_write_cr3_bit63_without_pcide_gp():
    """With CR4.PCIDE=0 bit 63 is not the no-flush hint; it is reserved."""
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr3((1 << 63) | 0x2000)
    assert state(mmu.cpu) == before


def test_write_cr3_bit63_with_pcide_not_stored():
    """SDM 4.10.4.1: with PCIDE=1 bit 63 of the source is the no-flush hint
    and is not written to CR3."""
    mmu = long_mmu()
    mmu.write_cr4(mmu.cpu.cr4 | PCIDE)
    mmu.write_cr3((1 << 63) | 0x2000 | 5)
    assert mmu.cpu.cr3 == 0x2005
    assert mmu.cpu.pcid == 5


def test_write_cr3_low_bits_not_reserved():
    """SDM 4.5.2: with PCIDE=0 CR3 bits 11:0 hold PWT/PCD and ignored bits:
    no #GP."""
    mmu = long_mmu()
    mmu.write_cr3(0x2018)
    assert mmu.cpu.cr3 == 0x2018
    assert mmu.cpu.pcid == 0


def test_write_cr4_pcide_needs_cr3_low_bits_zero():
    """SDM 4.10.1 / MOV CR4: setting CR4.PCIDE while CR3[11:0] != 0 is
    #GP(0); with CR3[11:0] = 0 it is allowed."""
    mmu = long_mmu()
    mmu.write_cr3(mmu.cpu.cr3 | 0x8)
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr4(mmu.cpu.cr4 | PCIDE)
    assert state(mmu.cpu) == before
    mmu.write_cr3(mmu.cpu.cr3 & ~0xfff)
    mmu.write_cr4(mmu.cpu.cr4 | PCIDE)
    assert mmu.cpu.cr4 & PCIDE


def test_write_cr4_pcide_outside_long_mode_gp():
    """MOV CR4: PCIDE=1 outside IA-32e mode is #GP(0)."""
    mem = PhysicalMemory(4096)
    mmu = Mmu(mem, CpuState(cr0=PE, cr4=PAE))
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr4(PAE | PCIDE)
    assert mmu.cpu.cr4 == PAE


@pytest.mark.parametrize("la57", [False, True])
def test_write_cr4_la57_cannot_change_in_long_mode(la57):
    """SDM 4.1.1 / MOV CR4: CR4.LA57 cannot be changed while EFER.LMA=1:
    #GP(0), state unchanged."""
    mem, b = image()
    mmu = Mmu(mem, CpuState.long_mode(cr3=b.cr3, la57=la57))
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr4(mmu.cpu.cr4 ^ LA57)
    assert state(mmu.cpu) == before


def test_write_cr4_la57_allowed_with_paging_off():
    """Outside long mode LA57 may be set (it takes effect when paging is
    enabled)."""
    mmu = Mmu(PhysicalMemory(4096), CpuState(cr0=PE, cr4=PAE))
    mmu.write_cr4(PAE | LA57)
    assert mmu.cpu.cr4 == PAE | LA57


def test_write_cr4_pae_cannot_be_cleared_in_long_mode():
    """MOV CR4 (64-bit mode): clearing PAE would leave IA-32e mode: #GP(0)."""
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr4(mmu.cpu.cr4 & ~PAE)
    assert state(mmu.cpu) == before


def test_write_cr4_high_bits_gp():
    """SDM 2.5: CR4 bits 63:32 reserved -> #GP(0)."""
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr4(mmu.cpu.cr4 | (1 << 32))
    assert state(mmu.cpu) == before


def test_write_cr4_ok_changes_state():
    mmu = long_mmu()
    mmu.write_cr4(mmu.cpu.cr4 | PGE | SMEP)
    assert mmu.cpu.cr4 & (PGE | SMEP) == PGE | SMEP


def test_write_cr0_pg_cannot_be_cleared_in_long_mode():
    """MOV CR0 (64-bit mode): clearing CR0.PG is #GP(0); state unchanged."""
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr0(mmu.cpu.cr0 & ~PG)
    assert state(mmu.cpu) == before
    mmu.write_cr0(mmu.cpu.cr0 & ~WP)               # other bits are fine
    assert not mmu.cpu.cr0 & WP


def test_write_cr0_pg_without_pe_gp():
    """MOV CR0: setting PG while PE is 0 is an invalid combination: #GP(0)
    (Vol. 2, MOV to CR0 protected-mode exceptions), not InvalidInput."""
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr0(PG | WP)
    assert state(mmu.cpu) == before


def test_write_cr0_high_bits_gp():
    """SDM 2.5: writing a 1 to CR0 bits 63:32 is #GP(0)."""
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr0(mmu.cpu.cr0 | (1 << 32))
    assert state(mmu.cpu) == before


def test_write_cr0_enable_long_mode_paging_without_pae_gp():
    """SDM "Initializing IA-32e Mode" (9.8.5) / MOV CR0: setting PG with
    EFER.LME=1 and CR4.PAE=0 is #GP(0)."""
    mmu = Mmu(PhysicalMemory(4096), CpuState(cr0=PE, efer=LME))
    with pytest.raises(ptemu.GeneralProtection):
        mmu.write_cr0(PE | PG)
    assert mmu.cpu.cr0 == PE


def test_write_cr0_enable_long_mode_paging():
    """SDM "Initializing IA-32e Mode" (9.8.5): PG set with PAE and LME
    activates IA-32e mode (LMA=1)."""
    mmu = Mmu(PhysicalMemory(4096), CpuState(cr0=PE, cr4=PAE, efer=LME))
    mmu.write_cr0(PE | PG)
    assert mmu.cpu.efer & LMA and mmu.cpu.levels == 4


def test_gp_is_mmufault_not_invalid_input():
    mmu = long_mmu()
    with pytest.raises(ptemu.GeneralProtection) as ei:
        mmu.write_cr3(1 << 62)
    assert isinstance(ei.value, ptemu.MmuFault)
    assert not isinstance(ei.value, ValueError)


@pytest.mark.parametrize("meth", ["write_cr0", "write_cr3", "write_cr4"])
@pytest.mark.parametrize("value", [-1, 1 << 64, "1"])
def test_write_cr_bad_values(meth, value):
    mmu = long_mmu()
    before = state(mmu.cpu)
    with pytest.raises(ptemu.InvalidInput):
        getattr(mmu, meth)(value)
    assert state(mmu.cpu) == before
