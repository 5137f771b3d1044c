"""Property tests of the shadow MMU over long random sequences of raw guest
operations, hostile guests included.

A random guest starts from a small well-formed world (4-level tables, a
2 MiB supervisor "direct map" of all guest-physical memory so it can store
into its own tables) and then does anything: stores arbitrary values into its
page tables (through the vCPU and through `phys`, whole entries and
misaligned byte runs), loads CR3 with arbitrary values, INVLPGs, loads,
stores, single accesses and bulk runs at every privilege level, toggles
CR0.WP / SMEP / SMAP.  The same sequence runs on a native reference: a plain
Mmu over a PhysicalMemory holding the same guest memory (no hypervisor).

What must hold (issue 4):
* Invisible to the guest -- identical results (values loaded, #PF error
  code and CR2, #GP, accesses outside memory) and identical guest memory,
  A/D bits included (SDM 4.8):
    - sync shadow paging, hostile guest, against a native machine WITHOUT a
      TLB: a synced shadow is exactly coherent after every operation, so even a
      guest that never flushes sees no difference;
    - shadow (sync and unsync) and paravirt, against a native machine WITH
      the default TLB, for a guest that flushes (MOV CR3) after each
      page-table store, as SDM 4.10.4.3 requires of it.
* Coherence: every translation of the shadow (walked from the real CR3)
  equals the guest's translation composed with the p2m, with rights never
  wider than the guest's and the guest's A (and for W, D) bits set -- after
  every operation for sync shadows, after every flushing CR3 load for unsync
  ones; plus ptemu.hypervisor.audit's whole-cache invariants.
* Isolation: no shadow entry maps a host frame outside the VM's own frames,
  whatever the guest writes (audit, and a second VM whose frames are checked
  untouched).
"""
import numpy as np
from hypothesis import given, settings, strategies as st


def scaled(factor):
    """Examples for a test: a multiple of the profile's max_examples (100 by
    default; HYPOTHESIS_PROFILE=long for a soak run scales them all by 20)."""
    return max(5, int(settings.default.max_examples * factor))

import ptemu
from ptemu import bits
from ptemu.hypervisor import Hypervisor, audit, GuestMemoryError, HypercallRejected
from ptemu.hypervisor.exits import FAST_COUNTERS

P, W, U, A, D, PS, G, NX = (bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_A, bits.PTE_D,
                            bits.PTE_PS, bits.PTE_G, bits.PTE_NX)
PWT, PCD = bits.PTE_PWT, bits.PTE_PCD
FRAMES = 32                      # guest memory: 128 KiB
MEM = FRAMES * 4096
DIRECT = 0x400000                # PD[2]: 2 MiB page at gpa 0 (the "direct map")
PT_FRAMES = (1, 2, 3, 4, 5, 6, 7)


def build_world(write):
    """The starting guest tables (same bytes on both machines)."""
    write(0x1000, 0x2000 | P | W | U | A)           # PML4[0] -> PDPT (gfn 2)
    write(0x1008, 0x7000 | P | W | U)               # PML4[1] -> PDPT (gfn 7)
    write(0x2000, 0x3000 | P | W | U)               # PDPT[0] -> PD (gfn 3)
    write(0x3000, 0x4000 | P | W | U)               # PD[0] -> PT (gfn 4): va 0..2M
    write(0x3008, 0x5000 | P | W | U | A)           # PD[1] -> PT (gfn 5): va 2M..4M
    write(0x3010, 0 | P | W | PS | NX)              # PD[2]: direct map, 2 MiB at gpa 0
    for i in range(16):
        write(0x4000 + 8 * i, ((16 + i) << 12) | P | W | U)
        write(0x5000 + 8 * i, ((16 + (i * 5) % 16) << 12) | P | (W if i % 3 else 0)
              | (U if i % 2 else 0) | (NX if i % 4 == 0 else 0))
    write(0x6000, 0x2000 | P | W | U)               # a second top table sharing the PDPT
    write(0x6008, 0x3000 | P | W)                   # ... and a PDPT slot pointing at the PD
    write(0x7000, 0x3000 | P | U)                   # PDPT (gfn 7)[0] -> PD, read-only path
    for g in range(16, FRAMES):
        write(g << 12, 0x1111111100000000 | g)


