"""The shadow MMU: shadow page tables built from the guest's, kept coherent.

Vocabulary and structure follow KVM (Documentation/virt/kvm/x86/mmu.rst,
arch/x86/kvm/mmu/mmu.c, paging_tmpl.h); docs/shadow-mmu.md walks through
every event flow.  In one picture::

    guest CR3 ──> guest PML4 (gfn a) ──> guest PDPT (gfn b) ──> ... guest PT (gfn d)
                      ▲ shadowed by           ▲                        ▲
    real  CR3 ──> sp(a, L4 role) ────> sp(b, L3 role) ──> ... sp(d, L1 role) ──> host frame
                  (a host frame)                                   spte = p2m[gfn] | rights

* A shadow page (`ShadowPage`) is one host frame of 512 sptes, keyed by
  (gfn, role): the guest table it shadows and how it is read (`role`: level,
  the rights inherited from the parents, EFER.NXE, CR0.WP, LA57; `direct`
  pages shadow a linear range -- a guest 2 MiB / 1 GiB page split into 4 KiB
  host pages -- rather than a guest table).  Non-leaf sptes point at shadow
  pages and carry every right (P|W|U|A, no NX); the leaf spte carries the
  rights of the whole guest walk (the role's inherited rights ANDed with the
  guest leaf's), so the real MMU combines them exactly as the guest's would.
* The reverse map (rmap: gfn -> host addresses of leaf sptes mapping it)
  finds every writable mapping of a guest frame when that frame becomes a
  page table: it is write-protected (leaf sptes lose W), so guest stores to
  it trap and are emulated (`guest_write`).
* A leaf spte exists only when the guest walk to it succeeded with A set on
  every level (a guest walk sets them), and is writable only when the
  guest's leaf D is set: the first write traps and the guest walk sets D.
  That makes A/D bits in guest tables exactly what native hardware leaves.
* Unsync (KVM) / out-of-sync (Xen): a level-1 guest table may be left
  writable; its shadow page is then only as fresh as a TLB, and is brought
  back at the guest's own flush points (INVLPG: that entry; CR3 loads: all).

All sptes are written through one memoryview of host memory (`_m`, uint64
words); hardware (the C walker under `vcpu.run`) reads the same words.
Every change that lowers or removes a translation sets `need_flush`; the vCPU
flushes the real TLB once before the guest runs again (KVM's
kvm_flush_remote_tlbs after a batch of zaps), which also covers the
paging-structure caches that may point into a freed shadow page.
"""
import numpy as np

from ptemu import bits
from ptemu._native import ffi, lib
from ptemu.hypervisor.exits import HostMemoryExhausted, ShadowMmuError

__all__ = ["ShadowPage", "ShadowMmu", "role_str", "audit"]

P, W, U, A, D, PS, G = (bits.PTE_P, bits.PTE_W, bits.PTE_U, bits.PTE_A, bits.PTE_D,
                        bits.PTE_PS, bits.PTE_G)
NX = bits.PTE_NX
PWT, PCD = bits.PTE_PWT, bits.PTE_PCD
PKEY_MASK = 0xF << bits.PTE_PKEY_SHIFT
#: Rights in TLB-flag form (walk.c): NX 1, W 2, U 4 -- W and U at their PTE positions.
TE_NX, TE_W, TE_U = lib.PTEMU_TE_NX, lib.PTEMU_TE_W, lib.PTEMU_TE_U
ACC_ALL = TE_W | TE_U
NONLEAF = P | W | U | A
#: Guest leaf bits a 4 KiB spte copies as they are: caching (PWT, PCD, PAT=bit 7
#: in a PTE), G (meaningful with CR4.PGE, which the real CPU shares) and the key.
PAT_4K = PS                     # bit 7 of a PTE is PAT (SDM table 4-20), PS in a PDE
LEAF_COPY = PWT | PCD | PAT_4K | G | PKEY_MASK
SHIFT = (0, 12, 21, 30, 39, 48)
NO_FRAME = lib.PTEMU_NO_FRAME
SPTE_FRAME = 0x000FFFFFFFFFF000     # bits 51:12 of an spte: the host frame
#: Bits a leaf spte may gain without a new translation: the rmap entry stays
#: and the real TLB needs no flush (a TLB entry may only be narrower).
SPTE_WIDEN = A | W | D

#: The fill cache's C mirror (ptemu_spc_slot): slots, direct-mapped by va >> 21.
SPC_SLOTS = 1024
#: Pending rmap additions C may make before Python absorbs them (pairs).
RMAP_LOG_PAIRS = 4096
RMAP_REMOVE = lib.PTEMU_RMAP_REMOVE
#: Paths C's shadow descent may cache before Python takes them into _pcache.
PATH_LOG_ENTRIES = 64
PATH_LOG_WORDS = lib.PTEMU_PATH_LOG_WORDS
PATH_LOG_DIRECT = lib.PTEMU_PATH_LOG_DIRECT
GFN_SPS = lib.PTEMU_GFN_SPS
SPI_DIRECT, SPI_LEVEL_SHIFT, SPI_NXE = (lib.PTEMU_SPI_DIRECT, lib.PTEMU_SPI_LEVEL_SHIFT,
                                        lib.PTEMU_SPI_NXE)
#: The emulated write without a use in between that zaps a page (flooding), and
#: the free host frames below which a fill makes room first: shared with C.
FLOOD_ZAP, FILL_MIN_FREE = lib.PTEMU_FLOOD_ZAP, lib.PTEMU_FILL_MIN_FREE


def make_leaf_spte(hpa, acc, copy_bits, dirty, protected):
    """The one leaf spte for a guest mapping (KVM make_spte).

    hpa: the host frame; acc: TE rights combined over the guest walk (the
    role's inherited rights ANDed with the leaf's); copy_bits: guest bits the
    spte carries as they are (LEAF_COPY of a gpte, or a direct page's
    leafbits); dirty: the guest leaf's D.  P and A always (a leaf spte exists
    only after a guest walk that set A).  W (with D) only when the guest
    allows writes, its D is set (the first write must trap so that the guest
    walk sets D) and the frame is not a write-protected page table
    (`protected`).  NX when any guest level said XD.  csrc/shadow.c's
    make_leaf_spte is the same rule for the fast path; tests run both.
    """
    spte = hpa | P | A | (acc & TE_U) | copy_bits
    if acc & TE_W and dirty and not protected:
        spte |= W | D
    if acc & TE_NX:
        spte |= NX
    return spte


class ShadowIterator:
    """A position in the shadow tables for one va (KVM kvm_shadow_walk_iterator):
    `sp` the shadow page, `level` its level, `index` the spte of va in it."""

    __slots__ = ("va", "sp", "level", "index")

    def __init__(self, va, sp, level):
        self.va, self.sp, self.level = va, sp, level
        self.index = (va >> SHIFT[level]) & 511


def for_each_shadow_entry(root, va, levels):
    """Walk the shadow tables for va from root down (KVM for_each_shadow_entry):
    yields one ShadowIterator per level, the lowest last.  The loop body may
    link a child at it.index; the walk goes on into whatever child is there
    after the body, and stops where none is."""
    it = ShadowIterator(va, root, levels)
    while True:
        yield it
        if it.level == 1:
            return
        child = it.sp.children.get(it.index)
        if child is None:
            return
        it.level -= 1
        it.sp = child
        it.index = (va >> SHIFT[it.level]) & 511

