#!/usr/bin/env python3
"""A hostile guest against the shadow MMU (issue 5).

One input is a short program run by a guest that trusts nothing: it writes
arbitrary values into its own page tables (by DMA/paging-off writes through
`vm.phys`, and by stores through its own mappings, which the hypervisor must
trap and emulate), loads arbitrary CR3 values, issues arbitrary INVLPGs,
toggles CR0.WP/CR4 bits, CPL, PKRU, and makes accesses and bulk runs.  A
second, quiet VM (the victim) shares the hypervisor's host memory.

After EVERY step the harness checks:
  isolation  * the victim's guest memory is byte for byte what it was, and
               its shadow state passes audit();
             * every leaf of the hostile VM's real (shadow) tables maps a host
               frame that backs the hostile VM's own guest memory -- never a
               victim frame, never a shadow page, never a free frame; a
               writable leaf never maps a write-protected guest page table;
  coherence  * ptemu.hypervisor.audit(vm) finds nothing: every synced shadow
               entry follows the guest entry it shadows, with rights no wider;
               rmap and write-protection bookkeeping hold;
  contract   * only documented exceptions reach the guest: ptemu.PageFault
               (the injection), ptemu.GeneralProtection, ptemu.InvalidInput
               (GuestMemoryError, HypercallRejected, bad arguments); never
               ShadowMmuError, HostMemoryExhausted or anything else.
And at "probe" steps (after the guest's own INVLPG of the address, which
the SDM says removes any stale translation): the vCPU's answer for an access
-- its guest-physical address, or the #PF error code -- equals the
pure-Python reference walk (tests/refwalk.py) over the guest-physical image,
and so do the guest's accessed/dirty bits afterwards.

Both ways (DESIGN.md "Python decides, C executes"): every input runs twice
in lockstep, on a VM with the C fast paths (create_vm's default) and on one
with fast_paths=False (the all-Python reference); after every step the two
must agree on the outcome (the exception, its error code and CR2), every
counter except exits.FAST_COUNTERS, and the whole of host memory (guest
memory, shadow pages, the victim's).

The step counter (`steps` in the final line) counts guest operations.
Run:  python fuzz/fuzz_hostile_guest.py -max_total_time=60 [CORPUS_DIR]
      fuzz/run.sh hostile 60
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ByteInput, Finding, U64, ROOT, main, instrumented, feedback_tree  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
try:
    import refwalk  # noqa: E402
except ImportError:  # pragma: no cover
    refwalk = None

import ptemu  # noqa: E402
from ptemu import bits  # noqa: E402

try:
    from ptemu.hypervisor import Hypervisor, audit  # noqa: E402
    from ptemu.hypervisor.exits import (ShadowMmuError, HostMemoryExhausted,  # noqa: E402
                                        FAST_COUNTERS, STORE_DTYPE)
except ImportError:  # pragma: no cover - the hypervisor is being written
    Hypervisor = None

DOCUMENTED = (ptemu.InvalidInput, ptemu.PageFault, ptemu.GeneralProtection)
PAGE = 4096
GUEST_FRAMES = 16
VICTIM_FRAMES = 8
P, W, U, A, D, PS = (bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_A, bits.PTE_D, bits.PTE_PS)
ADDR = 0x000ffffffffff000
ACCESSES = ("r", "w", "x")

#: Guest operations performed over the life of the process, and when the
#: count was last printed (libFuzzer ends the process with exit(), so the
#: count is printed as it goes, not only at exit).
STEPS = [0]
_LAST_REPORT = [0.0]


# ---------------------------------------------------------------------------
# Coverage feedback: which hypervisor counters a step moved.
# ---------------------------------------------------------------------------
_FB_A = ("pf_fixed", "pf_guest", "pf_emulate", "pf_mmio", "pf_spurious", "mmu_pte_write")
_FB_B = ("mmu_pte_updated", "mmu_pde_zapped", "mmu_flooded", "mmu_misaligned", "mmu_unsync",
         "mmu_sync")
_FB_C = ("mmu_cache_miss", "mmu_shadow_zapped", "mmu_recycled", "prev_root_hit",
         "root_reload", "mmu_write_protect")
_fb = [feedback_tree(6, "fb_%d" % i) for i in range(3)]
_fb_step = feedback_tree(6, "fb_step")


def _feedback(before, after, kind, outcome):
    for tree, names in zip(_fb, (_FB_A, _FB_B, _FB_C)):
        sig = 0
        for i, n in enumerate(names):
            if after[n] != before[n]:
                sig |= 1 << i
        tree(sig)
    _fb_step(kind << 2 | outcome)


# ---------------------------------------------------------------------------
# The world: a hypervisor, a victim VM, a hostile VM with a starting table.
# ---------------------------------------------------------------------------
def _boot_tables(vm, flags):
    """PML4 at gfn 1 -> PDPT gfn 2 -> PD gfn 3 -> PT gfn 4, identity-mapping
    guest-physical 0..GUEST_FRAMES pages at va 0 (the guest's direct map)."""
    ph = vm.phys
    ph.write_u64(1 * PAGE, 2 * PAGE | P | W | U)
    ph.write_u64(2 * PAGE, 3 * PAGE | P | W | U)
    ph.write_u64(3 * PAGE, 4 * PAGE | P | W | U)
    for g in range(GUEST_FRAMES):
        ph.write_u64(4 * PAGE + 8 * g, g * PAGE | flags)


class World:
    __slots__ = ("hv", "vm", "victim", "victim_image", "unsync")

    def __init__(self, inp, fast_paths=True):
        ctl = inp.u8()
        # (bits 0-1: a paravirt VM in a quarter of the worlds, with and without
        # prefetch, bit 2 -- prefetch keeps the C fast paths off)
        paging = "paravirt" if ctl & 3 == 3 else "shadow"
        unsync = paging == "shadow" and bool(ctl & 8)
        limit = (None, None, 8, 12)[ctl >> 4 & 3]
        spare = (64, 64, 24, 16)[ctl >> 6 & 3]     # host frames beyond guest memory
        self.hv = Hypervisor((GUEST_FRAMES + VICTIM_FRAMES + spare) * PAGE)
        self.victim = self.hv.create_vm(VICTIM_FRAMES * PAGE, populate=True)
        self.victim.phys.write(0, bytes(range(256)) * (VICTIM_FRAMES * PAGE // 256))
        self.vm = self.hv.create_vm(GUEST_FRAMES * PAGE, paging=paging, unsync=unsync,
                                    shadow_limit=limit, prefetch=bool(ctl & 4),
                                    tlb=ptemu.Tlb.simple(entries=16, ways=4),
                                    fast_paths=fast_paths)
        self.unsync = unsync
        leaf = P | W | U | (A | D if inp.bool() else 0)
        _boot_tables(self.vm, leaf)
        if inp.u8() != 0xff:
            self.vm.vcpu.write_cr3(1 * PAGE)
        # The victim runs a little too, so that it has shadow pages to protect.
        _boot_tables(self.victim, P | W | U) if VICTIM_FRAMES > 4 else None
        self.victim.vcpu.write_cr3(1 * PAGE)
        self.victim.vcpu.access(5 * PAGE, "w")
        self.victim_image = self.victim.phys.read(0, VICTIM_FRAMES * PAGE)


# ---------------------------------------------------------------------------
# Decoding guest-controlled values
# ---------------------------------------------------------------------------
def _gpte(inp):
    """A guest entry: mostly a guest frame with some flags; sometimes past the
    VM's memory (MMIO), a wild address, reserved bits, a large page."""
    ctl = inp.u8()
    flags = inp.u16() & 0xfff & ~PS
    if ctl & 7:
        flags |= P
    where = ctl >> 3 & 7
    if where == 0:
        addr = inp.u64() & ADDR
    elif where == 1:
        addr = (GUEST_FRAMES + inp.u8() % 64) * PAGE          # MMIO
    else:
        addr = (inp.u8() % GUEST_FRAMES) * PAGE
    if ctl & 0xc0 == 0xc0:
        flags |= PS
    high = 0
    c2 = inp.u8()
    if c2 & 1:
        high |= bits.PTE_NX
    if c2 & 2:
        high |= (c2 >> 2 & 15) << bits.PTE_PKEY_SHIFT
    if c2 & 0xc0 == 0xc0 and not c2 & 2:
        high |= inp.u64() & 0x7ff0000000000000
    return (addr | flags | high) & U64


def _va(inp):
    ctl = inp.u8()
    if ctl == 0xff:
        return inp.u64()
    if ctl & 0xc0 == 0xc0:   # somewhere else in the address space: other PML4/PDPT/PD slots
        return ((inp.u8() & 3) << 39 | (inp.u8() & 3) << 30 | (inp.u8() & 3) << 21
                | (inp.u8() % GUEST_FRAMES) << 12 | (inp.u16() & 0xff8))
    return (ctl % GUEST_FRAMES) << 12 | (inp.u16() & 0xff8 if ctl & 0x20 else 0)


def _table_slot(inp):
    """The guest-physical address of an entry in one of the guest's tables
    (the boot tables at gfns 1..4, or any other frame)."""
    gfn = (1, 2, 3, 4, 4, 4, inp.u8() % GUEST_FRAMES, 0)[inp.below(8)]
    b = inp.u8()
    idx = b & 15 if b & 0x80 == 0 else ((b & 0x7f) << 2 | 3) & 511
    return gfn * PAGE + idx * 8


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
def st_dma_pte(inp, w):
    w.vm.phys.write_u64(_table_slot(inp), _gpte(inp))


def st_store_pte(inp, w):
    """A guest store into its own page table through the direct map."""
    w.vm.vcpu.store_u64(_table_slot(inp), _gpte(inp))


def st_store(inp, w):
    w.vm.vcpu.store_u64(_va(inp), inp.u64())


def st_store_stream(inp, w):
    """A burst of stores as one stream (the guest kernel's page-table work in
    bulk): into its tables and anywhere else."""
    n = 1 + inp.below(6)
    recs = [(_table_slot(inp) if inp.bool() else _va(inp) & ~7, _gpte(inp)) for _ in range(n)]
    w.vm.vcpu.store_stream(np.array(recs, dtype=STORE_DTYPE))


def st_cr3(inp, w):
    k = inp.u8()
    v = (k % (GUEST_FRAMES + 4)) * PAGE
    if k & 0x80:
        v |= inp.u16() & 0xfff
    if k & 0x60 == 0x60:
        v = inp.u64()
    w.vm.vcpu.write_cr3(v)


def st_invlpg(inp, w):
    w.vm.vcpu.invlpg(_va(inp))


def st_access(inp, w):
    w.vm.vcpu.access(_va(inp), ACCESSES[inp.below(3)])


def st_load(inp, w):
    w.vm.vcpu.load_u64(_va(inp))


def st_run(inp, w):
    n = inp.below(12)
    trace = np.zeros(n, dtype=ptemu.TRACE_DTYPE)
    for i in range(n):
        trace[i] = (_va(inp), inp.below(3), inp.u8() & 3 == 3)
    res = w.vm.vcpu.run(trace, inp.u8() % (n + 1))
    if res.index < n and res.vector not in (ptemu.GeneralProtection.vector, ptemu.PageFault.vector):
        raise Finding("run stopped at %d with vector %r" % (res.index, res.vector))


def st_cr(inp, w):
    k = inp.u8()
    vcpu = w.vm.vcpu
    if k & 1:
        vcpu.write_cr0(vcpu.cpu.cr0 ^ bits.CR0_WP)
    else:
        knob = (bits.CR4_SMEP, bits.CR4_SMAP, bits.CR4_PKE, bits.CR4_PGE, bits.CR4_PCIDE,
                bits.CR4_LA57, bits.CR4_PKS, bits.CR4_PSE)[k >> 1 & 7]
        vcpu.write_cr4(vcpu.cpu.cr4 ^ knob)


def st_state(inp, w):
    """Plain guest-state changes the hypervisor must notice (CPL, AC, PKRU)."""
    k = inp.u8()
    cpu = w.vm.vcpu.cpu
    if k & 3 == 0:
        cpu.cpl = 3 if cpu.cpl == 0 else 0
    elif k & 3 == 1:
        cpu.ac = not cpu.ac
    elif k & 3 == 2:
        cpu.pkru = inp.u32()
    else:
        cpu.efer = cpu.efer ^ bits.EFER_NXE


def st_hypercall(inp, w):
    vcpu = w.vm.vcpu
    k = inp.below(4)
    if k == 0:
        items = [(_table_slot(inp), _gpte(inp)) for _ in range(1 + inp.below(3))]
        vcpu.hypercall("mmu_update", items)
    elif k == 1:
        vcpu.hypercall("new_baseptr", (inp.u8() % GUEST_FRAMES) * PAGE)
    elif k == 2:
        vcpu.hypercall("invlpg", _va(inp))
    else:
        vcpu.hypercall("flush_tlb")


def st_probe(inp, w):
    """Coherence: after the guest's INVLPG of va, the vCPU answers for va as
    the reference walker does over the guest-physical image."""
    if refwalk is None:
        return
    vm = w.vm
    vcpu = vm.vcpu
    cpu = vcpu.cpu
    if not cpu.paging or cpu.eager_accessed:
        return
    va = _va(inp)
    acc = ACCESSES[inp.below(3)]
    if acc == "w" and vm.paging == "paravirt":
        return          # its page-table frames are read-only to the guest by design
    vcpu.invlpg(va)
    if cpu.cr4 & bits.CR4_PGE:
        # INVLPG drops global entries for the page too (SDM 4.10.4.1); a
        # full flush is still needed for other PCIDs' globals in the real TLB.
        pass
    image = vm.phys.read(0, vm.memory_bytes)
    want, after = refwalk.walk_cpu(image, cpu, va, acc)
    want = want.as_tuple()
    try:
        gpa = vcpu.access(va, acc)
        got = ("ok", gpa)
    except ptemu.PageFault as exc:
        got = ("pf", exc.error_code)
    except ptemu.GeneralProtection:
        got = ("gp",)
    exp = ("ok", want[1]) if want[0] == "ok" else want[:2]
    if got != exp:
        raise Finding("probe %s %#x: vCPU %r, reference walk %r (cpu %r)"
                      % (acc, va, got, exp, cpu))
    if want[0] == "ok":
        now = vm.phys.read(0, vm.memory_bytes)
        for epa, _ in want[4]:
            if now[epa:epa + 8] != bytes(after[epa:epa + 8]):
                raise Finding("probe %s %#x: guest entry at gpa %#x is %#x after the access, "
                              "the reference walk leaves %#x" % (
                                  acc, va, epa, int.from_bytes(now[epa:epa + 8], "little"),
                                  int.from_bytes(after[epa:epa + 8], "little")))


def _pv_value(inp):
    """An entry value for mmu_update: a guest entry, mostly accessed (so that a
    shadow of its table has an spte to follow), sometimes a large page or a
    writable map of one of the guest's own page tables (Xen refuses those)."""
    c = inp.u8()
    v = _gpte(inp)
    if c & 3:
        v |= P | A
    if c & 0x1c == 0x1c:
        v = (v & ~ADDR) | (1 + inp.below(4)) * PAGE | P | W      # a page table, writable
    if c & 0xe0 == 0xe0:
        v |= PS
    return v


def _pv_item(inp):
    """One item: an entry of the guest's tables, or a hostile address (past
    memory, unaligned, wrapping), or an item of the wrong shape."""
    c = inp.u8()
    if c < 200:
        gpa = _table_slot(inp)
    elif c < 216:
        gpa = inp.u64()                                         # anywhere
    elif c < 232:
        gpa = GUEST_FRAMES * PAGE - 64 + (c & 15) * 8           # around the end of memory
    elif c < 248:
        gpa = _table_slot(inp) | (c & 7)                        # unaligned
    else:
        gpa = _table_slot(inp)
        v = _pv_value(inp)
        return ([gpa, v], (gpa,), (gpa, v, 0), (gpa, True), (gpa, -1), (gpa, 1 << 64),
                (gpa, float(v & 0xffff)), {"gpa": gpa})[c & 7]
    return (gpa, _pv_value(inp))


def st_mmu_update(inp, w):
    """mmu_update batches, valid and hostile (csrc/paravirt.c validates the whole
    batch and declines anything but the common case to paravirt.py): a few
    entries or hundreds, as a list or a tuple."""
    k = inp.u8()
    n = 1 + (inp.below(8) if k & 3 else inp.u8() + (inp.u8() & 3) * 256)
    items = [_pv_item(inp) for _ in range(n)]
    w.vm.vcpu.hypercall("mmu_update", items if k & 4 else tuple(items))


def st_pv_remap(inp, w):
    """The guest kernel's paravirtual page-table work: accessed entries of the
    boot PT rewritten one by one (remap, protect, unmap), then the invlpg
    hypercall, then a use of the page."""
    vcpu = w.vm.vcpu
    slot = inp.below(GUEST_FRAMES)
    v = (inp.below(GUEST_FRAMES) * PAGE | P | U | A
         | (W | D if inp.bool() else 0)) if inp.u8() & 7 else 0
    vcpu.hypercall("mmu_update", [(4 * PAGE + 8 * slot, v)])
    vcpu.hypercall("invlpg", slot * PAGE)
    vcpu.access(slot * PAGE, ACCESSES[inp.below(3)])


STEPS_TABLE = (st_dma_pte, st_store_pte, st_store_pte, st_store, st_cr3, st_invlpg, st_access,
               st_access, st_load, st_run, st_cr, st_state, st_hypercall, st_probe, st_probe,
               st_dma_pte, st_store_stream, st_store_stream, st_mmu_update, st_pv_remap)


# ---------------------------------------------------------------------------
# Invariants after every step
# ---------------------------------------------------------------------------
def _real_leaves(vm):
    """(va, host pa, writable) of every leaf in the VM's real (shadow) tables."""
    vcpu = vm.vcpu
    if not vcpu._paging or vm.shadow.root is None:
        return []
    return [(m.va, m.pa, m.page_size, m.writable) for m in vcpu.mmu.mappings()]


def check_invariants(w):
    vm, victim = w.vm, w.victim
    problems = audit(vm)
    if problems:
        raise Finding("audit(hostile VM): " + "; ".join(problems[:5]))
    problems = audit(victim)
    if problems:
        raise Finding("audit(victim VM): " + "; ".join(problems[:5]))
    if victim.phys.read(0, VICTIM_FRAMES * PAGE) != w.victim_image:
        raise Finding("the victim's guest memory changed")
    own = set(int(f) // PAGE for f in vm.p2m.tolist() if f != ptemu.PhysicalMemory.NO_FRAME)
    wp = vm.shadow.wp
    h2g = vm.h2g
    for va, hpa, size, writable in _real_leaves(vm):
        for f in range(hpa // PAGE, (hpa + size) // PAGE):
            if f not in own:
                who = ("the victim" if f in victim.frames_owned else
                       "a shadow page" if f in vm.frames_owned else "no VM")
                raise Finding("real leaf va %#x maps host frame %#x of %s" % (va, f, who))
            if writable and h2g.get(f) in wp:
                raise Finding("real leaf va %#x is writable onto write-protected guest "
                              "frame %#x" % (va, h2g[f]))


def _step(inp, w, k):
    """Run step k; (outcome code, what the guest saw)."""
    try:
        STEPS_TABLE[k](inp, w)
    except (ShadowMmuError, HostMemoryExhausted) as exc:
        raise Finding("hypervisor error reached the guest: %r" % (exc,))
    except ptemu.PageFault as exc:
        return 1, ("#PF", exc.error_code, exc.cr2)
    except ptemu.GeneralProtection as exc:
        return 2, ("#GP", str(exc))
    except ptemu.InvalidInput as exc:
        return 3, (type(exc).__name__, str(exc))
    return 0, None


def _counters(vm):
    return {k: v for k, v in vm.stats.items() if k not in FAST_COUNTERS}


def compare_paths(wf, wr, k):
    """The fast-path world and the reference world after the same step."""
    a, b = _counters(wf.vm), _counters(wr.vm)
    if a != b:
        diff = {n: (a.get(n), b.get(n)) for n in set(a) | set(b) if a.get(n) != b.get(n)}
        raise Finding("step %s: counters differ with fast paths on/off: %r" % (k, diff))
    if not np.array_equal(wf.hv.host.array, wr.hv.host.array):
        raise Finding("step %s: host memory differs with fast paths on/off" % k)


@instrumented
def one_input(data):
    if Hypervisor is None:
        return
    inp, inp_ref = ByteInput(data), ByteInput(data)
    w = World(inp)
    ref = World(inp_ref, fast_paths=False)
    check_invariants(w)
    compare_paths(w, ref, "boot")
    stats = w.vm.stats
    for _ in range(1 + inp.below(24)):
        inp_ref.below(24) if _ == 0 else None
        k = inp.u8() % len(STEPS_TABLE)
        inp_ref.u8()
        before = dict(stats)
        outcome, seen = _step(inp, w, k)
        outcome_ref, seen_ref = _step(inp_ref, ref, k)
        if (outcome, seen) != (outcome_ref, seen_ref):
            raise Finding("step %d: fast paths give %r, the reference %r"
                          % (k, seen, seen_ref))
        STEPS[0] += 1
        check_invariants(w)
        compare_paths(w, ref, k)
        _feedback(before, w.vm.stats, k, outcome)
        if inp.left == 0:
            break
    now = time.monotonic()
    if now - _LAST_REPORT[0] > 10:
        _LAST_REPORT[0] = now
        _report()


def _report():
    print("hostile-guest steps: %d" % STEPS[0], file=sys.stderr)


if __name__ == "__main__":
    import atexit
    atexit.register(_report)
    if Hypervisor is None:
        print("ptemu.hypervisor is not available: nothing to fuzz", file=sys.stderr)
        sys.exit(0)
    main(one_input, max_len=1024)