class NativeRef:
    """The native machine: guest tables loaded directly into a plain Mmu."""

    paging = "native"

    def __init__(self, tlb):
        self.phys = ptemu.PhysicalMemory(MEM)
        self.cpu = ptemu.CpuState.long_mode()
        self.mmu = ptemu.Mmu(self.phys, self.cpu, ptemu.Tlb.default() if tlb else None)

    def write_cr3(self, v):
        self.mmu.write_cr3(v)

    def invlpg(self, va):
        self.mmu.invlpg(va)

    def access(self, va, acc):
        return self.mmu.translate(va, acc).pa

    def load_u64(self, va):
        pa = self.mmu.translate(va, "r").pa
        if pa + 8 > MEM:
            raise GuestMemoryError(va, pa, MEM)
        return self.phys.read_u64(pa)

    def store_u64(self, va, value):
        pa = self.mmu.translate(va, "w").pa
        if pa + 8 > MEM:
            raise GuestMemoryError(va, pa, MEM)
        self.phys.write_u64(pa, value)

    def run(self, trace):
        return self.mmu.run(trace)


class VmSide:
    def __init__(self, vm):
        self.vm = vm
        self.phys = vm.phys
        self.cpu = vm.vcpu.cpu
        self.v = vm.vcpu

    def write_cr3(self, v):
        self.v.write_cr3(v)

    def invlpg(self, va):
        self.v.invlpg(va)

    def access(self, va, acc):
        return self.v.access(va, acc)

    def load_u64(self, va):
        return self.v.load_u64(va)

    def store_u64(self, va, value):
        self.v.store_u64(va, value)

    def run(self, trace):
        return self.v.run(trace)


def outcome(fn, *args):
    try:
        r = fn(*args)
    except ptemu.PageFault as e:
        return ("pf", e.error_code, e.cr2)
    except ptemu.GeneralProtection:
        return ("gp",)
    except GuestMemoryError:
        return ("mem",)
    if isinstance(r, ptemu.RunResult):
        return ("run", r.index, r.vector, r.error_code, r.cr2)
    return ("ok", r)


def apply(m, op):
    """One guest operation on machine m; its outcome."""
    kind = op[0]
    if kind == "pt_store":                  # a guest store through the direct map
        _, gfn, idx, value = op
        return outcome(m.store_u64, DIRECT + gfn * 4096 + idx * 8, value)
    if kind == "pt_phys":
        _, gfn, idx, value = op
        m.phys.write_u64(gfn * 4096 + idx * 8, value)
        return ("ok",)
    if kind == "phys_bytes":
        _, gpa, data = op
        m.phys.write(gpa, data)
        return ("ok",)
    if kind == "cr3":
        return outcome(m.write_cr3, op[1])
    if kind == "invlpg":
        m.invlpg(op[1])
        return ("ok",)
    if kind == "load":
        return outcome(m.load_u64, op[1])
    if kind == "store":
        return outcome(m.store_u64, op[1], op[2])
    if kind == "access":
        return outcome(m.access, op[1], op[2])
    if kind == "repair":                    # the kernel restores its direct-map path
        m.phys.write_u64(0x1000, 0x2000 | P | W | U | A)
        m.phys.write_u64(0x2000, 0x3000 | P | W | U)
        m.phys.write_u64(0x3010, 0 | P | W | PS | NX)
        return ("ok",)
    if kind == "cpl":
        m.cpu.cpl = op[1]
        return ("ok",)
    if kind == "wp":
        m.cpu.cr0 = (m.cpu.cr0 | bits.CR0_WP) if op[1] else (m.cpu.cr0 & ~bits.CR0_WP)
        return ("ok",)
    if kind == "cr4":
        m.cpu.cr4 = bits.CR4_PAE | op[1]
        return ("ok",)
    if kind == "pkru":
        m.cpu.pkru = op[1]
        return ("ok",)
    if kind == "run":
        tr = np.zeros(len(op[1]), dtype=ptemu.TRACE_DTYPE)
        for i, (va, acc, user) in enumerate(op[1]):
            tr[i] = (va, acc, user)
        return outcome(m.run, tr)
    raise AssertionError(kind)