# Role bits (kvm_mmu_page_role, reduced to what changes the meaning of a gpte).
R_LEVEL = 0x7
R_DIRECT = lib.PTEMU_ROLE_DIRECT
R_ACC_SHIFT = lib.PTEMU_ROLE_ACC_SHIFT   # 3 bits: TE_NX | TE_W | TE_U inherited from parents
R_NXE = 1 << 7                  # EFER.NXE: bit 63 is XD, not reserved
R_WP = 1 << 8                   # CR0.WP
R_LA57 = 1 << 9                 # 5-level guest
R_PKEY_SHIFT = lib.PTEMU_ROLE_PKEY_SHIFT    # direct pages: the large leaf's key (4 bits) ...
R_G = lib.PTEMU_ROLE_G                      # ... G,
R_PWT = lib.PTEMU_ROLE_PWT                  # ... and caching bits, copied into every spte
R_PCD = lib.PTEMU_ROLE_PCD
R_MODE = R_NXE | R_WP | R_LA57   # the paging-mode part, shared by all pages of one mode
KEY_SHIFT = lib.PTEMU_SP_KEY_SHIFT  # key = gfn << 20 | role (C reads keys: fast path 4)


def role_str(role):
    """'L1 direct acc=WU- nxe wp' style description of a role."""
    acc = (role >> R_ACC_SHIFT) & 7
    out = ["L%d" % (role & R_LEVEL)]
    if role & R_DIRECT:
        out.append("direct")
    out.append("acc=%s%s%s" % ("W" if acc & TE_W else "-", "U" if acc & TE_U else "S",
                               "-" if acc & TE_NX else "X"))
    for bit, name in ((R_NXE, "nxe"), (R_WP, "wp"), (R_LA57, "la57")):
        if role & bit:
            out.append(name)
    return " ".join(out)


class ShadowPage:
    """One shadow page (KVM struct kvm_mmu_page).

    gfn/role/key   what it shadows (see the module docstring)
    hpa, base      its host frame, and base = hpa // 8 (index of spte 0 in `_m`)
    children       level > 1: {index: child ShadowPage} mirroring the non-leaf sptes
    parents        host addresses of the sptes pointing at this page (parent_ptes)
    unsync         level-1 page left writable to the guest (see ShadowMmu.unsync_page)
    gsnap          unsync only: the gptes the present sptes were made from
    (its write-flooding count is ShadowMmu.flood[hpa >> 12]: an array C reads)
    leafbits       direct pages: key, G and caching bits of the guest's large leaf
    """

    __slots__ = ("key", "gfn", "role", "level", "direct", "access", "hpa", "base",
                 "children", "parents", "unsync", "gsnap", "gsnap_c", "alive", "leafbits")

    def __init__(self, gfn, role, hpa):
        self.key = (gfn << KEY_SHIFT) | role
        self.gfn = gfn
        self.role = role
        self.level = role & R_LEVEL
        self.direct = bool(role & R_DIRECT)
        self.access = (role >> R_ACC_SHIFT) & 7
        self.hpa = hpa
        self.base = hpa >> 3
        self.children = {} if self.level > 1 else None
        self.parents = set()
        self.unsync = False
        self.gsnap = None
        self.gsnap_c = None     # gsnap as C writes it (fast path 1 on an unsync page)
        self.alive = True
        self.leafbits = 0
        if self.direct:
            self.leafbits = (((role >> R_PKEY_SHIFT) & 0xF) << bits.PTE_PKEY_SHIFT
                             | (G if role & R_G else 0) | (PWT if role & R_PWT else 0)
                             | (PCD if role & R_PCD else 0))

    def __repr__(self):
        return "<ShadowPage gfn %#x %s at host %#x%s>" % (
            self.gfn, role_str(self.role), self.hpa, " unsync" if self.unsync else "")


