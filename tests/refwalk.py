"""An independent, slow, pure-Python x86-64 page walker: the test oracle.

Written from the Intel SDM Vol. 3A, chapter 4, and /work/shared/NOTES-paging.md,
not from csrc/walk.c.  It favours being obviously right over being fast:
every paging-structure entry becomes an `Entry` object that knows its level,
its decoded flags and its reserved-bit verdict; rights are decided by one
function per access kind, each quoting the rule it implements.

    walk(memory, va=..., access="r", cr0=..., cr3=..., cr4=..., efer=..., ...)
        -> (Outcome, memory_after)

Outcome.as_tuple() is one of
    ("ok", pa, page_size, level, [(entry_pa, value), ...top first])
    ("gp",)
    ("pf", error_code)

memory_after is the memory with the accessed/dirty bits the walk set (a new
bytearray, unless inplace=True and the input is mutable); on a fault, or with
update_ad=False, it is the input memory, untouched.

Sections used:
  4.1.1  paging off: linear address = physical address
  4.5    4-level and 5-level paging: CR3, table indices, leaves at PTE / PDE
         with PS=1 / PDPTE with PS=1; reserved bits (tables 4-14 .. 4-20)
  4.5.1  (and 3.3.7.1) canonical addresses: otherwise #GP(0), no walk
  4.6.1  determination of access rights (U/S, R/W, XD, CR0.WP, SMEP, SMAP, AC)
  4.6.2  protection keys (PKRU for user-mode addresses, PKRS for supervisor)
  4.7    page-fault error code (P, W/R, U/S, RSVD, I/D, PK), CR2
  4.8    accessed and dirty flags

ptemu's documented definitions where the SDM leaves a choice (csrc/walk.c
header, NOTES "Accessed and dirty"):
  * A/D bits are written only after the walk passed every check (Bochs/Intel
    order), so a faulting walk writes nothing.
  * A paging-structure entry whose 8 bytes do not lie wholly inside memory
    reads as "nonexistent memory": #PF with P|RSVD plus the access bits.
"""

# ---------------------------------------------------------------------------
# Architectural numbers, spelled out here on purpose (an oracle that imported
# the implementation's constants could share its typos).
# ---------------------------------------------------------------------------
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31

CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24

EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# Bits of a paging-structure entry (SDM tables 4-15 .. 4-20)
BIT_P = 0
BIT_RW = 1
BIT_US = 2
BIT_PWT = 3
BIT_PCD = 4
BIT_A = 5
BIT_D = 6
BIT_PS = 7          # PAT in a PTE
BIT_G = 8
BIT_PAT_LARGE = 12  # PAT in a 2 MiB / 1 GiB leaf
BIT_XD = 63
PKEY_LOW, PKEY_HIGH = 59, 62

# #PF error code (SDM 4.7, figure 4-12)
EC_P = 1 << 0
EC_WR = 1 << 1
EC_US = 1 << 2
EC_RSVD = 1 << 3
EC_ID = 1 << 4
EC_PK = 1 << 5

LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
PAGE_SIZE_OF_LEAF = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}


def bit(value, n):
    return (value >> n) & 1


def bits_between(high, low):
    """The mask of bits high..low inclusive (empty when high < low)."""
    if high < low:
        return 0
    return ((1 << (high + 1)) - 1) & ~((1 << low) - 1)


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------
class Memory:
    """Little-endian 8-byte loads and stores over a private bytearray."""

    def __init__(self, data):
        self.data = data

    @property
    def size(self):
        return len(self.data)

    def holds(self, pa, n=8):
        return 0 <= pa and pa + n <= len(self.data)

    def load_u64(self, pa):
        return int.from_bytes(bytes(self.data[pa:pa + 8]), "little")

    def store_u64(self, pa, value):
        # through a memoryview, so numpy uint8 arrays take bytes as well
        memoryview(self.data)[pa:pa + 8] = value.to_bytes(8, "little")