# -- strategies --------------------------------------------------------------------------
_flag = st.sampled_from([P, W, U, A, D, PS, G, NX, PWT, PCD])
_junk = st.sampled_from([0] * 8 + [1 << 51, 1 << 13, 1 << 62, 0x7 << 9, 1 << 12])
_gfn = st.one_of(st.sampled_from(PT_FRAMES), st.integers(0, FRAMES + 8))
entry = st.builds(lambda g, fl, j: (g << 12) | sum(set(fl)) | j, _gfn,
                  st.lists(_flag, max_size=7), _junk)
sane_entry = st.builds(lambda g, fl: (g << 12) | P | sum(set(fl)),
                       st.one_of(st.integers(8, FRAMES - 1), st.sampled_from(PT_FRAMES)),
                       st.lists(st.sampled_from([W, U, A, D, NX, W, U, A]), max_size=6))
_idx = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 15, 16, 511])
_page = st.one_of(
    st.builds(lambda i: i << 12, st.integers(0, 17)),                 # PT gfn 4
    st.builds(lambda i: (1 << 21) + (i << 12), st.integers(0, 17)),   # PT gfn 5
    st.builds(lambda g: DIRECT + (g << 12), st.integers(0, FRAMES + 4)),
    st.sampled_from([1 << 30, 1 << 39, (1 << 39) + (2 << 21), 0x0000800000000000,
                     0xffff800000000000, 3 << 21]),
)
va8 = st.builds(lambda p, o: p + o * 8, _page, st.sampled_from([0, 1, 7, 511]))
vaany = st.builds(lambda p, o: p + o, _page, st.sampled_from([0, 1, 0x7ff, 0xfff]))
_good_cr3 = st.sampled_from([0x1000, 0x6000])
_cr3 = st.one_of(_good_cr3, _good_cr3, _good_cr3, _good_cr3,
                 st.sampled_from([0x2000, 0x3000, 0x1fff, 0x1000 | (1 << 60)]),
                 st.builds(lambda g: g << 12, st.integers(0, FRAMES + 4)))
_acc = st.sampled_from(["r", "w", "x"])


def ops(paging_ops=True, pt_value=st.one_of(sane_entry, sane_entry, entry)):
    pt_store = st.one_of(   # mostly into the leaf tables, sometimes anywhere
        st.tuples(st.just("pt_store"), st.sampled_from((4, 5)), _idx, pt_value),
        st.tuples(st.just("pt_store"), st.sampled_from((4, 5)), _idx, pt_value),
        st.tuples(st.just("pt_store"), st.sampled_from(PT_FRAMES), _idx, pt_value))
    load = st.tuples(st.just("load"), va8)
    access = st.tuples(st.just("access"), vaany, _acc)
    run = st.tuples(st.just("run"), st.lists(st.tuples(vaany, st.integers(0, 2), st.booleans()),
                                             min_size=1, max_size=12))
    base = [
        pt_store, pt_store, pt_store,
        st.tuples(st.just("pt_phys"), st.sampled_from(PT_FRAMES), _idx, pt_value),
        st.tuples(st.just("cr3"), _cr3),
        st.tuples(st.just("invlpg"), vaany),
        load, load, load,
        st.tuples(st.just("store"), va8, st.integers(0, (1 << 64) - 1)),
        st.tuples(st.just("store"), va8, st.integers(0, (1 << 64) - 1)),
        access, access, access,
        st.tuples(st.just("cpl"), st.sampled_from([0, 0, 0, 3])),
        run, run,
        st.tuples(st.just("repair")), st.tuples(st.just("repair")),
    ]
    if paging_ops:
        base += [
            st.tuples(st.just("phys_bytes"),
                      st.builds(lambda g, o: g * 4096 + o, st.sampled_from((4, 5, 4, 5, 1, 3)),
                                st.sampled_from([0, 3, 4, 6, 8, 20, 4092])),
                      st.binary(min_size=1, max_size=12)),
            st.tuples(st.just("wp"), st.booleans()),
            st.tuples(st.just("cr4"), st.sampled_from([0, bits.CR4_SMEP, bits.CR4_SMAP,
                                                       bits.CR4_SMEP | bits.CR4_SMAP,
                                                       bits.CR4_PGE, bits.CR4_PKE,
                                                       bits.CR4_PKE | bits.CR4_SMAP])),
            # protection keys: AD/WD for key 0 and key 8 (gpte bit 62 in _junk)
            st.tuples(st.just("pkru"), st.sampled_from([0, 0b01, 0b10, 0b10 << 16,
                                                        0b11 << 16])),
        ]
    return st.lists(st.one_of(*base), min_size=20, max_size=80)


