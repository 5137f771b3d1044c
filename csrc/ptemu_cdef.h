/*
 * ptemu_cdef.h -- the C contract of ptemu, in the subset of C that cffi's
 * cdef() parses: integer #defines, typedef'd structs, prototypes.  No
 * #include, no #if.  csrc/ptemu.h includes this file, so the compiler and
 * cffi read the very same declarations; nothing is typed twice.
 *
 * Every constant Python needs comes from here through `lib`.
 */

/* ---- Control registers (SDM Vol. 3A 2.5, 2.2.1) ------------------------ */
#define PTEMU_CR0_PE        0x00000001
#define PTEMU_CR0_WP        0x00010000
#define PTEMU_CR0_PG        0x80000000

#define PTEMU_CR4_PSE       0x00000010
#define PTEMU_CR4_PAE       0x00000020
#define PTEMU_CR4_PGE       0x00000080
#define PTEMU_CR4_LA57      0x00001000
#define PTEMU_CR4_PCIDE     0x00020000
#define PTEMU_CR4_SMEP      0x00100000
#define PTEMU_CR4_SMAP      0x00200000
#define PTEMU_CR4_PKE       0x00400000
#define PTEMU_CR4_PKS       0x01000000

#define PTEMU_EFER_LME      0x00000100
#define PTEMU_EFER_LMA      0x00000400
#define PTEMU_EFER_NXE      0x00000800

/* CR3 (SDM 4.5.2, 4.10.4.1): PCID in 11:0 when CR4.PCIDE=1; bit 63 on a
 * MOV to CR3 with PCIDE=1 asks the processor not to flush, and is not stored. */
#define PTEMU_CR3_PCID_MASK 0x0000000000000fff
#define PTEMU_CR3_NOFLUSH   0x8000000000000000

/* ---- Paging-structure entry bits (SDM 4.5, tables 4-15 .. 4-20) ---------- */
#define PTEMU_PTE_P         0x0000000000000001
#define PTEMU_PTE_W         0x0000000000000002
#define PTEMU_PTE_U         0x0000000000000004
#define PTEMU_PTE_PWT       0x0000000000000008
#define PTEMU_PTE_PCD       0x0000000000000010
#define PTEMU_PTE_A         0x0000000000000020
#define PTEMU_PTE_D         0x0000000000000040
#define PTEMU_PTE_PS        0x0000000000000080
#define PTEMU_PTE_G         0x0000000000000100
#define PTEMU_PTE_PAT_LARGE 0x0000000000001000
#define PTEMU_PTE_NX        0x8000000000000000
#define PTEMU_PTE_PKEY_SHIFT 59

/* ---- #PF error code (SDM 4.7) -------------------------------------------- */
#define PTEMU_PF_P          0x0001
#define PTEMU_PF_W          0x0002
#define PTEMU_PF_U          0x0004
#define PTEMU_PF_RSVD       0x0008
#define PTEMU_PF_I          0x0010
#define PTEMU_PF_PK         0x0020
#define PTEMU_PF_SS         0x0040
#define PTEMU_PF_SGX        0x8000

/* ---- Exception vectors and walk results ---------------------------------- */
/* A walk returns PTEMU_OK or the vector it leaves in ptemu_fault.vector; the
 * batch loops store the same value per address.  PTEMU_VEC_EXIT is no
 * exception: the access caused a VM exit the guest does not see (an EPT
 * violation or misconfiguration, nested paging only), whose basic exit
 * reason is in ptemu_fault.exit_reason.  It is not 0, so "0 = translated"
 * holds for every result, and not a vector the walk can raise. */
#define PTEMU_OK            0
#define PTEMU_VEC_GP        13
#define PTEMU_VEC_PF        14
#define PTEMU_VEC_EXIT      0xff

/* Why a walk faulted (ptemu_fault.cause); finer than the error code. */
#define PTEMU_CAUSE_NONE        0
#define PTEMU_CAUSE_NONCANON    1   /* #GP(0): not canonical                 */
#define PTEMU_CAUSE_NOT_PRESENT 2   /* P=0 in the entry at fault.level       */
#define PTEMU_CAUSE_RSVD        3   /* a reserved bit set at fault.level     */
#define PTEMU_CAUSE_PROT        4   /* rights (U/S, R/W, XD, SMEP, SMAP, PK) */
#define PTEMU_CAUSE_BUS         5   /* entry address outside memory, see walk.c */
#define PTEMU_CAUSE_EPT         6   /* EPT exit: details in the ptemu_ept */

/* Access kinds: these are the values of TRACE_DTYPE.access as well. */
#define PTEMU_ACC_READ      0
#define PTEMU_ACC_WRITE     1
#define PTEMU_ACC_FETCH     2

/* ptemu_walk_in.flags / batch flags */
#define PTEMU_IN_USER       0x1   /* user-mode access (CPL 3, explicit)      */
#define PTEMU_IN_IMPLICIT   0x2   /* implicit supervisor access (SMAP: always checked) */
#define PTEMU_IN_NO_AD      0x4   /* probe: no A/D writes, no TLB use        */
#define PTEMU_IN_CPL        0x8   /* user-mode iff cpu->cpl == 3 (API user=None) */

/* ptemu_cpu.options */
#define PTEMU_OPT_EAGER_A   0x1   /* QEMU order: set A in each entry as the walk passes it */

/* Page-size indices (the size field of a TLB entry's key) */
#define PTEMU_SIZE_4K       0
#define PTEMU_SIZE_2M       1
#define PTEMU_SIZE_1G       2

/* TLB entry flags: the rights combined over the walk, and leaf state */
/* (W, U and D sit at their PTE bit positions so a walk can AND them in.) */
#define PTEMU_TE_NX         0x01  /* XD=1 at some level (with NXE)        */
#define PTEMU_TE_W          0x02  /* R/W=1 at every level                 */
#define PTEMU_TE_U          0x04  /* U/S=1 at every level                 */
#define PTEMU_TE_G          0x08  /* leaf G=1 and CR4.PGE=1 when cached   */
#define PTEMU_TE_D          0x40  /* leaf D was 1 when cached             */
#define PTEMU_TE_EPT_R      0x10  /* nested: EPT allows reads of the page */
#define PTEMU_TE_EPT_W      0x20  /* nested: EPT allows writes            */
#define PTEMU_TE_EPT_X      0x80  /* nested: EPT allows fetches           */