# ---------------------------------------------------------------------------
# One paging-structure entry, decoded
# ---------------------------------------------------------------------------
class Entry:
    """A paging-structure entry read at `level` from `pa`."""

    def __init__(self, level, pa, value, maxphyaddr, nxe):
        self.level = level
        self.name = LEVEL_NAMES[level]
        self.pa = pa
        self.value = value
        self.maxphyaddr = maxphyaddr
        self.nxe = nxe

    # flags
    @property
    def present(self):
        return bit(self.value, BIT_P) == 1

    @property
    def writable(self):
        return bit(self.value, BIT_RW) == 1

    @property
    def user(self):
        return bit(self.value, BIT_US) == 1

    @property
    def execute_disable(self):
        # XD is only a flag when IA32_EFER.NXE=1; otherwise bit 63 is reserved.
        return self.nxe and bit(self.value, BIT_XD) == 1

    @property
    def page_size_bit(self):
        return bit(self.value, BIT_PS) == 1

    @property
    def maps_page(self):
        """SDM 4.5.4: a PTE always maps a 4 KiB page; a PDE or PDPTE with
        PS=1 maps a 2 MiB / 1 GiB page; a PML4E/PML5E never does (PS is
        reserved there, see reserved_mask)."""
        if self.level == 1:
            return True
        if self.level in (2, 3):
            return self.page_size_bit
        return False

    @property
    def protection_key(self):
        return (self.value >> PKEY_LOW) & 0xF

    # addresses
    def next_table(self):
        """Physical address of the table this entry references: bits
        M-1:12 (SDM tables 4-15 .. 4-19, "Physical address of 4-KByte
        aligned ... table referenced by this entry")."""
        return self.value & bits_between(self.maxphyaddr - 1, 12)

    def page_frame(self):
        """Physical address of the page this leaf maps: bits M-1:12 / M-1:21
        / M-1:30 (bit 12 is PAT in large leaves, not address)."""
        size = PAGE_SIZE_OF_LEAF[self.level]
        low = size.bit_length() - 1
        return self.value & bits_between(self.maxphyaddr - 1, low)

    # reserved bits
    def reserved_mask(self):
        """Bits that must be 0 in this present entry (SDM 4.5.4, tables
        4-14 .. 4-20; NOTES "Walk")."""
        mask = bits_between(51, self.maxphyaddr)            # beyond MAXPHYADDR
        if not self.nxe:
            mask |= 1 << BIT_XD                              # XD without NXE
        if self.level >= 4:
            mask |= 1 << BIT_PS                              # PS in PML4E/PML5E
        if self.level == 3 and self.page_size_bit:
            mask |= bits_between(29, 13)                     # 1 GiB page: 29:13
        if self.level == 2 and self.page_size_bit:
            mask |= bits_between(20, 13)                     # 2 MiB page: 20:13
        return mask

    def has_reserved_bits(self):
        return (self.value & self.reserved_mask()) != 0

    def __repr__(self):
        return "%s@%#x=%#018x" % (self.name, self.pa, self.value)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------
class Outcome:
    """kind 'ok', 'gp' or 'pf' with everything the tests compare."""

    def __init__(self, kind, **kw):
        self.kind = kind
        self.pa = kw.get("pa")
        self.page_size = kw.get("page_size")
        self.level = kw.get("level")
        self.entries = kw.get("entries", [])
        self.writable = kw.get("writable")
        self.user = kw.get("user")
        self.executable = kw.get("executable")
        self.error_code = kw.get("error_code")
        self.cr2 = kw.get("cr2")
        self.cause = kw.get("cause")
        self.fault_level = kw.get("fault_level")
        self.leaf = kw.get("leaf")

    def as_tuple(self):
        if self.kind == "ok":
            return ("ok", self.pa, self.page_size, self.level, list(self.entries))
        if self.kind == "gp":
            return ("gp",)
        return ("pf", self.error_code)

    def __repr__(self):
        if self.kind == "pf":
            return "Outcome(pf, ec=%#x, cause=%s, level=%s)" % (
                self.error_code, self.cause, self.fault_level)
        if self.kind == "gp":
            return "Outcome(gp)"
        return "Outcome(ok, pa=%#x, size=%#x, level=%d)" % (self.pa, self.page_size, self.level)


# ---------------------------------------------------------------------------
# Access rights (SDM 4.6)
# ---------------------------------------------------------------------------
class Access:
    """What is being done: kind 'r'/'w'/'x', user or supervisor mode,
    explicit or implicit."""

    def __init__(self, kind, user_mode, implicit):
        if kind not in ("r", "w", "x"):
            raise ValueError("access must be 'r', 'w' or 'x'")
        self.kind = kind
        self.user_mode = user_mode
        self.implicit = implicit

    @property
    def is_write(self):
        return self.kind == "w"

    @property
    def is_fetch(self):
        return self.kind == "x"

    @property
    def is_data(self):
        return self.kind in ("r", "w")


