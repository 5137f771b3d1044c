#!/usr/bin/env bash
# tools/sanitize.sh -- build ptemu with AddressSanitizer + UndefinedBehaviorSanitizer
# in a virtual environment of its own, and run the test suite (or any command)
# under it.  Exits non-zero on a test failure AND on any sanitizer report.
#
#   tools/sanitize.sh [VENV]                      build, then run all of tests/
#   tools/sanitize.sh [VENV] -- PYTEST_ARGS...    build, then pytest PYTEST_ARGS
#   tools/sanitize.sh [VENV] --run CMD ARGS...    build, then run CMD under the sanitizers
#   tools/sanitize.sh [VENV] --env                build, then print the environment to
#                                                 use by hand (eval "$(...)")
#
# VENV defaults to .venv-asan in the repository (git-ignored).  Environment:
#   PYTHON                interpreter to create the venv with (default python3)
#   PTEMU_SRC             source tree to build (default: this repository)
#   PTEMU_ASAN_EXTRA_PIP  extra packages to install in the venv (e.g. atheris)
#   PTEMU_ASAN_NO_BUILD=1 reuse the extension already installed in VENV
#
# Why each piece is here: docs/reliability.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=${PTEMU_SRC:-$ROOT}
PYTHON=${PYTHON:-python3}

