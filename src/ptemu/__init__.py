"""ptemu: a reference x86-64 MMU emulator.

The public names of shared/API.md; see README.md.
"""
from ptemu.bits import (  # noqa: F401
    CR0_PE, CR0_WP, CR0_PG,
    CR4_PSE, CR4_PAE, CR4_PGE, CR4_PCIDE, CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_PKS, CR4_LA57,
    EFER_LME, EFER_LMA, EFER_NXE,
    PTE_P, PTE_W, PTE_U, PTE_PWT, PTE_PCD, PTE_A, PTE_D, PTE_PS, PTE_G, PTE_NX,
    PF_P, PF_W, PF_U, PF_RSVD, PF_I, PF_PK,
)
from ptemu._native import (  # noqa: F401
    PtemuError, InvalidInput, ImageError, MmuFault, PageFault, GeneralProtection,
)
from ptemu.memory import PhysicalMemory  # noqa: F401
from ptemu.mmu import (  # noqa: F401
    CpuState, Mmu, Translation, BatchResult, RunResult, Mapping, TRACE_DTYPE,
)
from ptemu.tlb import Tlb, TlbArray  # noqa: F401
from ptemu.hypervisor import Hypervisor  # noqa: F401

__version__ = "0.1.0"