# -- checks -------------------------------------------------------------------------------
def coherence_problems(vm):
    """Every shadow translation from the real CR3 = guest translation o p2m, no wider."""
    vc = vm.vcpu
    if not vc._paging or vc.shadow.root is None or vc._root_stale:
        return []
    probe_cpu = vc.cpu.copy()
    probe_cpu.cr4 = probe_cpu.cr4 & ~(bits.CR4_SMAP | bits.CR4_SMEP | bits.CR4_PKE
                                      | bits.CR4_PKS)
    probe = ptemu.Mmu(vm.view, probe_cpu)
    out = []
    for mp in vc.mmu.mappings():
        try:
            t = probe.translate(mp.va, "r", user=False, update_ad=False)
        except ptemu.MmuFault as e:
            out.append("shadow maps %#x but the guest walk gives %r" % (mp.va, e))
            continue
        hpa = vm.gpa_to_hpa(t.pa) if t.pa < vm.memory_bytes else None
        if hpa != mp.pa:
            out.append("%#x: shadow -> %#x, guest -> gpa %#x -> %r" % (mp.va, mp.pa, t.pa, hpa))
        if mp.writable and not (t.writable and t.leaf & D):
            out.append("%#x: shadow writable, guest %r leaf %#x" % (mp.va, t, t.leaf))
        if mp.user and not t.user:
            out.append("%#x: shadow user, guest supervisor" % mp.va)
        if mp.executable and not t.executable:
            out.append("%#x: shadow executable, guest not" % mp.va)
        if any(not v & A for _, v in t.entries):
            out.append("%#x: shadow maps it, guest entries lack A: %r" % (mp.va, t.entries))
    return out


def isolation_problems(vm, others):
    mine = vm.host_frames()
    out = []
    for sp in vm.shadow.pages():
        tab = vm.shadow.table(sp)
        for v in tab[tab != 0].tolist():
            if (v & 0x000FFFFFFFFFF000) >> 12 not in mine:
                out.append("%r maps host frame %#x, not the VM's" % (sp, v >> 12))
    for other in others:
        if mine & other.host_frames():
            out.append("VM %d and VM %d share host frames" % (vm.id, other.id))
    return out


def make_vm(hv, mode, **kw):
    vm = hv.create_vm(MEM, paging="paravirt" if mode == "paravirt" else "shadow",
                      unsync=(mode == "unsync"), **kw)
    build_world(vm.phys.write_u64)
    vm.vcpu.write_cr3(0x1000)
    return vm


def make_native(tlb):
    n = NativeRef(tlb)
    build_world(n.phys.write_u64)
    n.write_cr3(0x1000)
    return n


def _run_pair(vm, nat, seq, check_every, disciplined):
    other = vm.hypervisor.vms[0] if vm.hypervisor.vms[0] is not vm else None
    other_bytes = other.phys.read(0, MEM) if other else None
    for step, op in enumerate(seq):
        a = apply(VmSide(vm), op)
        b = apply(nat, op)
        assert a == b, "step %d %r: vm %r native %r" % (step, op, a, b)
        flush = op[0] == "cr3" and a == ("ok", None)
        # (a plain "store" may land in a page table too: the guest's data
        # mappings can point anywhere)
        # (CR0.WP, SMEP, SMAP, PKRU changes need no flush: a TLB caches rights,
        # not decisions -- SDM 4.10.2.2)
        if disciplined and op[0] in ("pt_store", "pt_phys", "phys_bytes", "repair",
                                     "store"):
            cr3 = nat.cpu.cr3
            assert apply(VmSide(vm), ("cr3", cr3)) == apply(nat, ("cr3", cr3))
            flush = True
        assert vm.phys.read(0, MEM) == nat.phys.read(0, MEM), "guest memory differs at step %d" % step
        if check_every or flush:
            probs = audit(vm) + coherence_problems(vm)
            assert not probs, "step %d %r: %s" % (step, op, probs[:5])
        probs = isolation_problems(vm, [other] if other else [])
        assert not probs, probs[:5]
    if other is not None:
        assert other.phys.read(0, MEM) == other_bytes, "the other VM's memory changed"