/* TLB array kinds */
#define PTEMU_KIND_DATA     0x1
#define PTEMU_KIND_FETCH    0x2

/* Flush kinds (ptemu_tlb_flush) */
#define PTEMU_FLUSH_ALL            0  /* everything, globals included, all PCIDs */
#define PTEMU_FLUSH_NONGLOBAL      1  /* all PCIDs, globals kept; all PSCs       */
#define PTEMU_FLUSH_PCID           2  /* one PCID, globals kept; its PSCs        */
#define PTEMU_FLUSH_PCID_ALL       3  /* one PCID, its global-tagged too; its PSCs */
#define PTEMU_FLUSH_INVLPG         4  /* page of va: PCID or global; PCID's PSCs */
#define PTEMU_FLUSH_ADDR           5  /* page of va: PCID, not global; PCID's PSCs */

/* Why a flush happened: an index into ptemu_tlb.flushes.  Named apart from
 * the fault causes (PTEMU_CAUSE_*), whose values they share. */
#define PTEMU_FLUSHED_BY_CR3       0
#define PTEMU_FLUSHED_BY_CR4       1
#define PTEMU_FLUSHED_BY_CR0       2
#define PTEMU_FLUSHED_BY_INVLPG    3
#define PTEMU_FLUSHED_BY_INVPCID   4
#define PTEMU_FLUSHED_BY_PF        5
#define PTEMU_FLUSHED_BY_USER      6
#define PTEMU_NFLUSH_CAUSES      7

#define PTEMU_TLB_MAX_ARRAYS     8
/* Bits of an array's occupancy map (ptemu_tlb_array.occ): set s has bit
 * s mod PTEMU_TLB_OCC_BITS, one bit per set up to that many sets. */
#define PTEMU_TLB_OCC_WORDS      8
#define PTEMU_TLB_OCC_BITS       512
#define PTEMU_MAX_LEVELS         5

/* ---- Structures ----------------------------------------------------------- */

/* Physical memory: a byte buffer owned by Python (numpy array or memmap).
 * With `frames` set, addresses are first mapped frame by frame: physical
 * address pa is base[frames[pa >> 12] + (pa & 0xfff)] -- a guest-physical
 * view of host memory (the p2m).  A frame number past nframes, or a frame
 * entry of PTEMU_NO_FRAME, is outside memory. */
#define PTEMU_NO_FRAME 0xffffffffffffffff
typedef struct ptemu_ept ptemu_ept;
typedef struct ptemu_seg ptemu_seg;
typedef struct ptemu_mem {
    uint8_t  *base;
    uint64_t  size;         /* bytes; every access is checked against it */
    const uint64_t *frames; /* NULL, or nframes host byte offsets (4K aligned) */
    uint64_t  nframes;
    ptemu_ept *ept;         /* non-NULL: guest-physical memory behind EPT (ept.c) */
    const ptemu_seg *segs;  /* sparse memory (physmap.c): size is 0 and an address */
    uint64_t  nseg;         /* is looked up in these nseg segments instead */
} ptemu_mem;

/* ---- EPT (SDM Vol. 3C ch. 29, "EPT") --------------------------------------- */
#define PTEMU_EPT_R           0x001
#define PTEMU_EPT_W           0x002
#define PTEMU_EPT_X           0x004
#define PTEMU_EPT_MT_SHIFT    3       /* memory type, bits 5:3 of a leaf */
#define PTEMU_EPT_IPAT        0x040
#define PTEMU_EPT_PS          0x080
#define PTEMU_EPT_A           0x100
#define PTEMU_EPT_D           0x200
#define PTEMU_EPTP_WB         0x006   /* EPTP bits 2:0: write-back */
#define PTEMU_EPTP_WALK4      0x018   /* bits 5:3 = page-walk length - 1 = 3 */
#define PTEMU_EPTP_WALK5      0x020   /* ... = 4 */
#define PTEMU_EPTP_AD         0x040   /* bit 6: EPT accessed and dirty flags */
/* Basic exit reasons (SDM Vol. 3D appendix C; ptemu_fault.exit_reason) */
#define PTEMU_EXIT_EPT_VIOLATION 48
#define PTEMU_EXIT_EPT_MISCONFIG 49
/* EPT-violation exit qualification (SDM Vol. 3C table 28-7) */
#define PTEMU_EQ_READ         0x001
#define PTEMU_EQ_WRITE        0x002
#define PTEMU_EQ_FETCH        0x004
#define PTEMU_EQ_READABLE     0x008
#define PTEMU_EQ_WRITABLE     0x010
#define PTEMU_EQ_EXECUTABLE   0x020
#define PTEMU_EQ_GLA_VALID    0x080
#define PTEMU_EQ_TRANSLATED   0x100   /* the access was to the translated address, not to
                                         a guest paging-structure entry */

/* The EPT state of one vCPU: its EPTP, the host memory the EPT tables and
 * the guest's frames live in, and the last EPT exit. */
struct ptemu_ept {
    ptemu_mem *host;
    uint64_t eptp;
    uint32_t maxphyaddr;
    uint32_t pending;       /* an exit was recorded and not yet reported */
    uint32_t no_ad;         /* set for a probe walk: no EPT A/D writes either */
    uint32_t pad;
    uint32_t exit_reason;   /* PTEMU_EXIT_EPT_* */
    uint32_t exit_level;    /* EPT level of the entry at fault */
    uint64_t exit_gpa;
    uint64_t exit_qual;
    uint64_t refs;          /* memory references of EPT walks, cumulative */
    uint64_t walks;         /* EPT walks, cumulative */
};

/* The architectural state a walk depends on. */
typedef struct ptemu_cpu {
    uint64_t cr0, cr3, cr4, efer;
    uint32_t cpl;           /* 0..3 */
    uint32_t ac;            /* RFLAGS.AC */
    uint32_t pkru;          /* 2 bits per key: AD = bit 2k, WD = bit 2k+1 */
    uint32_t pkrs;          /* same layout, supervisor keys (CR4.PKS) */
    uint32_t maxphyaddr;    /* 32..52 */
    uint32_t options;       /* PTEMU_OPT_* */
} ptemu_cpu;