class ShadowMmu:
    """The shadow page tables of one VM, and every operation on them.

    vm: the VirtualMachine (p2m, host frames, stats).  The vCPU drives it:
    `load_root` at CR3 loads, `fill` at hidden faults, `guest_write` for
    emulated and DMA writes to guest page tables, `invlpg`, `sync_all`.
    """

    def __init__(self, vm, unsync=False, prev_roots=3, shadow_limit=None, prefetch=False):
        self.vm = vm
        self.hv = vm.hypervisor
        self._m = vm.hypervisor.words       # host memory as uint64 words
        self._mnp = np.frombuffer(self._m, dtype=np.uint64)    # the same as a numpy array
        self.p2m = vm.p2m                   # numpy uint64: gfn -> host byte offset
        self._p2m = vm.p2m_list             # the same as a Python list (fast reads)
        self.h2g = vm.h2g                   # host frame number -> gfn
        self.nframes = len(vm.p2m)
        self.stats = vm.counters
        self.allow_unsync = bool(unsync)
        self.prev_roots_max = int(prev_roots)
        self.limit = shadow_limit
        self.prefetch = bool(prefetch)

        self.hash = {}          # key -> ShadowPage (every live page)
        self.by_frame = {}      # host frame number -> ShadowPage
        self.gfn_sps = {}       # gfn -> [non-direct ShadowPages shadowing that guest table]
        self.wp = set()         # gfns write-protected: some synced non-direct page shadows them
        self._rmap = {}         # gfn -> set of host addresses of leaf sptes mapping it
        # What the C fast paths (csrc/shadow.c) read and update, owned here:
        #: gfn -> 1 while write-protected (the C side of `wp`, kept equal by _protect)
        self.wp_map = np.zeros(self.nframes, dtype=np.uint8)
        #: host frame number -> write-flooding count of the shadow page there
        self.flood = np.zeros(vm.hypervisor.host.size >> 12, dtype=np.uint32)
        self._flood = memoryview(self.flood)    # the same, for scalar reads and writes
        #: the fill cache's level-1 paths in C form (ptemu_spc_slot), see _cache_path
        self.spc = ffi.new("ptemu_spc_slot[]", SPC_SLOTS)
        self._pcache_gen = 1    # the generation _pcache belongs to (fast.gen may move on in C)
        #: (gfn, spte host address) pairs C appended to the rmap; absorb_rmap_log
        self.rmap_log = np.zeros(2 * RMAP_LOG_PAIRS, dtype=np.uint64)
        #: The fast paths' view of all this (csrc/shadow.c); the vCPU adds the
        #: guest CPU and memory and switches the paths on (ptemu_shadow_ctx.enabled).
        #: host frame -> PTEMU_SPI_* of the shadow page there (0: none)
        self.sp_info = np.zeros(len(self.flood), dtype=np.uint8)
        #: gfn -> up to GFN_SPS host frames + 1 of its shadow pages, in gfn_sps order
        self.gfn_sp = np.zeros((self.nframes, GFN_SPS), dtype=np.uint64)
        self.gfn_nsp = np.zeros(self.nframes, dtype=np.uint8)
        #: gfn -> key and host address of a top-level shadow page of it (the
        #: hash's roots, for C's CR3 loads); key 0: none
        self.top_key = np.zeros(self.nframes, dtype=np.uint64)
        self.top_hpa = np.zeros(self.nframes, dtype=np.uint64)
        #: host frame -> the address of its unsync page's gsnap (gsnap_c), 0 when
        #: in sync: C's shadow descent gives an unsync page's slot its snapshot
        self.gsnap_addr = np.zeros(len(self.flood), dtype=np.uint64)
        #: host frame -> key of the shadow page there (0: none), for C's descent
        self.sp_key = np.zeros(len(self.flood), dtype=np.uint64)
        #: the paths C's shadow descent put in the fill cache (_pcache's share),
        #: PATH_LOG_WORDS words each; _take_path_log
        self.path_log = np.zeros(PATH_LOG_ENTRIES * PATH_LOG_WORDS, dtype=np.uint64)
        # The same arrays as memoryviews: Python's scalar reads and writes
        # (an int in C, not a numpy scalar; gfn_sp flat, GFN_SPS a row).
        (self._wp_mv, self._spi_mv, self._nsp_mv, self._gsp_mv, self._topk_mv,
         self._toph_mv, self._gsnap_mv, self._spkey_mv) = (
            memoryview(a.reshape(-1)) for a in (self.wp_map, self.sp_info, self.gfn_nsp,
                                                self.gfn_sp, self.top_key, self.top_hpa,
                                                self.gsnap_addr, self.sp_key))
        fast = self.fast = ffi.new("ptemu_shadow_ctx *")
        # ptemu_shadow_run's walk context, derived again only when the real
        # CPU state (any byte), memory or TLB it runs on differs (C compares).
        self._run_cache = ffi.new("ptemu_ctx_cache *")
        fast.run_cache = self._run_cache
        self._fast_bufs = (ffi.from_buffer("uint64_t[]", self.p2m),
                           ffi.from_buffer("uint8_t[]", self.wp_map),
                           ffi.from_buffer("uint32_t[]", self.flood),
                           ffi.from_buffer("uint64_t[]", self.rmap_log),
                           ffi.from_buffer("uint8_t[]", self.sp_info),
                           ffi.from_buffer("uint64_t[]", self.gfn_sp),
                           ffi.from_buffer("uint8_t[]", self.gfn_nsp),
                           ffi.from_buffer("uint64_t[]", vm.h2g_map),
                           ffi.from_buffer("uint64_t[]", vm.hypervisor.free_count),
                           ffi.from_buffer("uint64_t[]", self.top_key),
                           ffi.from_buffer("uint64_t[]", self.top_hpa),
                           ffi.from_buffer("uint64_t[]", self.gsnap_addr),
                           ffi.from_buffer("uint64_t[]", self.path_log),
                           ffi.from_buffer("uint64_t[]", self.sp_key))
        (fast.p2m, fast.wp, fast.flood, fast.rmap_log, fast.sp_info, fast.gfn_sp,
         fast.gfn_nsp, fast.h2g, fast.host_free, fast.top_key, fast.top_hpa,
         fast.gsnap_addr, fast.path_log, fast.sp_key) = self._fast_bufs
        fast.path_log_cap = PATH_LOG_ENTRIES
        fast.allow_unsync = 1 if self.allow_unsync else 0
        fast.amask = 0x000FFFFFFFFFF000     # set_mode sets it (and rsvd_phys) for real
        self._hash_room()
        fast.nframes = self.nframes
        fast.nhost = len(self.flood)
        fast.rmap_log_cap = RMAP_LOG_PAIRS
        fast.spc = self.spc
        fast.spc_mask = SPC_SLOTS - 1
        fast.gen = self._pcache_gen
        fast.prev_max = self.prev_roots_max
        fast.leaf_copy = LEAF_COPY
        self.unsync_sps = {}    # unsync pages, oldest first (a dict: a deterministic order)
        # sync_page's entries in C (_sync_entries_in_c), unless a subclass
        # overrides a rule that loop applies.
        self._sync_c = all(getattr(type(self), n) is getattr(ShadowMmu, n)
                           for n in ("leaf_from_gpte", "set_spte"))
        self._sync_flush = ffi.new("int *")
        self._hmem = vm.hypervisor.host.c_handle
        self.need_flush = False
        self.need_reload = False
        self._pcache = {}       # va >> 21 -> the pages on the path to the level-1 page
                                # under the current root, root first (fill);
                                # ~(va >> 21) -> the same path to the page of the guest
                                # table holding a guest 2 MiB leaf, then the direct
                                # level-1 page under it (_direct_leaf_page)

        # Paging mode (set by set_mode from the guest's CR0/CR4/EFER).
        self.levels = 4
        self.role_base = 0
        self.nxe = True
        self.amask = 0x000FFFFFFFFFF000
        self.rsvd_phys = 0      # bits 51:MAXPHYADDR, reserved in every present entry
        self.rsvd = 0           # ... plus XD when EFER.NXE=0 (the current mode)
        self.maxphyaddr = 52

    # -- the fill cache (level-1 paths under the current root) ---------------------
    def _forget_paths(self):
        """Drop every cached path: a spte was unlinked, a page zapped or made
        unsync, or the root changed.  The C slots go with one generation step."""
        self._pcache.clear()
        gen = self.fast.gen + 1
        self.fast.gen = gen
        self._pcache_gen = gen
        self.fast.path_log_len = 0      # every path logged is of an older generation

    def _paths_current(self):
        """_pcache is of the current generation (C's CR3 fast path moves it on)."""
        f = self.fast
        if self._pcache_gen != f.gen:
            self._pcache.clear()
            self._pcache_gen = f.gen
        if f.path_log_len:
            self._take_path_log()

    def _take_path_log(self):
        """Put the paths C's descent cached (this generation's) into _pcache, as
        the Python descent's _cache_path would have: both ways the fill cache
        then holds the same paths (a fill that hits makes no room)."""
        f = self.fast
        n = f.path_log_len
        f.path_log_len = 0
        log = self.path_log[:n * PATH_LOG_WORDS].tolist()
        by = self.by_frame
        gen = self._pcache_gen
        for k in range(0, n * PATH_LOG_WORDS, PATH_LOG_WORDS):
            if log[k + 1] == gen:
                npath = log[k + 2]
                # (a path to a direct level-1 page: _direct_leaf_page's entry)
                key = ~log[k] if npath & PATH_LOG_DIRECT else log[k]
                npath &= 0xff
                self._pcache[key] = [by[fr] for fr in log[k + 3:k + 3 + npath]]

    # -- the roots: kept in the C context, their one home (fast path 4 reads them) --
    @property
    def root(self):
        """The ShadowPage the real CR3 points at (None: none yet, or it was zapped)."""
        f = self.fast
        return self.by_frame.get(f.root_hpa >> 12) if f.root_key else None

    @root.setter
    def root(self, sp):
        f = self.fast
        if sp is None:
            f.root_key = f.root_hpa = 0
        else:
            f.root_key, f.root_hpa = sp.key, sp.hpa

    def _forget_root(self, sp):
        """sp is being zapped: it is no root any more (the current one: reload)."""
        f = self.fast
        if f.root_key and f.root_hpa == sp.hpa:
            self.need_reload = True
            f.root_key = f.root_hpa = 0
        n = f.nprev
        keep = [(f.prev_key[i], f.prev_hpa[i]) for i in range(n) if f.prev_hpa[i] != sp.hpa]
        if len(keep) != n:
            f.nprev = len(keep)
            for i, (k, h) in enumerate(keep):
                f.prev_key[i], f.prev_hpa[i] = k, h

    @property
    def prev_roots(self):
        """The previous roots, most recent first (KVM prev_roots); a copy."""
        f = self.fast
        by = self.by_frame
        return [by[f.prev_hpa[i] >> 12] for i in range(f.nprev)]

    @prev_roots.setter
    def prev_roots(self, sps):
        f = self.fast
        f.nprev = len(sps)
        for i, sp in enumerate(sps):
            f.prev_key[i], f.prev_hpa[i] = sp.key, sp.hpa

    def _cache_path(self, va, path):
        """Remember the pages on the way to va's level-1 page (root first), for
        the next fill in the same 2 MiB region -- here and in C's slot."""
        self._pcache[va >> 21] = path
        sp = path[-1]
        slot = self.spc[(va >> 21) & (SPC_SLOTS - 1)]
        slot.tag = (va >> 21) + 1
        slot.gen = self._pcache_gen
        slot.l1_base = sp.hpa
        slot.l1_gfn = sp.gfn
        slot.npath = len(path)
        slot.path = [p.hpa >> 12 for p in path]
        # An unsync page's snapshot, which C keeps up as the Python fill does;
        # valid as long as the slot (sync_page and zap move the generation on).
        slot.gsnap = sp.gsnap_c if sp.gsnap_c is not None else ffi.NULL

    def _use(self, pages):
        """A guest access through these pages: their write-flooding counts restart."""
        flood = self._flood
        for p in pages:
            flood[p.hpa >> 12] = 0

    # -- write protection of guest page tables (wp and its C mirror wp_map) --------
    def _protect(self, gfn):
        if gfn < self.nframes and gfn not in self.wp:
            self.wp.add(gfn)
            self._wp_mv[gfn] = 1
            self.write_protect(gfn)

    def _unprotect(self, gfn):
        if gfn in self.wp:
            self.wp.discard(gfn)
            self._wp_mv[gfn] = 0

    # -- paging mode -------------------------------------------------------------
    def set_mode(self, levels, nxe, wp, maxphyaddr):
        """The guest's paging mode; returns True when the role changed (new roots)."""
        base = (R_NXE if nxe else 0) | (R_WP if wp else 0) | (R_LA57 if levels == 5 else 0)
        amask = ((1 << maxphyaddr) - 1) & ~0xFFF
        rsvd = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
        if not nxe:
            rsvd |= NX
        changed = (base != self.role_base or levels != self.levels)
        self._forget_paths()
        if maxphyaddr != self.maxphyaddr:
            # Entry formats changed under every page: start over (rare).
            self.zap_all()
            changed = True
        self.role_base, self.levels, self.nxe = base, levels, nxe
        self.fast.root_role = base | levels | (ACC_ALL << R_ACC_SHIFT)
        self.fast.role_wp = 1 if wp else 0
        self.amask, self.rsvd, self.maxphyaddr = amask, rsvd, maxphyaddr
        self.rsvd_phys = rsvd & ~NX
        self.fast.rsvd_phys = self.rsvd_phys    # (the new mode's: C's spte rule uses it)
        self.fast.amask = amask
        return changed

    # -- shadow pages: create, link, zap -------------------------------------------
    def _alloc_frame(self):
        hv = self.hv
        if not hv.free_frames:
            self._recycle(1, host=True)
        return hv.alloc_frame(owner=self.vm)

    def _hash_room(self):
        """Tell C whether a fill could hit the shadow limit (then it must make room)."""
        self.fast.hash_room = 1 if self.limit is None or len(self.hash) + 5 <= self.limit else 0

    def _mirror_gfn(self, gfn):
        """gfn_sps[gfn] for C (gfn_sp, gfn_nsp), after it changed."""
        if gfn >= self.nframes:
            return
        sps = self.gfn_sps.get(gfn, ())
        n = len(sps)
        if n > GFN_SPS:
            self._nsp_mv[gfn] = 0xff
            return
        self._nsp_mv[gfn] = n
        row = self._gsp_mv
        at = gfn * GFN_SPS
        for k, sp in enumerate(sps):
            row[at + k] = (sp.hpa >> 12) + 1

    def _make_room(self):
        """Before a fill that may create pages (KVM make_mmu_pages_available: on
        the slow path only, never where the fast path would have done)."""
        if (self.limit is not None and len(self.hash) + 5 > self.limit) or \
                self.hv.free_frames < FILL_MIN_FREE:
            self.reserve(self.levels)

    def reserve(self, n):
        """Make room for n new shadow pages (KVM make_mmu_pages_available):
        evict the oldest pages while over the limit or short of host frames.
        Called before a fill, so that nothing on the path being built is evicted."""
        if self.limit is not None and len(self.hash) + n > self.limit:
            self._recycle(len(self.hash) + n - self.limit)
        if self.hv.free_frames < n + 1:
            self._recycle(n + 1 - self.hv.free_frames, host=True)

    def _recycle(self, n, host=False):
        """Zap the n oldest shadow pages that are not the current root."""
        victims = []
        for sp in self.hash.values():          # insertion order: oldest first
            if sp is not self.root:
                victims.append(sp)
                if len(victims) >= n:
                    break
        for sp in victims:
            if sp.alive:
                self.zap(sp)
                self.stats["mmu_recycled"] += 1
        if host and not self.hv.free_frames:
            raise HostMemoryExhausted("no free host frame left (host memory %#x bytes; "
                                      "%d shadow pages in this VM)"
                                      % (self.hv.host.size, len(self.hash)))

    def get_page(self, gfn, role):
        """The shadow page for (gfn, role), created when missing (kvm_mmu_get_page)."""
        key = (gfn << KEY_SHIFT) | role
        h = self.hash
        sp = h.get(key)
        if sp is not None:
            return sp
        st = self.stats
        st["mmu_cache_miss"] += 1
        hpa = self._alloc_frame()
        sp = ShadowPage(gfn, role, hpa)
        h[key] = sp
        fr = hpa >> 12
        self.by_frame[fr] = sp
        n = len(h)
        st["shadow_pages"] = n
        if n > st["shadow_pages_peak"]:
            st["shadow_pages_peak"] = n
        if not sp.direct:
            sps = self.gfn_sps.get(gfn)
            if sps is None:
                self.gfn_sps[gfn] = [sp]
            else:
                # A page that is unsync elsewhere must not stay writable while
                # this new page is read from it (KVM syncs on get_page too).
                for other in sps:
                    if other.unsync:
                        self.sync_page(other)
                sps.append(sp)
            self._mirror_gfn(gfn)
            self._protect(gfn)
        self._flood[fr] = 0
        if sp.level >= 4 and not sp.direct and gfn < self.nframes:
            self._topk_mv[gfn], self._toph_mv[gfn] = key, hpa         # a root candidate
        self._spkey_mv[fr] = key
        self._spi_mv[fr] = (sp.access | (SPI_DIRECT if sp.direct else 0)
                            | (sp.level << SPI_LEVEL_SHIFT) | (SPI_NXE if role & R_NXE else 0))
        self._hash_room()
        return sp

    def link(self, parent, idx, gfn, role):
        """Point parent's spte idx at the shadow page (gfn, role); returns it
        (KVM link_shadow_page).  Non-leaf sptes carry every right: the leaf
        holds the combined ones."""
        old = parent.children.get(idx)
        if old is not None:
            self._unlink(parent, idx, old)
        child = self.get_page(gfn, role)
        addr = parent.hpa + idx * 8
        child.parents.add(addr)
        parent.children[idx] = child
        self._m[addr >> 3] = child.hpa | NONLEAF
        return child

    def _unlink(self, parent, idx, child):
        self._forget_paths()
        addr = parent.hpa + idx * 8
        self._m[addr >> 3] = 0
        del parent.children[idx]
        child.parents.discard(addr)
        self.need_flush = True

    def drop_spte(self, sp, idx):
        """Drop one spte of sp (leaf: rmap too; non-leaf: unlink the child)."""
        if sp.level > 1:
            child = sp.children.get(idx)
            if child is not None:
                self._unlink(sp, idx, child)
            return
        self.set_spte(sp.base + idx, 0)

    def _rmap_remove(self, spte, addr):
        gfn = self.h2g.get(spte >> 12 & 0xFFFFFFFFFF)
        if gfn is not None:
            s = self.rmap.get(gfn)
            if s is not None:
                s.discard(addr)

    @property
    def rmap(self):
        """gfn -> set of host addresses of the leaf sptes mapping it (KVM rmap).
        What the C fast paths logged is taken in first, so that whoever reads
        the rmap sees every spte C wrote."""
        if self.fast.rmap_log_len:
            self.take_rmap_log()
        return self._rmap

    def take_rmap_log(self):
        """Replay what C logged into the rmap, and empty the log."""
        f = self.fast
        self.absorb_rmap_log(f.rmap_log_len)
        f.rmap_log_len = 0

    def absorb_rmap_log(self, n):
        """Replay the n rmap changes the C fast paths logged, in their order:
        (gfn, spte address) added, or (gfn | RMAP_REMOVE, address) removed.
        (C writes sptes; the rmap itself stays Python's.)"""
        rmap = self._rmap
        get = rmap.get
        words = iter(self.rmap_log[:2 * n].tolist())
        for gfn, addr in zip(words, words):     # (gfn, address) pairs
            if gfn & RMAP_REMOVE:
                s = get(gfn & ~RMAP_REMOVE)
                if s is not None:
                    s.discard(addr)
                continue
            s = get(gfn)
            if s is None:
                rmap[gfn] = {addr}
            else:
                s.add(addr)

    def zap(self, sp):
        """Destroy a shadow page (kvm_mmu_prepare_zap_page + commit)."""
        if not sp.alive:
            return
        sp.alive = False
        self._forget_paths()
        m = self._m
        st = self.stats
        st["mmu_shadow_zapped"] += 1
        hpa = sp.hpa
        fr = hpa >> 12
        if sp.parents:
            by = self.by_frame
            for addr in sp.parents:
                m[addr >> 3] = 0
                parent = by.get(addr >> 12)
                if parent is not None:
                    parent.children.pop((addr & 0xFFF) >> 3, None)
            sp.parents = set()
        if sp.level > 1:
            children = sp.children
            if children:
                for idx, child in children.items():
                    child.parents.discard(hpa + idx * 8)
                children.clear()
        else:
            base = sp.base
            table = self._mnp[base:base + 512]
            present = table.nonzero()[0]
            if len(present):
                # _rmap_remove for each present spte, in one pass
                h2g, rmap = self.h2g.get, self.rmap
                a0 = base << 3
                for idx, spte in zip(present.tolist(), table[present].tolist()):
                    gfn = h2g(spte >> 12 & 0xFFFFFFFFFF)
                    if gfn is not None:
                        s = rmap.get(gfn)
                        if s is not None:
                            s.discard(a0 + (idx << 3))
        del self.hash[sp.key]
        del self.by_frame[fr]
        if sp.unsync:
            self.unsync_sps.pop(sp, None)
            self.fast.unsync_pages = len(self.unsync_sps)
            sp.unsync = False
            sp.gsnap = sp.gsnap_c = None
            self._gsnap_mv[fr] = 0
        gfn = sp.gfn
        if not sp.direct:
            sps = self.gfn_sps[gfn]
            sps.remove(sp)
            if not sps:
                del self.gfn_sps[gfn]
                self._unprotect(gfn)
            else:
                for o in sps:
                    if not o.unsync:
                        break
                else:
                    self._unprotect(gfn)
            self._mirror_gfn(gfn)
        self._spi_mv[fr] = 0
        self._spkey_mv[fr] = 0
        top = sp.level >= 4 and not sp.direct      # a root candidate (get_page)
        if top and gfn < self.nframes and self._topk_mv[gfn] == sp.key:
            self._topk_mv[gfn] = 0
        self.hv.free_frame(hpa, self.vm)
        st["shadow_pages"] = len(self.hash)
        self._hash_room()
        self.need_flush = True
        if top:                                     # (roots are such pages: load_root)
            self._forget_root(sp)

    def zap_gfn(self, gfn):
        """Unshadow a guest frame: zap every shadow page of it (any role)."""
        for sp in list(self.gfn_sps.get(gfn, ())):
            self.zap(sp)

    def zap_all(self):
        for sp in list(self.hash.values()):
            self.zap(sp)
        self.prev_roots = []

    # -- write protection and the reverse map ---------------------------------------
    def write_protect(self, gfn):
        """Clear W in every leaf spte mapping gfn (rmap_write_protect)."""
        s = self.rmap.get(gfn)
        if not s:
            return
        m = self._m
        hit = False
        for addr in list(s):
            v = m[addr >> 3]
            if v & W:
                self.set_spte(addr >> 3, v & ~W)
                hit = True
        if hit:
            self.stats["mmu_write_protect"] += 1

    def set_spte(self, i, new):
        """Write leaf spte word i: the one writer of leaf sptes (KVM mmu_spte_update).

        It keeps the rmap (an entry per leaf spte, under the gfn it maps) and
        sets need_flush when a translation the real TLB may hold is lowered,
        moved or removed.  Returns True when the word changed."""
        m = self._m
        old = m[i]
        if old == new:
            return False
        if old:
            if (old ^ new) & ~SPTE_WIDEN or old & ~new & W:
                self.need_flush = True          # lowered or moved: a stale TLB entry
            if new and not (old ^ new) & SPTE_FRAME:
                m[i] = new                      # same frame: the rmap entry stays
                return True
            self._rmap_remove(old, i << 3)
        if new:
            gfn = self.h2g[new >> 12 & 0xFFFFFFFFFF]
            s = self.rmap.get(gfn)
            if s is None:
                self.rmap[gfn] = {i << 3}
            else:
                s.add(i << 3)
        m[i] = new
        return True

    def leaf_from_gpte(self, sp, gpte):
        """The spte a level-1 page `sp` holds for guest PTE gpte, or 0 when none may
        exist yet: not present, A clear (the walk that sets A must happen), a reserved
        bit, a frame outside the VM (never mapped: isolation) or not yet backed."""
        nxe = sp.role & R_NXE       # the page's own mode (pages of an old mode stay cached)
        if not gpte & P or not gpte & A or gpte & (self.rsvd_phys if nxe else
                                                   self.rsvd_phys | NX):
            return 0
        gfn = (gpte & self.amask) >> 12
        if gfn >= self.nframes:
            return 0
        hpa = self._p2m[gfn]
        if hpa == NO_FRAME:
            return 0
        acc = sp.access & ((gpte & ACC_ALL) | TE_NX)
        if nxe and gpte & NX:
            acc |= TE_NX
        return make_leaf_spte(hpa, acc, gpte & LEAF_COPY, gpte & D, gfn in self.wp)

    def direct_role(self, rights, leaf, base=None):
        """Role bits (no level) of the direct pages under guest large leaf `leaf`
        reached with combined rights `rights`: the role's rights lose W while the
        leaf is clean (the first write fault sets D and picks the role with W),
        and the leaf's key, G and caching bits go into every spte."""
        dacc = rights if leaf & D else rights & ~TE_W
        return ((self.role_base if base is None else base) | R_DIRECT | (dacc << R_ACC_SHIFT)
                | (((leaf >> bits.PTE_PKEY_SHIFT) & 0xF) << R_PKEY_SHIFT)
                | (R_G if leaf & G else 0) | (R_PWT if leaf & PWT else 0)
                | (R_PCD if leaf & PCD else 0))

    # -- the hidden-fault fill (FNAME(fetch)) -----------------------------------------
    def fill(self, va, walk, hpa, use=True):
        """Build the shadow path for a successful guest walk and install the leaf
        (KVM FNAME(fetch)).

        walk: the GuestWalk; hpa: the host frame of walk.gpa's page.  use: the
        fault counts as a use of every page on the path (resets their
        write-flooding counts); False for the exit of a store the hypervisor
        then emulates (that store is a write, not a use).  Returns True when
        the leaf spte changed.
        """
        level = walk.level
        rights = walk.rights
        leaf = walk.leaf
        gfn = walk.gpa >> 12
        f = self.fast                       # _paths_current(), written out
        if self._pcache_gen != f.gen or f.path_log_len:
            self._paths_current()
        if level == 1:
            # The level-1 page of this 2 MiB region under the current root, as
            # the last fill left it: valid while no spte was unlinked and no
            # page zapped since (any change of the guest's upper entries traps
            # and unlinks), checked against the table the guest walk used.
            path = self._pcache.get(va >> 21)
            if path is None or path[-1].gfn != walk.table_gpa >> 12:
                self._make_room()
                path = self._descend(va, walk.entries)
                self._cache_path(va, path)
            sp = path[-1]
            if use:
                self._use(path)
            spte = make_leaf_spte(hpa, rights, leaf & LEAF_COPY, leaf & D, gfn in self.wp)
        else:
            sp = self._direct_leaf_page(va, walk, use)
            dacc = sp.access
            spte = make_leaf_spte(hpa, dacc, sp.leafbits, True, gfn in self.wp)
        idx = (va >> 12) & 511
        if sp.gsnap is not None:
            sp.gsnap[idx] = leaf
        changed = self.set_spte(sp.base + idx, spte)
        if self.prefetch and not sp.direct:
            self._prefetch(sp, idx)
        return changed

    def _direct_leaf_page(self, va, walk, use):
        """The direct level-1 page mapping va of a guest large page (2 MiB or
        1 GiB) backed by 4 KiB host frames: direct pages below the guest
        table's shadow, keyed by the base frame of the range they map."""
        gfn = walk.gpa >> 12
        extra = self.direct_role(walk.rights, walk.leaf)
        # The direct level-1 page of a guest 2 MiB page, as the last fill left
        # it: cached under ~(va >> 21) after the path to it (root first, as
        # _descend gave it), valid while no spte was unlinked and no page
        # zapped since, as the level-1 paths of fill.  A fill that is no use
        # of the path takes the page; a use takes the path too (after making
        # room, as always), when it ends at the guest table the walk used --
        # _descend would give the same path and link nothing.
        if walk.level == 2:
            want = ((gfn & ~511) << KEY_SHIFT) | extra | 1
            if not use:
                ent = self._pcache.get(~(va >> 21))
                if ent is not None and ent[-1].key == want:
                    return ent[-1]
                self._make_room()
            else:
                self._make_room()
                ent = self._pcache.get(~(va >> 21))
                if ent is not None and ent[-1].key == want and \
                        ent[-2].gfn == walk.table_gpa >> 12:
                    self._use(ent[:-1])
                    return ent[-1]
        else:
            self._make_room()
        path = self._descend(va, walk.entries)
        if use:
            self._use(path)
        sp = path[-1]
        L = walk.level - 1      # for_each_shadow_entry(sp, va, walk.level), written out
        while L:
            dgfn = gfn & ~((1 << (9 * L)) - 1)
            idx = (va >> SHIFT[L + 1]) & 511
            child = sp.children.get(idx)
            if child is None or child.key != (dgfn << KEY_SHIFT) | extra | L:
                child = self.link(sp, idx, dgfn, extra | L)
            sp = child
            L -= 1
        if walk.level == 2:
            path.append(sp)
            self._pcache[~(va >> 21)] = path
        return sp

    def _descend(self, va, gptes):
        """The pages on the shadow path for a guest walk whose entries are gptes
        (top first), down to the shadow page of the guest table holding the
        walk's leaf entry: one shadow page per guest table on the way, per
        role, linked where missing.  Returns the path, root first."""
        acc = ACC_ALL
        base = self.role_base
        nxe = self.nxe
        amask = self.amask
        last = len(gptes) - 1
        # for_each_shadow_entry(self.root, va, self.levels), written out
        sp = self.root
        level = self.levels
        path = [sp]
        for k in range(last):
            e = gptes[k]
            acc &= (e & ACC_ALL) | TE_NX
            if nxe and e & NX:
                acc |= TE_NX
            role = base | (level - 1) | (acc << R_ACC_SHIFT)
            cgfn = (e & amask) >> 12
            idx = (va >> SHIFT[level]) & 511
            child = sp.children.get(idx)
            if child is None or child.key != (cgfn << KEY_SHIFT) | role:
                child = self.link(sp, idx, cgfn, role)
            sp = child
            level -= 1
            path.append(sp)
        return path

    def _prefetch(self, sp, idx):
        """Map the neighbours of idx (an aligned group of 8, KVM PTE_PREFETCH_NUM)
        whose guest entries are present and already accessed."""
        gbase = self._p2m[sp.gfn]
        if sp.gfn >= self.nframes or gbase == NO_FRAME:
            return
        m = self._m
        g0 = gbase >> 3
        start = idx & ~7
        for j in range(start, start + 8):
            if j == idx or m[sp.base + j]:
                continue
            gpte = m[g0 + j]
            spte = self.leaf_from_gpte(sp, gpte)
            if spte:
                if sp.gsnap is not None:
                    sp.gsnap[j] = gpte
                self.set_spte(sp.base + j, spte)
                self.stats["mmu_prefetch"] += 1

    # -- roots (CR3) -------------------------------------------------------------------
    def load_root(self, gfn):
        """The shadow root for guest top table gfn (prev_roots first, then the hash)."""
        role = self.role_base | self.levels | (ACC_ALL << R_ACC_SHIFT)
        key = (gfn << KEY_SHIFT) | role
        cur = self.root
        if cur is not None and cur.key == key:
            return cur
        prev = self.prev_roots             # (every page in it is alive: zap removes it)
        for i, sp in enumerate(prev):
            if sp.key == key:
                self.stats["prev_root_hit"] += 1
                root = sp
                del prev[i]
                break
        else:
            self.reserve(1)
            root = self.get_page(gfn, role)
            prev = self.prev_roots         # (reserve may have zapped some)
            cur = self.root
        self._forget_paths()
        if cur is not None and self.prev_roots_max:
            prev.insert(0, cur)
        self.prev_roots = [sp for sp in prev if sp is not root][:self.prev_roots_max]
        self.root = root
        return root

    # -- writes to shadowed guest page tables --------------------------------------------
    def pte_written(self, gfn, offset, old, new, nbytes=8, flood=True):
        """A write of nbytes at offset of guest frame gfn, which has shadow pages
        (kvm_mmu_pte_write): flood and misalignment detection, then update or
        drop the affected sptes of every shadow page of the frame."""
        sps = self.gfn_sps.get(gfn)
        if not sps:
            return
        st = self.stats
        st["mmu_pte_write"] += 1
        # KVM detect_write_misaligned: a write that is not one whole entry
        # (a 1-byte write at an entry's start is the usual clear_bit, allowed).
        misaligned = (offset ^ (offset + nbytes - 1)) & ~7 or (nbytes < 4 and not
                                                               (offset & 7 == 0 and nbytes == 1))
        idx = offset >> 3
        for sp in list(sps):
            if not sp.alive:
                continue
            if misaligned:
                st["mmu_misaligned"] += 1
                self.zap(sp)
                continue
            # Flooding: three emulated writes with no use in between.  Level-1
            # pages are skipped when they can go unsync instead (as KVM).
            if flood and (sp.level > 1 or not self.allow_unsync):
                f = self._flood[sp.hpa >> 12] + 1
                self._flood[sp.hpa >> 12] = f
                if f >= FLOOD_ZAP:
                    st["mmu_flooded"] += 1
                    self.zap(sp)
                    continue
            if old == new:
                continue
            if sp.level > 1:
                if idx in sp.children:
                    self.drop_spte(sp, idx)
                    st["mmu_pde_zapped"] += 1
            else:
                spte = self.leaf_from_gpte(sp, new)
                if sp.gsnap is not None:
                    sp.gsnap[idx] = new
                if self.set_spte(sp.base + idx, spte) and spte:
                    st["mmu_pte_updated"] += 1

    # -- unsync --------------------------------------------------------------------------
    def try_unsync(self, gfn):
        """Leave guest table gfn writable (kvm_unsync_page), when every shadow
        page of it is a level-1 page.  Returns True on success."""
        sps = self.gfn_sps.get(gfn, ())
        for sp in sps:
            if sp.level != 1:
                return False
        gbase = self._p2m[gfn]
        for sp in sps:
            if not sp.unsync:
                sp.unsync = True
                # In sync until now, so the guest table as it is now is what
                # the present sptes were made from.
                sp.gsnap = self._mnp[gbase >> 3:(gbase >> 3) + 512].copy()
                sp.gsnap_c = ffi.from_buffer("uint64_t[]", sp.gsnap)
                self._gsnap_mv[sp.hpa >> 12] = int(ffi.cast("uintptr_t", sp.gsnap_c))
                self.unsync_sps[sp] = None
                self.fast.unsync_pages = len(self.unsync_sps)
                self.stats["mmu_unsync"] += 1
        self._forget_paths()        # slots made while it was in sync have no snapshot
        self._unprotect(gfn)
        return True

    def sync_page(self, sp):
        """Bring an unsync page back in sync and write-protect its frame again."""
        if not sp.unsync:
            return
        if not self._sync_entries_in_c(sp):
            m, mnp = self._m, self._mnp
            gbase = self._p2m[sp.gfn] >> 3
            guest = mnp[gbase:gbase + 512]
            shadow = mnp[sp.base:sp.base + 512]
            changed = np.flatnonzero((sp.gsnap != guest) & (shadow != 0))
            for idx in changed.tolist():
                self.set_spte(sp.base + idx, self.leaf_from_gpte(sp, m[gbase + idx]))
        self._forget_paths()        # no slot may keep the snapshot's address
        sp.unsync = False
        sp.gsnap = sp.gsnap_c = None
        self._gsnap_mv[sp.hpa >> 12] = 0
        self.unsync_sps.pop(sp, None)
        self.fast.unsync_pages = len(self.unsync_sps)
        self.stats["mmu_sync"] += 1
        self._protect(sp.gfn)

    def _sync_entries_in_c(self, sp):
        """sync_page's loop over the entries (the Python one above is the
        reference) done by C, ptemu_shadow_sync_page: the same sptes by the
        rules of leaf_from_gpte and set_spte, in the same order, the rmap
        changes logged.  Only while the vCPU has its fast paths on and
        neither of those two is overridden; True when C did it."""
        f = self.fast
        if not f.enabled or not self._sync_c:
            return False
        if f.rmap_log_len + 2 * 512 > RMAP_LOG_PAIRS:
            self.take_rmap_log()        # room for every entry's removal and addition
        flush = self._sync_flush
        flush[0] = 0
        r = lib.ptemu_shadow_sync_page(f, self._hmem, sp.hpa, sp.gfn, sp.gsnap_c, flush)
        if r < 0:
            raise ShadowMmuError("sync of %r: C could not read host memory" % sp)
        if flush[0]:
            self.need_flush = True
        return r == 1

    def sync_all(self):
        """Every unsync page (at a guest TLB flush: MOV CR3 and the like)."""
        for sp in list(self.unsync_sps):
            self.sync_page(sp)

    def invlpg(self, va):
        """Guest INVLPG: resync the entry for va if its leaf page is unsync
        (FNAME(invlpg)).  Synced pages are coherent already."""
        if self.root is None or not self.unsync_sps:
            return
        for it in for_each_shadow_entry(self.root, va, self.levels):
            pass
        sp = it.sp
        if it.level == 1 and sp.unsync:
            idx = it.index
            gpte = self._m[(self._p2m[sp.gfn] >> 3) + idx]
            if gpte != sp.gsnap[idx]:
                sp.gsnap[idx] = gpte
                self.set_spte(sp.base + idx, self.leaf_from_gpte(sp, gpte))
                self.stats["mmu_sync_entry"] += 1

    # -- inspection ----------------------------------------------------------------------
    def pages(self):
        """Live shadow pages, oldest first."""
        return list(self.hash.values())

    def table(self, sp):
        """sp's 512 sptes (a live numpy view of host memory)."""
        return self._mnp[sp.base:sp.base + 512]


