"""Memory virtualization: a hypervisor with shadow page tables.

Hypervisor(host bytes).create_vm(guest bytes, paging="shadow"|"paravirt")
gives a VM whose guest runs on the C MMU over shadow tables.  By layer:
host.py (host memory, frame allocator, VM registry), vm.py (the VM and its
guest-physical memory), vcpu.py (the guest's operations and one method per
exit), shadow.py (the shadow MMU), paravirt.py (hypercalls), exits.py
(exit reasons, counters, exceptions), nested.py (paging="nested": EPT),
demo.py (`ptemu demo`); docs/shadow-mmu.md walks every event flow and
docs/layout.md describes every file.
"""
from ptemu.hypervisor.exits import (  # noqa: F401
    EXIT_REASONS, COUNTERS, VmStats, ExitRecord, GuestMemoryError, HostMemoryExhausted,
    HypercallRejected, ShadowMmuError,
)
from ptemu.hypervisor.shadow import ShadowMmu, ShadowPage, audit  # noqa: F401
from ptemu.hypervisor.host import Hypervisor  # noqa: F401
from ptemu.hypervisor.vcpu import VCpu  # noqa: F401
from ptemu.hypervisor.vm import VirtualMachine, GuestPhys  # noqa: F401

__all__ = ["Hypervisor", "VirtualMachine", "VCpu", "GuestPhys", "ShadowMmu", "ShadowPage",
           "audit", "EXIT_REASONS", "COUNTERS", "VmStats", "ExitRecord", "GuestMemoryError",
           "HostMemoryExhausted", "HypercallRejected", "ShadowMmuError"]