/* One access to translate. */
typedef struct ptemu_walk_in {
    uint64_t va;
    uint32_t access;        /* PTEMU_ACC_* */
    uint32_t flags;         /* PTEMU_IN_* */
} ptemu_walk_in;

/* A successful translation (and, on a fault, the entries read so far). */
typedef struct ptemu_walk_out {
    uint64_t va;
    uint64_t pa;
    uint64_t page_size;
    uint64_t leaf;          /* the leaf entry as it is in memory after the walk */
    uint32_t level;         /* level of the leaf: 1 PTE, 2 PDE, 3 PDPTE; 0 paging off */
    uint32_t rights;        /* PTEMU_TE_W | PTEMU_TE_U | PTEMU_TE_NX combined */
    uint32_t nentries;      /* entries read from memory this time (0 on a TLB hit) */
    uint32_t mem_refs;      /* memory references the walk made (reads) */
    uint32_t tlb_hit;       /* 1 when a TLB entry answered */
    uint32_t first_level;   /* level of entry_pa[0] (lower than the top on a PSC hit) */
    uint64_t entry_pa[5];   /* top first */
    uint64_t entry[5];
} ptemu_walk_out;

/* A fault, always assigned whole. */
typedef struct ptemu_fault {
    uint32_t vector;        /* PTEMU_VEC_GP or PTEMU_VEC_PF; PTEMU_VEC_EXIT for an
                               EPT exit (cause PTEMU_CAUSE_EPT, nested memory only) */
    uint32_t error_code;    /* #PF: SDM 4.7; #GP: 0; EPT exit: the exit qualification
                               (SDM Vol. 3C table 28-7; 0 for a misconfiguration) */
    uint64_t cr2;           /* the faulting address for #PF and EPT exits; 0 for #GP */
    uint32_t cause;         /* PTEMU_CAUSE_* */
    uint32_t level;         /* level of the entry at fault (0: none / rights); EPT
                               exits: the EPT level */
    uint32_t exit_reason;   /* PTEMU_EXIT_EPT_* with PTEMU_VEC_EXIT, else 0 */
    uint32_t pad;
} ptemu_fault;

/* A TLB or paging-structure-cache array keeps its entries as three words
 * each -- key, stamp, data -- stored set by set in runs (layout in tlb.c),
 * so that a probe reads only the keys of one set.
 *
 * key:   (tag << 3) | (size << 1) | 1, tag = va >> shift of the entry's page
 *        size (TLB) or level (PSC); 0 = invalid
 * stamp: the array's LRU clock at the entry's last use; 0 when invalid
 * data:  the payload, packed:                                              */
#define PTEMU_TD_FLAGS_MASK  0x00000000000000ff  /* bits 7:0   PTEMU_TE_* (PSC: rights) */
#define PTEMU_TD_PKEY_SHIFT  8                   /* bits 11:8  protection key of the leaf */
#define PTEMU_TD_BASE_MASK   0x000ffffffffff000  /* bits 51:12 page frame (PSC: next table) */
#define PTEMU_TD_PCID_SHIFT  52                  /* bits 63:52 PCID */

/* A set-associative array with LRU replacement. */
typedef struct ptemu_tlb_array {
    uint64_t *slots;        /* 3 * sets * ways words (key, stamp, data), owned by Python */
    uint32_t sets;          /* power of two; 0 = array absent */
    uint32_t ways;
    uint32_t sizes;         /* bitmask of 1 << PTEMU_SIZE_* held (TLB arrays) */
    uint32_t kinds;         /* PTEMU_KIND_* served (TLB arrays) */
    uint32_t tier;          /* 1 first level, 2 second level (TLB arrays) */
    uint32_t nsizes;        /* derived by ptemu_tlb_init: sizes as a list */
    uint8_t  size_list[4];
    uint32_t live;          /* 1 << size for each size that may have a valid entry: a
                               superset kept by fills and sweeps, so that a probe
                               skips only sizes surely absent */
    uint64_t clock;
    uint64_t hits;
    uint64_t misses;        /* lookups that probed this array and missed */
    uint64_t fills;
    uint64_t evictions;     /* fills that displaced a valid entry */
    uint64_t occ[PTEMU_TLB_OCC_WORDS]; /* bit s mod PTEMU_TLB_OCC_BITS set for each set s
                               that may hold a valid entry: a superset kept by fills
                               and sweeps (and ptemu_tlb_init), so that a flush
                               visits only the sets that may hold something */
} ptemu_tlb_array;

/* One probe of a lookup (derived by ptemu_tlb_init): an array at one of its
 * page sizes. */
typedef struct ptemu_tlb_step {
    uint8_t  arr;           /* index into ptemu_tlb.arr */
    uint8_t  size;          /* PTEMU_SIZE_* */
    uint8_t  shift;         /* of the tag: log2 of the page size */
    uint8_t  last;          /* 1: the array's last size; a miss here is its miss */
    uint8_t  pos;           /* the array's index in probe[] */
    uint8_t  pad[3];
} ptemu_tlb_step;

typedef struct ptemu_tlb {
    uint32_t narrays;
    uint32_t ready;                /* set by ptemu_tlb_init once geometry is final; clear
                                      it (or call ptemu_tlb_init) after writing slots
                                      yourself: the next lookup or flush then derives
                                      live and occ from the entries again */
    ptemu_tlb_array arr[8];        /* TLB arrays */
    ptemu_tlb_array psc[6];        /* paging-structure caches, index = level 2..5 */
    /* Derived by ptemu_tlb_init, per access kind (0 data, 1 fetch): the
     * arrays to probe, first level first (those holding some page size);
     * and per page size the array to fill at each tier (index + 1, 0 =
     * none). */
    uint8_t  probe[2][8];
    uint8_t  nprobe[2];
    uint8_t  fill_at[2][2][3];     /* [kind][tier-1][size] */
    /* The probes of a lookup, per access kind: probe[] expanded into one
     * step per (array, size), in the order a lookup takes them. */
    ptemu_tlb_step steps[2][24];
    uint8_t  nsteps[2];
    /* Bit j set when step j's array has its live bit for the step's size
     * (kept with the arrays' live bits: by ptemu_tlb_init, a fill that
     * sets a live bit, a flush that may clear some). */
    uint32_t live_steps[2];
    uint64_t lookups[3];           /* by access kind */
    uint64_t l1_hits[3];
    uint64_t l2_hits[3];
    uint64_t misses[3];
    uint64_t walks;                /* walks started (TLB misses and D-bit rewalks) */
    uint64_t walk_refs;            /* memory references made by those walks */
    uint64_t dirty_rewalks;        /* hits on write with cached D=0 */
    uint64_t fault_invalidations;  /* #PF-triggered invalidations (SDM 4.10.4.1) */
    uint64_t flushes[PTEMU_NFLUSH_CAUSES]; /* by PTEMU_FLUSHED_BY_* */
} ptemu_tlb;

