"""cffi builder for ptemu._native (out-of-line API mode).

Lives outside the package (as in pyca/bcrypt): setup.py names it in
cffi_modules, so `pip install .` compiles the extension once and nothing
compiles at import time.

The cdef is csrc/ptemu_cdef.h itself -- the header the C sources include --
so declarations are never typed twice.

Environment switches (read at build time):
  PTEMU_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer
                     (-O1 -g -fno-omit-frame-pointer; run the interpreter with
                     the ASan runtime preloaded, see docs/reliability.md)
  PTEMU_DEBUG=1      -O0 -g
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE / "csrc"
# One translation unit (csrc/ptemu_all.c includes walk.c, tlb.c, batch.c) so
# the compiler inlines the walk and the TLB probes into the batch loops.
SOURCES = ["ptemu_all.c"]
DEPENDS = ["ptemu_all.c", "walk.c", "tlb.c", "ept.c", "batch.c", "shadow.c", "ptemu.h", "ptemu_cdef.h", "bits.h"]


def _compile_args():
    if os.environ.get("PTEMU_SANITIZE") == "1":
        return ["-O1", "-g", "-fno-omit-frame-pointer",
                "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"], \
               ["-fsanitize=address,undefined"]
    if os.environ.get("PTEMU_DEBUG") == "1":
        return ["-O0", "-g"], []
    return ["-O3", "-std=gnu99", "-Wall", "-Wextra", "-Wno-unused-parameter"], []


ffibuilder = FFI()
ffibuilder.cdef((CSRC / "ptemu_cdef.h").read_text())

_cflags, _ldflags = _compile_args()
ffibuilder.set_source(
    "ptemu._native_c",
    '#include "ptemu.h"',
    # Relative paths: setuptools insists on them for sdists and wheels.
    sources=[os.path.relpath(CSRC / s, HERE) for s in SOURCES],
    include_dirs=[os.path.relpath(CSRC, HERE)],
    depends=[os.path.relpath(CSRC / s, HERE) for s in DEPENDS],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
