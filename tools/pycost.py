#!/usr/bin/env python3
"""tools/pycost.py -- instructions per call of Python statements (callgrind).

For each statement: its loop runs 1,000 and then 6,000 times inside a cffi
callback, callgrind collects only inside the callback (--toggle-collect on
cffi's invoke_callback) and dumps after each, and the difference divided by
5,000 is the cost of one statement -- the interpreter, the objects made and
freed, the C called.  Machine-independent, unlike timings on a shared host.

    python tools/pycost.py SETUP.py 'pass' 'mmu.translate(va)' 'f.call(va)'

SETUP.py is executed first to define the names the statements use.  The first
statement is the reference the others are shown against (use 'pass').
Needs valgrind.  docs/performance.md "Scalar translate" has the figures.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

N1, N2 = 1_000, 6_000


def _child(setup, stmts):
    import cffi
    ffi = cffi.FFI()
    ffi.cdef("void (*fn)(void);")       # only for ffi.callback / ffi.cast below
    g = {}
    with open(setup) as f:
        exec(f.read(), g)
    for s in stmts:
        exec("def _loop(n):\n    for _ in range(n):\n        %s\n" % s, g)
        loop = g["_loop"]
        loop(50)                        # warm: specialised bytecode, caches
        for n in (N1, N2):
            cb = ffi.callback("void(void)", lambda n=n: loop(n))
            ffi.cast("void(*)(void)", cb)()


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    setup, stmts = sys.argv[1], sys.argv[2:]
    d = tempfile.mkdtemp(prefix="pycost-")
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1")
    subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no",
                    "--toggle-collect=invoke_callback", "--dump-after=invoke_callback",
                    "--callgrind-out-file=%s/cg.out" % d, sys.executable, __file__, "--child",
                    setup] + stmts, env=env, check=True, capture_output=True)
    files = sorted(glob.glob(d + "/cg.out.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    tot = []
    for p in files:
        with open(p) as f:
            m = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
        tot.append(int(m.group(1)) if m else 0)
    shutil.rmtree(d)
    base = None
    for i, s in enumerate(stmts):
        v = (tot[2 * i + 1] - tot[2 * i]) / (N2 - N1)
        base = v if base is None else base
        print("%-60s %7.0f instructions (%+6.0f vs the first)" % (s, v, v - base))


if __name__ == "__main__":
    main()