/* One record of an access trace: numpy TRACE_DTYPE with align=True. */
typedef struct ptemu_trace_rec {
    uint64_t va;
    uint8_t  access;        /* PTEMU_ACC_* */
    uint8_t  user;          /* 1: user-mode access */
    uint8_t  pad[6];
} ptemu_trace_rec;

/* The walk context (ptemu.h: ptemu_ctx, with its rights table) an Mmu keeps
 * between calls, with the ptemu_cpu contents and the mem and tlb pointers it
 * was derived from: a call whose state differs in any byte derives it
 * again, so a stale context is never used.  Opaque to Python. */
typedef struct ptemu_ctx_cache {
    uint64_t opaque[72];
} ptemu_ctx_cache;

/* An Mmu's handle: what one scalar call needs behind one pointer (a cffi
 * call costs per argument), and the result slots it fills. */
typedef struct ptemu_mmu {
    ptemu_cpu *cpu;
    ptemu_mem *mem;
    ptemu_tlb *tlb;         /* NULL: no TLB */
    ptemu_walk_out *out;    /* Python-owned (a bytearray it unpacks in one go) */
    ptemu_fault fault;
    ptemu_ctx_cache *cache; /* NULL: the context is derived on every call */
    uint32_t access;        /* ptemu_mmu_translate_one(): its PTEMU_ACC_* ... */
    uint32_t flags;         /* ... and PTEMU_IN_* (fixed per handle) */
} ptemu_mmu;

/* ---- Functions ------------------------------------------------------------ */

/* The layout version of this header; _native checks it against the build. */
#define PTEMU_ABI_VERSION 11
int ptemu_abi_version(void);

/* Scalar translation through an Mmu handle: fills m->out or m->fault and
 * returns PTEMU_OK, PTEMU_VEC_GP, PTEMU_VEC_PF or PTEMU_VEC_EXIT. */
int ptemu_mmu_translate(ptemu_mmu *m, uint64_t va, uint32_t access, uint32_t flags);

/* The same with one argument, for Mmu.translate's common case: the address
 * is m->out->va, which the caller writes there, the access m->access and
 * the flags m->flags.  Returns the physical address, or 0 with m->fault
 * filled -- unless m->fault.vector is 0: then 0 was the address.  A cffi
 * call with one argument skips building and unpacking an argument tuple,
 * the largest part of a four-argument call, and the address comes back
 * without a decode (0, not all-ones: Python tests it for free). */
uint64_t ptemu_mmu_translate_one(ptemu_mmu *m);

/* translate_many and run through an Mmu handle (its cache, if any):
 * ptemu_mmu_translate_many writes vector[i], exit_reason[i] and
 * error_code[i] only for the addresses that fault -- the caller passes them
 * zero-filled -- and pa[i] for every address (0 on a fault); ptemu_mmu_run
 * reports the fault in m->fault.  Otherwise as ptemu_translate_many and
 * ptemu_run below. */
uint64_t ptemu_mmu_translate_many(ptemu_mmu *m, const uint64_t *va, const uint8_t *access,
                                  uint32_t access_all, uint32_t flags, uint64_t n,
                                  uint64_t *pa, uint8_t *vector, uint16_t *exit_reason,
                                  uint32_t *error_code);
uint64_t ptemu_mmu_run(ptemu_mmu *m, const ptemu_trace_rec *trace, uint64_t n,
                       uint64_t start, uint64_t *pa);

/* Translate one access.  tlb may be NULL.  Returns PTEMU_OK (out filled),
 * PTEMU_VEC_GP, PTEMU_VEC_PF or PTEMU_VEC_EXIT (fault filled; out holds the
 * entries read). */
int ptemu_translate(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                    const ptemu_walk_in *in, ptemu_walk_out *out, ptemu_fault *fault);

/* Translate n addresses.  access: per-element array (may be NULL, then
 * access_all is used).  flags: PTEMU_IN_* for all.  Outputs, each n long:
 * pa (0 on a fault), vector (0 translated, or ptemu_fault.vector),
 * exit_reason (ptemu_fault.exit_reason: 0 unless vector is PTEMU_VEC_EXIT),
 * error_code (ptemu_fault.error_code).  Returns the number of faults and
 * exits. */
uint64_t ptemu_translate_many(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                              const uint64_t *va, const uint8_t *access,
                              uint32_t access_all, uint32_t flags, uint64_t n,
                              uint64_t *pa, uint8_t *vector, uint16_t *exit_reason,
                              uint32_t *error_code);

/* Run trace[start:n] through TLB and walker; A/D bits set.  pa may be NULL.
 * Returns the index of the first faulting access (fault filled), or n. */
uint64_t ptemu_run(const ptemu_cpu *cpu, ptemu_mem *mem, ptemu_tlb *tlb,
                   const ptemu_trace_rec *trace, uint64_t n, uint64_t start,
                   uint64_t *pa, ptemu_fault *fault);

/* One EPT translation of a guest-physical address, outside any guest walk:
 * access is PTEMU_ACC_*.  Returns 1 with *hpa, or 0 with the exit recorded
 * in ept (exit_reason, exit_qual, exit_gpa). */
int ptemu_ept_translate(ptemu_ept *ept, uint64_t gpa, uint32_t access, uint64_t *hpa);

/* Benchmark baseline: follow only P and PS bits, no checks, no A/D. */
uint64_t ptemu_minimal_walk_many(const ptemu_mem *mem, uint64_t cr3, uint32_t levels,
                                 const uint64_t *va, uint64_t n, uint64_t *pa);

