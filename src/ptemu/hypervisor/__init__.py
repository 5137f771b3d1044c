"""Memory virtualization: a hypervisor with shadow page tables.

Hypervisor(host bytes).create_vm(guest bytes, paging="shadow"|"paravirt")
gives a VM whose guest runs on the C MMU over shadow tables; see vm.py
(the VM, its vCPU and the exit handlers), shadow.py (the shadow MMU),
paravirt.py (hypercalls), exits.py (counters, exceptions), demo.py
(`ptemu demo`) and docs/shadow-mmu.md (every event flow, step by step).
paging="nested" gives an EPT VM instead (nested.py).
"""
from ptemu.hypervisor.exits import (  # noqa: F401
    EXIT_REASONS, COUNTERS, VmStats, ExitRecord, GuestMemoryError, HostMemoryExhausted,
    HypercallRejected, ShadowMmuError,
)
from ptemu.hypervisor.shadow import ShadowMmu, ShadowPage, audit  # noqa: F401
from ptemu.hypervisor.vm import Hypervisor, VirtualMachine, VCpu, GuestPhys  # noqa: F401

__all__ = ["Hypervisor", "VirtualMachine", "VCpu", "GuestPhys", "ShadowMmu", "ShadowPage",
           "audit", "EXIT_REASONS", "COUNTERS", "VmStats", "ExitRecord", "GuestMemoryError",
           "HostMemoryExhausted", "HypercallRejected", "ShadowMmuError"]
