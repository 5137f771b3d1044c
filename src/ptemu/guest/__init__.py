"""The guest side: a native reference machine and a small guest kernel.

NativeMachine is the machine contract with no hypervisor (the reference for
"invisible to the guest"); Kernel keeps its page tables in guest memory and
drives any machine of the contract (NativeMachine or a hypervisor VM).
"""
from ptemu.guest.native import NativeMachine, NativeVcpu, HYPERCALLS  # noqa: F401
from ptemu.guest.kernel import (  # noqa: F401
    Kernel, Process, Vma, SegmentationFault, GuestKernelError, GuestOutOfMemory,
    DIRECT_MAP, USER_TOP, USER_TOP_LA57, PTE_COW, PTE_PROTNONE, DEFAULT_LAYOUT,
)

__all__ = ["NativeMachine", "NativeVcpu", "HYPERCALLS", "Kernel", "Process", "Vma",
           "SegmentationFault", "GuestKernelError", "GuestOutOfMemory", "DIRECT_MAP",
           "USER_TOP", "USER_TOP_LA57", "PTE_COW", "PTE_PROTNONE", "DEFAULT_LAYOUT"]