/* TLB maintenance.  ptemu_tlb_init derives the probe order once the
 * geometry is set (lookups call it if nobody did); returns 0 when the
 * geometry is unusable (a sets count not a power of two, > 8 arrays). */
int ptemu_tlb_init(ptemu_tlb *tlb);
void ptemu_tlb_flush(ptemu_tlb *tlb, uint32_t kind, uint32_t pcid, uint64_t va,
                     uint32_t cause);
/* Count valid entries (all arrays when arr < 0; PSC level when arr >= 100+level). */
uint64_t ptemu_tlb_count_valid(const ptemu_tlb *tlb, int arr);

/* Bounds-checked physical accessors (also used by Python for tests). */
int ptemu_mem_load64(const ptemu_mem *mem, uint64_t pa, uint64_t *value);
int ptemu_mem_store64(ptemu_mem *mem, uint64_t pa, uint64_t value);

/* ---- Sparse physical memory (physmap.c) ------------------------------------ */

/* One range of a sparse physical address space -- an ELF core's PT_LOAD
 * segment, a LiME range -- and where its bytes live: inside the one mapping
 * of the image file (at any byte offset: nothing here needs alignment), or
 * in zero-filled memory for the part of a segment the file does not hold.
 * Segments are sorted by pa and do not overlap (Python checks both); an
 * address in no segment is outside memory, as an address past the end of
 * plain memory is (the defined bus fault, walk.c). */
struct ptemu_seg {
    uint64_t pa;            /* first physical address */
    uint64_t size;          /* bytes, > 0 */
    uint8_t *host;          /* byte pa of the segment is host[0] */
};

/* Each word pa[i] of sparse (or plain) memory, 0 where it is outside memory;
 * returns how many were.  The listings read whole tables through it. */
uint64_t ptemu_mem_gather64(const ptemu_mem *mem, const uint64_t *pa, uint64_t n,
                            uint64_t *out);
/* ---- Unicorn link (csrc/ucfill.c) ------------------------------------------ */
/* ptemu answers the TLB fills of a Unicorn 2.1 x86-64 engine in virtual-TLB
 * mode (UC_TLB_VIRTUAL + UC_HOOK_TLB_FILL).  ptemu builds without Unicorn:
 * the few layouts the callbacks touch are declared here, each naming the
 * Unicorn header it mirrors, and the uc_* functions they call are found at
 * run time in the loaded libunicorn (ctypes) and passed in as pointers. */

/* struct uc_tlb_entry (include/unicorn/unicorn.h): perms is a uc_prot enum. */
typedef struct ptemu_uc_tlb_entry {
    uint64_t paddr;
    int      perms;
} ptemu_uc_tlb_entry;

/* uc_x86_msr (include/unicorn/x86.h), for reading EFER with uc_reg_read_batch. */
typedef struct ptemu_uc_msr {
    uint32_t rid;
    uint64_t value;
} ptemu_uc_msr;

/* uc_mem_type (unicorn.h) of a fill, and uc_prot bits of its answer. */
#define PTEMU_UC_MEM_READ   16
#define PTEMU_UC_MEM_WRITE  17
#define PTEMU_UC_MEM_FETCH  18
#define PTEMU_UC_PROT_READ  1
#define PTEMU_UC_PROT_WRITE 2
#define PTEMU_UC_PROT_EXEC  4

/* Where a refused page is sent while the faulting instruction is re-run to
 * learn CR2's offset: 2^52, above any MAXPHYADDR, so no entry can map there. */
#define PTEMU_UC_TRAP_PA    0x0010000000000000

/* The registers read at each fill, in ptemu_uc_link.regs order. */
#define PTEMU_UC_R_CR0      0
#define PTEMU_UC_R_CR3      1
#define PTEMU_UC_R_CR4      2
#define PTEMU_UC_R_CS       3
#define PTEMU_UC_R_RFLAGS   4
#define PTEMU_UC_R_EFER     5     /* UC_X86_REG_MSR with rid 0xc0000080 */
#define PTEMU_UC_R_RIP      6
#define PTEMU_UC_NREGS      7
#define PTEMU_MSR_EFER      0xc0000080

/* ptemu_uc_link.state */
#define PTEMU_UC_RUN        0     /* fills are answered */
#define PTEMU_UC_FAULTED    1     /* a fill was refused: fault, fault_page, fault_access */
#define PTEMU_UC_PROBE      2     /* re-running the faulting instruction (see ucfill.c) */
#define PTEMU_UC_PROBED     3     /* the probe saw the access: probe_pa holds it */

/* ptemu_uc_link.events: what the link found the code doing to the TLB */
#define PTEMU_UC_EV_CR0     0     /* CR0 changed */
#define PTEMU_UC_EV_CR3     1     /* CR3 changed */
#define PTEMU_UC_EV_CR4     2     /* CR4 changed */
#define PTEMU_UC_EV_EFER    3     /* EFER changed */
#define PTEMU_UC_EV_CR3_SAME 4    /* MOV CR3 of the value CR3 already held (block tail) */
#define PTEMU_UC_EV_INVLPG  5     /* INVLPG (block tail) */
#define PTEMU_UC_NEVENTS    6

/* The last instruction of a translation block, when it acts on the TLB
 * without necessarily changing a register: MOV CR3 and INVLPG both end a
 * block in QEMU's translator (gen_eob), so they are always the tail. */
#define PTEMU_UC_TAIL_NONE   0
#define PTEMU_UC_TAIL_CR3    1
#define PTEMU_UC_TAIL_INVLPG 2
#define PTEMU_UC_TAIL_FLUSH  3    /* INVLPG whose operand is not decoded: flush all */
#define PTEMU_UC_NO_REG      16   /* ptemu_uc_tail.base/index: none */
#define PTEMU_UC_RIP_REL     17   /* ptemu_uc_tail.base: RIP-relative */
#define PTEMU_UC_NTAILS      256