def page_rights(entries):
    """The rights a translation grants, combined over every entry used
    (SDM 4.6.1): R/W and U/S must be 1 in all of them; XD=1 in any (with
    NXE) forbids fetches."""
    return {
        "writable": all(e.writable for e in entries),
        "user": all(e.user for e in entries),
        "execute_disable": any(e.execute_disable for e in entries),
    }


def user_mode_access_allowed(acc, r):
    """SDM 4.6.1, user-mode accesses (CPL 3, not implicit)."""
    if not r["user"]:
        return False                         # supervisor-mode addresses: never
    if acc.kind == "r":
        return True                          # any user-mode address is readable
    if acc.kind == "w":
        return r["writable"]                 # R/W=1 at every level (WP irrelevant)
    return not r["execute_disable"]          # fetch: XD=0 at every level (NXE)


def supervisor_mode_access_allowed(acc, r, wp, smep, smap, ac):
    """SDM 4.6.1, supervisor-mode accesses (CPL < 3, or implicit)."""
    if acc.is_fetch:
        if r["user"] and smep:
            return False                     # SMEP: no fetch from user-mode addresses
        return not r["execute_disable"]      # otherwise XD decides (user page or not)
    # data
    if r["user"] and smap:
        # SMAP: explicit accesses with RFLAGS.AC=1 are let through, and then
        # follow the rules as if SMAP were off; implicit accesses never.
        if acc.implicit or not ac:
            return False
    if acc.kind == "r":
        return True
    # write
    if not wp:
        return True                          # CR0.WP=0: supervisor may write anything
    return r["writable"]                     # CR0.WP=1: needs R/W=1 at every level


def protection_key_blocks(acc, r, leaf, wp, lma, pke, pks, pkru, pkrs):
    """SDM 4.6.2: keys apply to data accesses only.  A user-mode address
    (U/S=1 everywhere) takes its rights from PKRU when CR4.PKE=1; a
    supervisor-mode address from IA32_PKRS when CR4.PKS=1.  For key i,
    AD_i (bit 2i) forbids all data accesses, WD_i (bit 2i+1) forbids writes
    if the access is user-mode or CR0.WP=1."""
    if not acc.is_data or not lma:
        return False
    if r["user"]:
        if not pke:
            return False
        reg = pkru
    else:
        if not pks:
            return False
        reg = pkrs
    key = leaf.protection_key
    access_disable = (reg >> (2 * key)) & 1
    write_disable = (reg >> (2 * key + 1)) & 1
    if access_disable:
        return True
    if write_disable and acc.is_write and (acc.user_mode or wp):
        return True
    return False


# ---------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------
def is_canonical(va, width):
    """Bits 63:width-1 all equal (SDM 3.3.7.1, 4.5.1)."""
    top = va >> (width - 1)
    return top == 0 or top == (1 << (64 - width + 1)) - 1