VENV=$ROOT/.venv-asan
if [[ $# -gt 0 && $1 != --* ]]; then
    VENV=$1
    shift
fi
# Absolute: the script changes directory before it runs the venv's python.
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
MODE=tests
CMD=()
if [[ $# -gt 0 ]]; then
    case $1 in
        --) shift; CMD=("$@") ;;
        --run) shift; MODE=run; CMD=("$@")
               [[ ${#CMD[@]} -gt 0 ]] || { echo "sanitize.sh: --run needs a command" >&2; exit 2; } ;;
        --env) MODE=env ;;
        *) echo "usage: tools/sanitize.sh [VENV] [-- PYTEST_ARGS... | --run CMD... | --env]" >&2
           exit 2 ;;
    esac
fi

log() { echo "sanitize.sh: $*" >&2; }

# ---- the sanitizer runtimes of the compiler that builds the extension -------
# The interpreter is not instrumented, so ASan's runtime must be loaded before
# anything else (LD_PRELOAD); libubsan comes along as a dependency of the
# extension but is preloaded too so both runtimes are up before Python starts.
CC=${CC:-gcc}
LIBASAN=$($CC -print-file-name=libasan.so)
LIBUBSAN=$($CC -print-file-name=libubsan.so)
for lib in "$LIBASAN" "$LIBUBSAN"; do
    if [[ ! -e $lib ]]; then
        log "$CC has no $(basename "$lib") (install the compiler's sanitizer runtime,"
        log "e.g. Debian's libasan8/libubsan1 come with gcc-12)"
        exit 2
    fi
done

# ---- the venv: created once, then reused ------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
# What to install: pyproject.toml's build requirements, dependencies and test
# extra (read with tomllib where there is one), so the two never drift apart.
mapfile -t REQS < <("$PY" - "$SRC/pyproject.toml" <<'PYEOF'
import sys
try:
    import tomllib
    with open(sys.argv[1], "rb") as fh:
        d = tomllib.load(fh)
    reqs = (d["build-system"]["requires"] + d["project"]["dependencies"]
            + d["project"].get("optional-dependencies", {}).get("test", []))
except Exception:
    reqs = ["setuptools>=77", "wheel", "cffi>=1.15", "numpy>=1.22", "pytest>=7",
            "pytest-benchmark>=4", "hypothesis>=6"]
print("\n".join(reqs))
PYEOF
)
if ! "$PY" - "${REQS[@]}" 2>/dev/null <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
import re
for req in sys.argv[1:]:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*(>=\s*([0-9.]+))?", req)
    name, minimum = m.group(1), m.group(3)
    v = version(name)                    # PackageNotFoundError: not installed
    if minimum:
        have = tuple(int(x) for x in re.findall(r"\d+", v)[:3])
        need = tuple(int(x) for x in minimum.split("."))
        if have < need:
            sys.exit(1)
PYEOF
then
    log "installing build and test dependencies into $VENV: ${REQS[*]}"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q --upgrade "${REQS[@]}"
fi
if [[ -n ${PTEMU_ASAN_EXTRA_PIP:-} ]]; then
    # shellcheck disable=SC2086  # a list of package names
    "$PY" -m pip install -q $PTEMU_ASAN_EXTRA_PIP || log "could not install $PTEMU_ASAN_EXTRA_PIP"
fi

# ---- the sanitized build ----------------------------------------------------
# Built from a private copy of the sources: pip builds in-tree otherwise, and
# setuptools would happily reuse object files of the ordinary build in build/
# (same sources, older flags) -- or leave sanitized ones for the next
# ordinary build.  A regular (non-editable) install, so the package the tests
# import is the venv's, never src/ptemu with its ordinary extension.
if [[ ${PTEMU_ASAN_NO_BUILD:-0} != 1 ]]; then
    STAGE=$(mktemp -d "${TMPDIR:-/tmp}/ptemu-asan-src.XXXXXX")
    trap 'rm -rf "$STAGE"' EXIT
    for f in pyproject.toml setup.py build_ffi.py MANIFEST.in README.md LICENSE; do
        [[ -e $SRC/$f ]] && cp "$SRC/$f" "$STAGE/"
    done
    cp -r "$SRC/csrc" "$STAGE/"
    mkdir -p "$STAGE/src"
    cp -r "$SRC/src/ptemu" "$STAGE/src/"
    find "$STAGE/src" \( -name '*.so' -o -name '_native_c.c' -o -name '__pycache__' \) \
        -prune -exec rm -rf {} +
    [[ -e $STAGE/README.md ]] || echo "ptemu" > "$STAGE/README.md"
    log "building ptemu with PTEMU_SANITIZE=1 (ASan + UBSan)"
    t0=$SECONDS
    # CFLAGS=-fno-wrapv: setuptools compiles extensions with the interpreter's
    # own CFLAGS, which include -fwrapv; that makes signed overflow defined and
    # hides it from UBSan.  The core must be correct as portable C, so the
    # sanitized build takes the option back (distutils appends $CFLAGS after
    # the interpreter's flags).
    if ! CFLAGS="-fno-wrapv${CFLAGS:+ $CFLAGS}" PTEMU_SANITIZE=1 "$PY" -m pip install -q --no-build-isolation --no-deps \
            --force-reinstall "$STAGE" >"$STAGE/pip.log" 2>&1; then
        cat "$STAGE/pip.log" >&2
        log "the sanitized build failed"
        exit 1
    fi
    log "built in $((SECONDS - t0)) s"
fi

# The extension the venv imports must be the instrumented one.
# (Located without importing ptemu: the import would load the instrumented
# extension without the runtime preloaded.)
PKG=$(cd / && "$PY" -c "import importlib.util as u; print(u.find_spec('ptemu').submodule_search_locations[0])")
SO=$(ls "$PKG"/_native_c*.so 2>/dev/null | head -1)
case $SO in
    "$VENV"/*) ;;
    *) log "ptemu._native_c resolves to $SO, not inside $VENV"; exit 1 ;;
esac
# (nm's output is read whole first: `nm | grep -q` under pipefail fails when
# grep stops reading early and nm dies of SIGPIPE, as a larger library makes it.)
SYMS=$(nm -D "$SO" 2>/dev/null || true)
if [[ $SYMS != *__asan_report_load8* || $SYMS != *__ubsan_handle_* ]]; then
    log "$SO is not instrumented with ASan and UBSan"
    exit 1
fi

# ---- the run ----------------------------------------------------------------
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/ptemu-sanitizer-logs.XXXXXX")
export LD_PRELOAD="$LIBASAN:$LIBUBSAN${LD_PRELOAD:+:$LD_PRELOAD}"
# PTEMU_ASAN_PRELOAD_FIRST: libraries that must come before the ASan runtime
# in the lookup order (fuzz/run.sh: the shim that gives atheris its coverage
# callbacks back, see fuzz/asan_cov_shim.c).  ASan then has to be told not
# to insist on being first.
if [[ -n ${PTEMU_ASAN_PRELOAD_FIRST:-} ]]; then
    LD_PRELOAD="$PTEMU_ASAN_PRELOAD_FIRST:$LD_PRELOAD"
    ASAN_OPTIONS="verify_asan_link_order=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
fi
# detect_leaks=0: the interpreter is not instrumented and "leaks" by design.
# allocator_may_return_null=1: a huge numpy allocation must raise MemoryError
# as it does without ASan, not abort.  Reports go to files as well as to
# stderr, because pytest captures fd 2 and a sanitizer abort loses it.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1:log_path=$LOGDIR/asan:log_exe_name=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGDIR/ubsan:log_exe_name=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# Every Python object through malloc, so ASan's redzones surround the cffi
# structs (ptemu_cpu, ptemu_tlb, walk results) too, not just numpy buffers.
# (The fuzzers keep pymalloc, PYTHONMALLOC=pymalloc, for speed: the buffers
# the C core touches are numpy arrays and cffi structs, malloc'd either way
# or large enough to bypass pymalloc.)
export PYTHONMALLOC=${PYTHONMALLOC:-malloc}
export PATH="$VENV/bin:$PATH"
export PTEMU_SANITIZED=1

if [[ $MODE == env ]]; then
    printf 'export LD_PRELOAD=%q ASAN_OPTIONS=%q UBSAN_OPTIONS=%q PYTHONMALLOC=%q PATH=%q PTEMU_SANITIZED=1\n' \
        "$LD_PRELOAD" "$ASAN_OPTIONS" "$UBSAN_OPTIONS" "$PYTHONMALLOC" "$PATH"
    log "reports (if any) will be written under $LOGDIR"
    exit 0
fi

cd "$ROOT"
t0=$SECONDS
# The run's output is kept (tee) and searched afterwards: UBSan reports only
# to stderr (gcc's libubsan ignores log_path when ASan is loaded), and pytest
# runs with --capture=sys so what C writes to fd 2 is never swallowed.
set +e
if [[ $MODE == run ]]; then
    "${CMD[@]}" 2>&1 | tee "$LOGDIR/run.log"
else
    [[ ${#CMD[@]} -gt 0 ]] || CMD=(tests)
    "$PY" -m pytest -p no:cacheprovider --capture=sys "${CMD[@]}" 2>&1 | tee "$LOGDIR/run.log"
fi
rc=${PIPESTATUS[0]}
set -e

SIGNATURES='runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer|AddressSanitizer:DEADLYSIGNAL'
reports=$(find "$LOGDIR" -type f -name 'asan*' -size +0 2>/dev/null | sort)
if [[ -n $reports ]] || grep -Eq "$SIGNATURES" "$LOGDIR/run.log"; then
    for r in $reports; do
        echo "==== sanitizer report: $r" >&2
        head -c 20000 "$r" >&2
    done
    echo "==== sanitizer lines in the output:" >&2
    grep -E -A3 "$SIGNATURES" "$LOGDIR/run.log" | head -60 >&2 || true
    log "FAILED: sanitizer report(s) above (exit status of the run: $rc; logs kept in $LOGDIR)"
    exit 1
fi
rm -rf "$LOGDIR"
if [[ $rc -ne 0 ]]; then
    log "FAILED: the run exited with status $rc (no sanitizer report)"
    exit "$rc"
fi
log "OK: no sanitizer report, run took $((SECONDS - t0)) s"