typedef struct ptemu_uc_tail {
    uint64_t pc, cr3;         /* the block, and the CR3 it was decoded under */
    uint32_t size;            /* bytes; 0: empty slot */
    uint8_t  kind;            /* PTEMU_UC_TAIL_* */
    uint8_t  base, index;     /* INVLPG operand: GPR numbers 0..15, or PTEMU_UC_NO_REG, RIP_REL */
    uint8_t  scale;           /* log2 */
    int32_t  disp;
    uint8_t  rex_base, rex_index;   /* the same with a REX byte read from before the 0F */
    uint8_t  pad[2];
} ptemu_uc_tail;

typedef struct ptemu_uc_link {
    void *uc;                 /* uc_engine * */
    void *reg_read_batch;     /* uc_reg_read_batch(uc, int const *regs, void **vals, int n) */
    void *ctl;                /* uc_ctl(uc, int control, ...) */
    int   ctl_tlb_flush;      /* UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0) */
    int   regs[7];            /* Unicorn register ids, PTEMU_UC_R_* order */
    ptemu_cpu *cpu;           /* the Mmu's CpuState, kept equal to the engine's */
    ptemu_mem *mem;
    ptemu_tlb *tlb;           /* NULL: no TLB */
    void *ctx;                /* ptemu_uc_ctx_size() bytes owned by Python */
    uint32_t ctx_valid;       /* ctx derived from *cpu; 0 after any change */
    uint32_t state;           /* PTEMU_UC_* */
    uint64_t seen[4];         /* CR0, CR3 (as the engine holds it), CR4, EFER at the last fill */
    /* The refused access (state FAULTED): its page, kind and the fault. */
    uint64_t fault_page;
    uint32_t fault_access;    /* PTEMU_ACC_* */
    uint32_t fault_exact;     /* 1: fault_va is the address; 0: only its page is known yet */
    uint64_t fault_va;        /* the refused address (CR2 of a #PF) */
    ptemu_fault fault;
    uint64_t probe_pa;        /* PTEMU_UC_PROBED: the trap address the access used */
    /* Counters. */
    uint64_t fills;
    uint64_t fills_by_access[3];
    uint64_t faults;
    uint64_t uc_flushes;      /* flushes of Unicorn's TLB asked for by ptemu */
    uint64_t events[6];       /* PTEMU_UC_EV_* */
    /* The block watch (UC_HOOK_BLOCK, ptemu_uc_block). */
    int      gprs[16];        /* Unicorn ids of RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15 */
    ptemu_uc_tail pending;    /* the tail of the block running now (kind NONE: none) */
    ptemu_uc_tail tails[256]; /* decoded tails, by block address */
    uint64_t blocks_decoded;
} ptemu_uc_link;

/* The size of the walk context a link keeps (link->ctx). */
uint64_t ptemu_uc_ctx_size(void);
/* uc_cb_tlbevent_t: the UC_HOOK_TLB_FILL callback; user_data is the link. */
_Bool ptemu_uc_tlb_fill(void *uc, uint64_t vaddr, int type, ptemu_uc_tlb_entry *result,
                        void *user_data);
/* uc_cb_eventmem_t over the trap page: records the probed access. */
_Bool ptemu_uc_trap(void *uc, int type, uint64_t address, int size, int64_t value,
                    void *user_data);
/* Read the engine's CPU state into link->cpu, applying to ptemu's TLB the
 * SDM 4.10.4.1 effect of every change since the last call. */
int ptemu_uc_sync(ptemu_uc_link *link);
/* UC_HOOK_BLOCK (uc_cb_hookcode_t): a block's tail that acts on the TLB takes
 * effect once the block ran (ucfill.c). */
void ptemu_uc_block(void *uc, uint64_t address, uint32_t size, void *user_data);
/* Flush all of Unicorn's TLB (uc_ctl UC_CTL_TLB_FLUSH), counted in uc_flushes. */
void ptemu_uc_flush(ptemu_uc_link *link);
/* ---- Shadow MMU fast paths (shadow.c) ---------------------------------------
 *
 * Python decides, C executes (DESIGN.md): the shadow MMU (hypervisor/shadow.py)
 * owns every structure below and switches the fast paths on; each one does
 * the common, policy-free case of one exit and declines everything else to
 * the Python handler, as KVM's fast_page_fault() does.  Python reads back
 * what C did -- new rmap entries in rmap_log, the counters -- before it runs
 * any handler of its own.                                                    */

/* ptemu_shadow_ctx.enabled */
#define PTEMU_FP_HIDDEN_FAULT   0x1   /* install the leaf spte of a hidden fault */
#define PTEMU_FP_PT_WRITE       0x2   /* emulate a store into a protected level-1 table */
#define PTEMU_FP_INVLPG         0x4   /* INVLPG with every shadow page in sync */
#define PTEMU_FP_CR3            0x8   /* MOV CR3 to the current or a cached previous root */
#define PTEMU_FP_TRUE_FAULT     0x10  /* stop a run at a true fault with the guest's #PF */
#define PTEMU_SP_KEY_SHIFT      20    /* a shadow page's key: gfn << 20 | role */
#define PTEMU_PREV_ROOTS_MAX    64    /* create_vm(prev_roots=...) at most */

/* ptemu_shadow_ctx.sp_info[host frame]: what C must know of a shadow page */
#define PTEMU_SPI_ACC_MASK      0x07  /* the role's inherited rights (PTEMU_TE_*) */
#define PTEMU_SPI_DIRECT        0x08  /* a direct page (under a guest large page) */
#define PTEMU_SPI_LEVEL_SHIFT   4     /* bits 6:4 its level; 0: no shadow page here */
#define PTEMU_SPI_NXE           0x80  /* made under EFER.NXE=1 (bit 63 is XD) */
#define PTEMU_GFN_SPS           4     /* shadow pages per guest frame C looks at */
/* Policy numbers C and shadow.py share (typed once, here): the emulated write
 * to a page's table that zaps it when no use came in between (KVM
 * write_flooding_count), and the free host frames below which a fill makes
 * room first (a fill creates at most one page per level). */
#define PTEMU_FLOOD_ZAP         3
#define PTEMU_FILL_MIN_FREE     7
/* rmap_log words: (gfn | PTEMU_RMAP_REMOVE, spte host address) */
#define PTEMU_RMAP_REMOVE       0x8000000000000000

/* One cached level-1 path of the current root (the fill cache's C mirror),
 * direct-mapped by (va >> 21) & spc_mask. */