# Hostile guests: sync shadow vs native without TLB, checked after every op.
@settings(max_examples=scaled(0.8), deadline=None)
@given(seq=ops(), limit=st.sampled_from([None, None, 8, 12]),
       prefetch=st.booleans(), fast=st.booleans())
def test_hostile_sync_shadow_matches_native_without_tlb(seq, limit, prefetch, fast):
    """SDM ch. 4 walk semantics through the shadow: results, faults and A/D bits
    identical to a TLB-less native machine for any raw guest sequence (with
    the C fast paths and with the Python reference)."""
    hv = Hypervisor(2 << 20)
    bystander = make_vm(hv, "shadow")
    vm = make_vm(hv, "shadow", shadow_limit=limit, prefetch=prefetch, fast_paths=fast)
    assert bystander is hv.vms[0]
    _run_pair(vm, make_native(tlb=False), seq, check_every=True, disciplined=False)


# Hostile guests under a tight host: shadow pages recycled when host frames run out.
@settings(max_examples=scaled(0.2), deadline=None)
@given(seq=ops())
def test_hostile_sync_shadow_small_host(seq):
    hv = Hypervisor((FRAMES + 1 + 24) * 4096)
    vm = make_vm(hv, "shadow")
    # Guest memory is backed as touched; the shadow pages share what is left.
    _run_pair(vm, make_native(tlb=False), [("load", DIRECT)] + seq, check_every=True,
              disciplined=False)


# Disciplined guests (flush after each page-table store): every mode vs native with a TLB.
@settings(max_examples=scaled(0.5), deadline=None)
@given(seq=ops(), mode=st.sampled_from(["shadow", "unsync", "paravirt"]),
       limit=st.sampled_from([None, 10]), fast=st.booleans())
def test_disciplined_guest_matches_native_with_tlb(seq, mode, limit, fast):
    """SDM 4.10.4.3: a guest that invalidates after changing its tables sees
    exactly what native hardware with a TLB gives it, in every mode."""
    seq = [op for op in seq if not (op[0] == "cr4" and op[1] & bits.CR4_PGE)]
    hv = Hypervisor(2 << 20)
    make_vm(hv, "shadow")
    vm = make_vm(hv, mode, shadow_limit=limit, fast_paths=fast)
    _run_pair(vm, make_native(tlb=True), seq, check_every=(mode != "unsync"), disciplined=True)


# Unsync leaf tables under a hostile guest: coherent at flush points, isolated always.
@settings(max_examples=scaled(0.4), deadline=None)
@given(seq=ops(), fast=st.booleans())
def test_hostile_unsync_coherent_at_flush_points(seq, fast):
    hv = Hypervisor(2 << 20)
    vm = make_vm(hv, "unsync", fast_paths=fast)
    side = VmSide(vm)
    for step, op in enumerate(seq):
        r = apply(side, op)
        if op[0] == "cr3" and r == ("ok", None):
            probs = audit(vm) + coherence_problems(vm)
            assert not probs, "step %d: %s" % (step, probs[:5])
        assert not isolation_problems(vm, [])
    side.write_cr3(side.cpu.cr3)
    assert not vm.shadow.unsync_sps
    probs = audit(vm) + coherence_problems(vm)
    assert not probs, probs[:5]


# Paravirt: mmu_update batches vs native direct stores.
#: What a paravirtual guest does besides mmu_update (paravirt_against_native's ops).
PV_GUEST_OPS = (
    st.tuples(st.just("load"), va8),
    st.tuples(st.just("access"), vaany, _acc),
    st.tuples(st.just("run"), st.lists(st.tuples(vaany, st.integers(0, 2), st.booleans()),
                                       min_size=1, max_size=8)),
    st.tuples(st.just("hc_invlpg"), vaany),
    st.tuples(st.just("hc_baseptr"), st.sampled_from([0x1000, 0x6000])),
)