def walk(memory, *, va, access="r", cr0, cr3, cr4, efer, cpl=0, user=None, implicit=False,
         ac=False, pkru=0, pkrs=0, maxphyaddr=52, update_ad=True, inplace=False):
    """Translate one access; see the module docstring.

    user: None means "user mode iff cpl == 3"; True/False force the mode.
    implicit: an implicit supervisor-mode access (SDM 4.6: e.g. a
    descriptor-table load), whatever the CPL.
    """
    if not 0 <= va < 1 << 64:
        raise ValueError("va must be a 64-bit value")
    if implicit:
        user_mode = False
    elif user is None:
        user_mode = cpl == 3
    else:
        user_mode = bool(user)
    acc = Access(access, user_mode, implicit)

    if inplace:
        if isinstance(memory, bytes):
            raise ValueError("inplace=True needs mutable memory")
        data = memory        # bytearray or numpy uint8 array: written directly
    else:
        data = None          # copied lazily, only if the walk writes something
    mem = Memory(memory)

    # --- paging off (SDM 4.1.1): linear = physical, nothing to check ------
    if not cr0 & CR0_PG:
        return Outcome("ok", pa=va, page_size=1 << 12, level=0, entries=[],
                       writable=True, user=True, executable=True), memory

    # Only 4-level and 5-level paging are modelled (CR4.PAE=1, EFER.LME=1).
    if not (cr4 & CR4_PAE and efer & EFER_LME):
        raise ValueError("refwalk models 4-level and 5-level paging only")
    lma = True
    levels = 5 if cr4 & CR4_LA57 else 4
    nxe = bool(efer & EFER_NXE)
    wp = bool(cr0 & CR0_WP)
    smep = bool(cr4 & CR4_SMEP)
    smap = bool(cr4 & CR4_SMAP)
    pke = bool(cr4 & CR4_PKE)
    pks = bool(cr4 & CR4_PKS)

    # --- canonical check (SDM 4.5.1): #GP(0), no walk, CR2 unchanged ------
    if not is_canonical(va, 57 if levels == 5 else 48):
        return Outcome("gp"), memory

    # The access bits of the error code (SDM 4.7): they describe the access,
    # not the rights; I/D only when fetches can be told apart.
    access_ec = 0
    if acc.is_write:
        access_ec |= EC_WR
    if acc.user_mode:
        access_ec |= EC_US
    if acc.is_fetch and (nxe or smep):
        access_ec |= EC_ID

    def page_fault(ec, cause, level):
        return Outcome("pf", error_code=ec, cr2=va, cause=cause, fault_level=level), memory

    # --- the level loop (SDM 4.5.4) ---------------------------------------
    # CR3 bits M-1:12 locate the top table; bits 11:0 are PCID or PWT/PCD.
    table = cr3 & bits_between(maxphyaddr - 1, 12)
    used = []
    leaf = None
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        index = (va >> shift) & 0x1FF
        entry_pa = table + 8 * index
        if not mem.holds(entry_pa):
            # Nonexistent memory reads all ones -> bits 51:M reserved set
            # (ptemu's defined answer, csrc/walk.c header).
            return page_fault(EC_P | EC_RSVD | access_ec, "outside-memory", level)
        e = Entry(level, entry_pa, mem.load_u64(entry_pa), maxphyaddr, nxe)
        used.append(e)
        if not e.present:
            # P=0: nothing else in the entry is looked at (SDM 4.7 RSVD note).
            return page_fault(access_ec, "not-present", level)
        if e.has_reserved_bits():
            return page_fault(EC_P | EC_RSVD | access_ec, "reserved-bit", level)
        if e.maps_page:
            leaf = e
            break
        table = e.next_table()
    assert leaf is not None

    # --- rights (SDM 4.6) --------------------------------------------------
    r = page_rights(used)
    if acc.user_mode:
        allowed = user_mode_access_allowed(acc, r)
    else:
        allowed = supervisor_mode_access_allowed(acc, r, wp, smep, smap, ac)
    pk_blocks = protection_key_blocks(acc, r, leaf, wp, lma, pke, pks, pkru, pkrs)
    if not allowed or pk_blocks:
        # PK is reported whenever the key forbids the access, whether or not
        # another check failed as well (SDM 4.7; NOTES "#PF error code").
        return page_fault(EC_P | access_ec | (EC_PK if pk_blocks else 0), "protection", 0)

    # --- accessed and dirty (SDM 4.8), only now that every check passed ---
    size = PAGE_SIZE_OF_LEAF[leaf.level]
    pa = leaf.page_frame() | (va & (size - 1))
    out_memory = memory
    if update_ad:
        wanted = [(e.pa, 1 << BIT_A) for e in used]
        if acc.is_write:
            wanted.append((leaf.pa, 1 << BIT_D))
        for epa, flag in wanted:
            # Re-read: the same entry may serve at two levels (a recursive
            # slot), so each update must OR into what memory holds now.
            current = mem.load_u64(epa)
            if not current & flag:
                if data is None:
                    data = bytearray(bytes(memory))
                    mem = Memory(data)
                mem.store_u64(epa, current | flag)
        if data is not None:
            out_memory = data
    entries = [(e.pa, mem.load_u64(e.pa)) for e in used]
    return Outcome("ok", pa=pa, page_size=size, level=leaf.level, entries=entries,
                   writable=r["writable"], user=r["user"],
                   executable=not r["execute_disable"], leaf=entries[-1][1]), out_memory


def walk_cpu(memory, cpu, va, access="r", **kw):
    """walk() with the registers taken from a ptemu.CpuState-like object."""
    return walk(memory, va=va, access=access, cr0=cpu.cr0, cr3=cpu.cr3, cr4=cpu.cr4,
                efer=cpu.efer, cpl=cpu.cpl, ac=cpu.ac, pkru=cpu.pkru, pkrs=cpu.pkrs,
                maxphyaddr=cpu.maxphyaddr, **kw)
