"""Architectural constants for Python, read from the C header through `lib`."""
from ptemu._native import lib

_PUBLIC = {
    "CR0_": ["PE", "WP", "PG"],
    "CR4_": ["PSE", "PAE", "PGE", "PCIDE", "SMEP", "SMAP", "PKE", "PKS", "LA57"],
    "EFER_": ["LME", "LMA", "NXE"],
    "PTE_": ["P", "W", "U", "PWT", "PCD", "A", "D", "PS", "G", "NX", "PAT_LARGE"],
    "PF_": ["P", "W", "U", "RSVD", "I", "PK", "SS", "SGX"],
    "CR3_": ["PCID_MASK", "NOFLUSH"],
}

__all__ = []
for _prefix, _names in _PUBLIC.items():
    for _n in _names:
        globals()[_prefix + _n] = getattr(lib, "PTEMU_" + _prefix + _n)
        __all__.append(_prefix + _n)

PTE_PKEY_SHIFT = lib.PTEMU_PTE_PKEY_SHIFT
__all__.append("PTE_PKEY_SHIFT")

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
__all__ += ["PAGE_4K", "PAGE_2M", "PAGE_1G"]

# Flag letters for decoded entries, low bit first.
ENTRY_FLAG_NAMES = [(PTE_P, "P"), (PTE_W, "W"), (PTE_U, "U"), (PTE_PWT, "PWT"),
                    (PTE_PCD, "PCD"), (PTE_A, "A"), (PTE_D, "D"), (PTE_PS, "PS"),
                    (PTE_G, "G"), (PTE_NX, "NX")]


def decode_entry(value):
    """'P W U A ... NX' names of the flags set in a paging-structure entry."""
    names = [n for bit, n in ENTRY_FLAG_NAMES if value & bit]
    pkey = (value >> PTE_PKEY_SHIFT) & 0xF
    if pkey:
        names.append("PKEY=%d" % pkey)
    return " ".join(names) if names else "-"