@settings(max_examples=scaled(0.3), deadline=None)
@given(seq=st.lists(st.one_of(
    st.tuples(st.just("mmu_update"), st.lists(st.tuples(st.sampled_from(PT_FRAMES), _idx,
                                                        st.one_of(entry, sane_entry)),
                                              min_size=1, max_size=4)),
    *PV_GUEST_OPS),
    min_size=1, max_size=40))
def test_paravirt_hypercalls_match_native(seq):
    paravirt_against_native(seq, lambda items: [(g * 4096 + i * 8, v) for g, i, v in items])


def paravirt_against_native(seq, batch_of, fast_paths=True, malformed=False):
    """Run seq on a paravirt VM and on a native machine with a TLB; each
    accepted mmu_update batch (batch_of(op[1])) is applied natively as plain
    stores, then both flush.  malformed=True: a batch the hypercall refuses
    with anything but HypercallRejected (a malformed item) must leave guest
    memory as it was."""
    hv = Hypervisor(2 << 20)
    vm = make_vm(hv, "paravirt", fast_paths=fast_paths)
    nat = make_native(tlb=True)
    side = VmSide(vm)
    for step, op in enumerate(seq):
        if op[0] == "mmu_update":
            batch = batch_of(op[1])
            try:
                n = vm.vcpu.hypercall("mmu_update", batch)
            except HypercallRejected:
                continue
            except Exception:       # noqa: BLE001 - a malformed item: nothing applied
                if not malformed:
                    raise
                assert vm.phys.read(0, MEM) == nat.phys.read(0, MEM)
                continue
            assert n == len(batch)
            for gpa, v in batch:
                nat.phys.write_u64(gpa, v)
            vm.vcpu.hypercall("flush_tlb")
            nat.write_cr3(nat.cpu.cr3)
            probs = audit(vm) + coherence_problems(vm)
            assert not probs, "step %d: %s" % (step, probs[:5])
        elif op[0] == "hc_invlpg":
            vm.vcpu.hypercall("invlpg", op[1])
            nat.invlpg(op[1])
        elif op[0] == "hc_baseptr":
            vm.vcpu.hypercall("new_baseptr", op[1])
            nat.write_cr3(op[1])
        else:
            a, b = apply(side, op), apply(nat, op)
            assert a == b, "step %d %r: vm %r native %r" % (step, op, a, b)
        assert vm.phys.read(0, MEM) == nat.phys.read(0, MEM), "step %d %r" % (step, op)
        assert not isolation_problems(vm, [])


# The C fast paths against the all-Python reference (DESIGN.md "Python decides,
# C executes"): the same guest sequence on two identical hosts.
def _counters(vm):
    return {k: v for k, v in vm.stats.items() if k not in FAST_COUNTERS}


def _rmap(vm):
    return {g: s for g, s in vm.shadow.rmap.items() if s}


@settings(max_examples=scaled(0.5), deadline=None)
@given(seq=ops(), mode=st.sampled_from(["shadow", "unsync", "paravirt"]),
       limit=st.sampled_from([None, 10]))
def test_fast_paths_match_the_python_reference(seq, mode, limit):
    """Every guest-visible result, guest memory, every counter but the fast_*
    ones, the rmap and the whole of host memory (shadow pages included) are
    the same with fast_paths=True and fast_paths=False."""
    hvs = Hypervisor(2 << 20), Hypervisor(2 << 20)
    vms = [make_vm(hv, mode, shadow_limit=limit, fast_paths=fast)
           for hv, fast in zip(hvs, (True, False))]
    sides = [VmSide(vm) for vm in vms]
    for step, op in enumerate([("load", DIRECT)] + seq):
        a, b = (apply(side, op) for side in sides)
        assert a == b, "step %d %r: fast %r reference %r" % (step, op, a, b)
        assert _counters(vms[0]) == _counters(vms[1]), "step %d %r" % (step, op)
    assert _rmap(vms[0]) == _rmap(vms[1])
    assert np.array_equal(hvs[0].host.array, hvs[1].host.array)
    assert not audit(vms[0])