# -- audits (used by the tests; KVM had mmu_audit.c) --------------------------------------
def audit(vm):
    """Check every invariant of a VM's shadow MMU; returns a list of problems.

    Isolation: every spte points at this VM's shadow pages (non-leaf) or at
    host frames backing this VM's guest memory (leaf).  Coherence of every
    synced shadow page with the guest table it shadows: a leaf spte maps
    p2m(gpte's frame) with rights no wider than the guest's (the role's
    inherited rights ANDed with the gpte's; W only with the guest's D and
    never onto a write-protected frame), only for a gpte that is present,
    accessed and free of reserved bits; a non-leaf spte points at the page of
    (gpte's frame, inherited role).  Bookkeeping: rmap and write protection.
    """
    sh = vm.shadow
    m = sh._m
    problems = []
    owned = set(f >> 12 for f in vm.p2m.tolist() if f != NO_FRAME)
    for sp in sh.hash.values():
        if sp.hpa >> 12 not in vm.frames_owned:
            problems.append("%r: shadow page frame not owned by the VM" % sp)
        tab = sh.table(sp)
        present = np.flatnonzero(tab).tolist()
        nxe = bool(sp.role & R_NXE)
        rsvd = sh.rsvd_phys | (0 if nxe else NX)
        gtab = None
        if not sp.direct and sp.gfn < sh.nframes and sh._p2m[sp.gfn] != NO_FRAME:
            gtab = np.frombuffer(m[sh._p2m[sp.gfn] >> 3:(sh._p2m[sp.gfn] >> 3) + 512],
                                 dtype=np.uint64)
        for idx in present:
            spte = int(tab[idx])
            target = (spte & 0x000FFFFFFFFFF000) >> 12
            if sp.level > 1:
                child = sp.children.get(idx)
                if child is None or child.hpa >> 12 != target or not child.alive:
                    problems.append("%r[%d]: non-leaf spte %#x not a live child" % (sp, idx, spte))
                    continue
                if spte != child.hpa | NONLEAF:
                    problems.append("%r[%d]: non-leaf spte %#x has wrong bits" % (sp, idx, spte))
                if sp.direct:
                    span = 1 << (9 * (sp.level - 1))
                    want = (sp.gfn + idx * span, (sp.role & ~R_LEVEL) | (sp.level - 1))
                    if (child.gfn, child.role) != want:
                        problems.append("%r[%d]: direct child %r" % (sp, idx, child))
                    continue
                if gtab is None:
                    problems.append("%r[%d]: shadows no guest table yet has children" % (sp, idx))
                    continue
                g = int(gtab[idx])
                if not g & P or not g & A or g & rsvd or (sp.level >= 4 and g & PS):
                    problems.append("%r[%d]: child %r for gpte %#x" % (sp, idx, child, g))
                    continue
                acc = sp.access & ((g & ACC_ALL) | TE_NX)
                if nxe and g & NX:
                    acc |= TE_NX
                if g & PS and sp.level <= 3:
                    # (made while the leaf was clean, a child without W is narrower: fine)
                    span = (1 << (9 * (sp.level - 1))) - 1
                    want = ((((g & sh.amask) >> 12) & ~span) << KEY_SHIFT) | (sp.level - 1)
                    if child.key not in (want | sh.direct_role(acc, g, sp.role & R_MODE),
                                         want | sh.direct_role(acc, g & ~D, sp.role & R_MODE)):
                        problems.append("%r[%d]: large gpte %#x, child %r" % (sp, idx, g, child))
                    continue
                if child.direct or child.gfn != (g & sh.amask) >> 12 or child.access != acc:
                    problems.append("%r[%d]: child %r does not shadow gpte %#x"
                                    % (sp, idx, child, g))
                continue
            # leaf spte
            gfn = vm.h2g.get(target)
            if target not in owned or gfn is None:
                problems.append("%r[%d]: leaf spte %#x maps a host frame outside the VM"
                                % (sp, idx, spte))
                continue
            if spte & W and gfn in sh.wp:
                problems.append("%r[%d]: writable spte onto write-protected gfn %#x"
                                % (sp, idx, gfn))
            if (sp.base + idx) << 3 not in sh.rmap.get(gfn, ()):
                problems.append("%r[%d]: spte %#x missing from the rmap of gfn %#x"
                                % (sp, idx, spte, gfn))
            if sp.direct:
                want = sp.gfn + idx
                if gfn != want:
                    problems.append("%r[%d]: direct spte maps gfn %#x, not %#x"
                                    % (sp, idx, gfn, want))
                wide = _wider(spte, sp.access, 1)
                if wide:
                    problems.append("%r[%d]: spte %#x wider than role (%s)" % (sp, idx, spte, wide))
                continue
            if sp.unsync or gtab is None:
                continue
            g = int(gtab[idx])
            if not g & P or not g & A or g & rsvd or (g & sh.amask) >> 12 != gfn:
                problems.append("%r[%d]: spte %#x does not follow gpte %#x" % (sp, idx, spte, g))
                continue
            acc = sp.access & ((g & ACC_ALL) | TE_NX)
            if nxe and g & NX:
                acc |= TE_NX
            wide = _wider(spte, acc, g & D)
            if wide:
                problems.append("%r[%d]: spte %#x wider than gpte %#x (%s)"
                                % (sp, idx, spte, g, wide))
            if (spte ^ g) & PKEY_MASK:
                problems.append("%r[%d]: spte %#x has another key than gpte %#x" % (sp, idx, spte, g))
    for gfn, addrs in sh.rmap.items():
        for addr in addrs:
            v = m[addr >> 3]
            if not v or vm.h2g.get((v >> 12) & 0xFFFFFFFFFF) != gfn:
                problems.append("rmap of gfn %#x lists %#x holding %#x" % (gfn, addr, v))
            elif gfn in sh.wp and v & W:
                problems.append("gfn %#x write-protected but spte at %#x is writable" % (gfn, addr))
    for gfn, sps in sh.gfn_sps.items():
        synced = [sp for sp in sps if not sp.unsync]
        if gfn < sh.nframes and bool(synced) != (gfn in sh.wp):
            problems.append("gfn %#x: %d synced pages but write-protected=%s"
                            % (gfn, len(synced), gfn in sh.wp))
    root = sh.root
    if root is not None:
        if not root.alive:
            problems.append("the root %r is dead" % root)
        elif vm.vcpu._rcpu.cr3 & 0x000FFFFFFFFFF000 != root.hpa:
            problems.append("the real CR3 %#x is not the root %r" % (vm.vcpu._rcpu.cr3, root))
    return problems


def _wider(spte, acc, dirty):
    """Which rights spte has beyond acc (TE form), and W without D."""
    out = []
    if spte & W and not (acc & TE_W and dirty):
        out.append("W")
    if spte & U and not acc & TE_U:
        out.append("U")
    if not spte & NX and acc & TE_NX:
        out.append("X")
    return " ".join(out)