typedef struct ptemu_spc_slot {
    uint64_t tag;           /* (va >> 21) + 1 of the 2 MiB region; 0 = empty */
    uint64_t gen;           /* valid while equal to ptemu_shadow_ctx.gen */
    uint64_t l1_base;       /* host address of the level-1 shadow page */
    uint64_t l1_gfn;        /* the guest table that page shadows */
    uint64_t path[5];       /* host frame numbers of the path's pages, root first */
    uint32_t npath;
    uint32_t pad;
    uint64_t *gsnap;        /* an unsync page's snapshot of the gptes its sptes came
                               from (512, Python's array), or NULL when in sync */
} ptemu_spc_slot;

typedef struct ptemu_shadow_ctx {
    uint32_t enabled;         /* PTEMU_FP_* that Python switched on */
    uint32_t role_wp;         /* guest CR0.WP: a supervisor write obeys R/W */
    uint64_t gen;             /* current generation of the fill cache */
    ptemu_spc_slot *spc;      /* spc_mask + 1 slots */
    uint64_t spc_mask;
    const uint64_t *p2m;      /* gfn -> host byte address, or PTEMU_NO_FRAME */
    uint64_t nframes;
    const uint8_t *wp;        /* gfn -> 1 while its frame is a write-protected table */
    uint32_t *flood;          /* host frame -> write-flooding count of the page there */
    uint64_t nhost;           /* host frames (the length of flood) */
    uint64_t *rmap_log;       /* (gfn, spte host address) pairs C added to the rmap */
    uint64_t rmap_log_cap;    /* pairs */
    uint64_t rmap_log_len;    /* pairs written since Python last absorbed them */
    uint64_t leaf_copy;       /* guest leaf bits a 4 KiB spte copies (PWT PCD PAT G key) */
    const ptemu_cpu *gcpu;    /* the guest's CPU state (its CR3: the guest's tables) */
    ptemu_mem *gmem;          /* guest-physical memory as walks see it (the p2m view) */
    uint64_t pf_fixed;        /* hidden faults fixed here */
    uint64_t pf_spurious;     /* exits whose spte was already there */
    /* fast path 2 (protected-table stores) */
    const uint8_t *sp_info;   /* host frame -> PTEMU_SPI_* of the shadow page there */
    const uint64_t *gfn_sp;   /* gfn -> PTEMU_GFN_SPS host frames + 1 of its shadow pages */
    const uint8_t *gfn_nsp;   /* gfn -> how many (0xff: more than PTEMU_GFN_SPS) */
    const uint64_t *h2g;      /* host frame -> gfn, or PTEMU_NO_FRAME */
    const uint64_t *host_free;/* the hypervisor's free host frames (one word) */
    uint32_t hash_room;       /* 1: a fill could not hit the shadow limit (see shadow.py) */
    uint32_t allow_unsync;    /* unsync is on: a protected store is a policy question */
    uint64_t rsvd_phys;       /* reserved bits 51:MAXPHYADDR of every present entry */
    uint64_t amask;           /* the address field of an entry (bits M-1:12) */
    uint64_t pf_emulate;      /* stores emulated here */
    uint64_t pte_write;       /* mmu_pte_write */
    uint64_t pte_updated;     /* mmu_pte_updated */
    uint64_t tlb_flush;       /* full real-TLB flushes after a lowered spte */
    uint32_t stream_vector;   /* why a store stream stopped: the store's vector, or 0
                                 (an unaligned store, or the rmap log needs absorbing) */
    uint32_t unsync_pages;    /* unsync shadow pages (a flushing CR3 load syncs them) */
    uint64_t sync_entry;      /* mmu_sync_entry: entries resynced at INVLPG here */
    /* fast path 4, and the one home of the roots (shadow.py reads them here) */
    uint64_t root_key;        /* the current root's key; 0: no root */
    uint64_t root_hpa;        /* its host address (the real CR3 without PCID) */
    uint64_t root_role;       /* the role a root has in the current paging mode */
    uint64_t prev_key[64];    /* prev_roots, most recent first (KVM prev_roots) */
    uint64_t prev_hpa[64];
    uint32_t nprev;
    uint32_t prev_max;        /* create_vm(prev_roots=...) */
    const uint64_t *top_key;  /* gfn -> key of a top-level shadow page of it in the hash */
    const uint64_t *top_hpa;  /* gfn -> its host address (the hash, for roots) */
    /* fast path 5 (a true fault inside ptemu_shadow_run) and fast path 1's
     * shadow descent (a fill-cache miss on a path that exists) */
    uint32_t gfault_valid;    /* 1: the run stopped at a true fault, gfault is the
                                 guest's own walk's #PF (Python injects it) */
    uint32_t pad5;
    ptemu_fault gfault;       /* that fault, as the guest walk filled it */
    uint64_t path_walks;      /* fills whose cached path C rebuilt by walking the shadow */
    const uint64_t *gsnap_addr; /* host frame -> address of its unsync page's gsnap
                                 (512 words, Python's array), 0 when in sync */
    uint64_t *path_log;       /* paths the descent cached, PTEMU_PATH_LOG_WORDS each:
                                 va >> 21, gen, npath, path[5] (for shadow.py's _pcache) */
    uint64_t path_log_cap;    /* entries */
    uint64_t path_log_len;    /* entries written since Python last took them */
    const uint64_t *sp_key;   /* host frame -> key (gfn << 20 | role) of the shadow
                                 page there, 0: none */
    ptemu_ctx_cache *run_cache; /* ptemu_shadow_run's walk context, kept until the real
                                 CPU state, memory or TLB changes (as ptemu_mmu's cache);
                                 NULL: derived on every call */
} ptemu_shadow_ctx;
#define PTEMU_PATH_LOG_WORDS    8
/* path_log npath flag: the path ends at a direct level-1 page under a guest
 * 2 MiB leaf (shadow.py's _pcache[~(va >> 21)]), not at a level-1 page */
#define PTEMU_PATH_LOG_DIRECT   0x100
#define PTEMU_ROLE_ACC_SHIFT    4    /* a role's inherited rights (shadow.py R_ACC_SHIFT) */
/* Role bits of direct pages (shadow.py R_DIRECT, R_PKEY_SHIFT, R_G, R_PWT, R_PCD):
 * the large leaf's key, G and caching bits, which each spte copies */
#define PTEMU_ROLE_DIRECT       0x8
#define PTEMU_ROLE_PKEY_SHIFT   10
#define PTEMU_ROLE_G            0x4000
#define PTEMU_ROLE_PWT          0x8000
#define PTEMU_ROLE_PCD          0x10000

/* ptemu_run over the shadow tables with fast path 1: a hidden fault whose
 * shadow path is cached gets its leaf spte and the run goes on.  Returns
 * the index of the first access whose exit Python must handle (fault
 * filled), or n. */
uint64_t ptemu_shadow_run(ptemu_shadow_ctx *ctx, const ptemu_cpu *cpu, ptemu_mem *mem,
                          ptemu_tlb *tlb, const ptemu_trace_rec *trace, uint64_t n,
                          uint64_t start, ptemu_fault *fault);

/* An 8-byte guest store at va (8-aligned) on the real MMU with fast paths 1
 * and 2: returns PTEMU_OK when the store is done (by the real MMU, after a
 * fast fill, or emulated into a protected level-1 table), else the vector of
 * the exit Python must handle (nothing of the store done). */
int ptemu_shadow_store(ptemu_shadow_ctx *ctx, ptemu_mmu *m, ptemu_tlb *tlb, uint64_t va,
                       uint64_t value);

/* Fast path 3: the guest's INVLPG va (SDM 4.10.4.1) on the real TLB, after
 * resyncing va's entry when its level-1 shadow page is unsync (found through
 * the fill cache).  cpu: the real CPU state.  Returns 1 when done, 0 to
 * decline. */
int ptemu_shadow_invlpg(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, const ptemu_cpu *cpu,
                        ptemu_tlb *tlb, uint64_t va);

/* The entries of an unsync level-1 shadow page (host address sp_hpa) of
 * guest table gfn brought back in sync (shadow.py sync_page, whose Python
 * loop is the reference): each present spte whose gpte differs from the
 * snapshot gsnap[0..512) is remade from the gpte by leaf_from_gpte's rule
 * and written by set_spte's (rmap changes to the log, *flush set when a
 * translation was lowered or moved; *flush is not cleared).  Marking the
 * page synced and write-protecting the frame stay Python's.  Returns 1
 * when done, 0 to decline (nothing written): no room in the rmap log for
 * 1,024 entries, a frame outside host memory or guest memory, or not a
 * level-1 page; -1 on an impossible host-memory read (partly done). */
int ptemu_shadow_sync_page(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t sp_hpa,
                           uint64_t gfn, const uint64_t *gsnap, int *flush);

/* Fast path 4: the guest's MOV CR3 value when its root is the current one
 * (returns 1), a cached previous root (returns 2: prev_roots rotated, the
 * fill cache's generation moved on) or a page of the hash (returns 3: the
 * same, the old root cached); the guest's CR3 (g) and the real one
 * (real, with the PCID) loaded and the real TLB flushed as SDM 4.10.4.1
 * says.  Returns 0 to decline: reserved bits (#GP), unsync pages to sync,
 * a root to find in the hash or make. */
int ptemu_shadow_cr3(ptemu_shadow_ctx *ctx, ptemu_cpu *g, ptemu_cpu *real, ptemu_tlb *tlb,
                     uint64_t value);

/* ptemu_mmu_translate on the real MMU with the same fast path; returns as it. */
int ptemu_shadow_translate(ptemu_shadow_ctx *ctx, ptemu_mmu *m, uint64_t va,
                           uint32_t access, uint32_t flags);

/* The leaf spte rule (shadow.py make_leaf_spte), for the tests to compare. */
uint64_t ptemu_make_leaf_spte(uint64_t hpa, uint32_t acc, uint64_t copy_bits,
                              uint32_t dirty, uint32_t write_protected);

/* A store stream (the guest kernel's page-table work in bulk): stores in
 * order, each with its value; numpy STORE_DTYPE (hypervisor/exits.py). */
typedef struct ptemu_store_rec {
    uint64_t va;            /* 8-aligned guest-linear address */
    uint64_t value;
} ptemu_store_rec;

/* The stores s[start:n] at the current CPL on a plain MMU (no hypervisor);
 * returns the index of the first store that faults (nothing of it done), or n. */
uint64_t ptemu_store_stream(ptemu_mmu *m, const ptemu_store_rec *s, uint64_t n,
                            uint64_t start);

/* The same on a shadow VM's real MMU with its fast paths (ptemu_shadow_store):
 * returns the index of the first store whose exit Python must handle, or n. */
uint64_t ptemu_shadow_store_stream(ptemu_shadow_ctx *ctx, ptemu_mmu *m, ptemu_tlb *tlb,
                                   const ptemu_store_rec *s, uint64_t n, uint64_t start);
/* ---- Paravirtual hypercall fast path (paravirt.c) ------------------------------
 *
 * The mmu_update hypercall of a paravirt VM (hypervisor/paravirt.py) for the
 * common batch, over the shadow MMU's arrays above: validated whole, then
 * applied with the shadow pages following; anything else declines and
 * Python runs the batch from the start (nothing was written).              */
#define PTEMU_FP_MMU_UPDATE     0x100 /* ptemu_shadow_ctx.enabled: mmu_update in C */
#define PTEMU_PV_DECLINE        0     /* Python must do the batch (nothing written) */
#define PTEMU_PV_DONE           1     /* applied */
#define PTEMU_PV_DONE_FLUSH     2     /* applied; a spte was lowered or moved: flush */
#define PTEMU_PV_LOG_FULL       3     /* declined: absorb the rmap log, then ask again */

/* The batch items[0..2n) = (entry gpa, value) pairs of one mmu_update, into
 * the tables of the VM whose shadow context is ctx (hmem: host memory).
 * Returns PTEMU_PV_*; the counters it keeps are ctx's pte_write/pte_updated. */
int ptemu_pv_mmu_update(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, const uint64_t *items,
                        uint64_t n);
/* The same for a batch of one (the kernel's demand-fault PTE). */
int ptemu_pv_mmu_update1(ptemu_shadow_ctx *ctx, ptemu_mem *hmem, uint64_t gpa,
                         uint64_t value);
