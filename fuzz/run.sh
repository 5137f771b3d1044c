#!/usr/bin/env bash
# fuzz/run.sh -- run the fuzz harnesses for a bounded time (CI) or for long.
#
#   fuzz/run.sh [--asan] walker|hostile|unicorn|all [SECONDS] [-- EXTRA FUZZER FLAGS...]
#
#   walker    fuzz/fuzz_walker.py         (walker, batch API, access streams)
#   hostile   fuzz/fuzz_hostile_guest.py  (a hostile guest vs the shadow MMU)
#   unicorn   fuzz/fuzz_unicorn.py        (ptemu as a Unicorn engine's MMU, real code)
#   SECONDS   time box per harness (default 60); 0 = until stopped / -runs=N
#   --asan    under the ASan+UBSan build (tools/sanitize.sh; venv .venv-asan,
#             or $PTEMU_ASAN_VENV), atheris installed there, its coverage
#             wired through fuzz/asan_cov_shim.c
#
# Corpus: $PTEMU_FUZZ_CORPUS/<harness> (default: a fresh temporary directory
# per run; give a lasting directory for long runs so that they resume).
# Findings: $PTEMU_FUZZ_FINDINGS (default $TMPDIR/ptemu-fuzz-findings/).
# Engine: atheris (coverage-guided libFuzzer) when importable, else the
# random engine of fuzz/_common.py; PTEMU_FUZZ_ENGINE=random forces it.
#
# Exits non-zero on a finding.  Examples:
#   fuzz/run.sh all 60                          # the CI time box
#   fuzz/run.sh --asan walker 60                # the same under the sanitizers
#   PTEMU_FUZZ_CORPUS=$HOME/ptemu-corpus fuzz/run.sh walker 0 -- -runs=10000000
#   PTEMU_FUZZ_ENGINE=random fuzz/run.sh hostile 3600 -- -keep_going=1
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ASAN=0
if [[ ${1:-} == --asan ]]; then
    ASAN=1
    shift
fi
WHICH=${1:-all}
SECS=${2:-60}
shift $(( $# >= 2 ? 2 : $# ))
[[ ${1:-} == -- ]] && shift
EXTRA=("$@")

case $WHICH in
    walker) HARNESSES=(walker) ;;
    hostile) HARNESSES=(hostile) ;;
    unicorn) HARNESSES=(unicorn) ;;
    all) HARNESSES=(walker hostile unicorn) ;;
    *) echo "usage: fuzz/run.sh [--asan] walker|hostile|unicorn|all [SECONDS] [-- FLAGS...]" >&2; exit 2 ;;
esac

FINDINGS=${PTEMU_FUZZ_FINDINGS:-${TMPDIR:-/tmp}/ptemu-fuzz-findings}
mkdir -p "$FINDINGS"
export PTEMU_FUZZ_FINDINGS=$FINDINGS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ptemu-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

PREFIX=()
if [[ $ASAN == 1 ]]; then
    VENV=${PTEMU_ASAN_VENV:-$ROOT/.venv-asan}
    # Build once (and install atheris), then reuse the build for each harness.
    PTEMU_ASAN_EXTRA_PIP=${PTEMU_ASAN_EXTRA_PIP-atheris} "$ROOT/tools/sanitize.sh" "$VENV" \
        --run true >&2
    export PTEMU_ASAN_NO_BUILD=1
    if [[ ${PTEMU_FUZZ_ENGINE:-atheris} == atheris ]] &&
       CORE=$("$VENV/bin/python" -c 'import atheris, glob, os; print(glob.glob(os.path.join(os.path.dirname(atheris.__file__), "core_with_libfuzzer*.so"))[0])' 2>/dev/null); then
        ${CC:-gcc} -shared -fPIC -O1 -o "$WORK/asan_cov_shim.so" "$ROOT/fuzz/asan_cov_shim.c" -ldl
        export PTEMU_ATHERIS_CORE=$CORE
        export PTEMU_ASAN_PRELOAD_FIRST=$WORK/asan_cov_shim.so
    fi
    # pymalloc: ASan still guards every numpy buffer and cffi struct the C
    # core touches; Python's own small objects need no redzones here.
    export PYTHONMALLOC=pymalloc
    PREFIX=("$ROOT/tools/sanitize.sh" "$VENV" --run)
    PY=$VENV/bin/python
else
    PY=${PYTHON:-python3}
fi

status=0
for h in "${HARNESSES[@]}"; do
    case $h in
        walker) script=$ROOT/fuzz/fuzz_walker.py ;;
        hostile) script=$ROOT/fuzz/fuzz_hostile_guest.py ;;
        unicorn) script=$ROOT/fuzz/fuzz_unicorn.py ;;
    esac
    corpus=${PTEMU_FUZZ_CORPUS:+$PTEMU_FUZZ_CORPUS/$h}
    corpus=${corpus:-$WORK/corpus-$h}
    mkdir -p "$corpus"
    flags=(-timeout=60 -rss_limit_mb=4096 -print_final_stats=1 "-artifact_prefix=$FINDINGS/$h-")
    [[ $SECS != 0 ]] && flags+=("-max_total_time=$SECS")
    # A hostile guest needs programs of many steps from the start; libFuzzer
    # would otherwise grow inputs from a few bytes.
    [[ $h == hostile ]] && flags+=(-len_control=0)
    echo "== fuzz $h for ${SECS}s$([[ $ASAN == 1 ]] && echo ' under ASan+UBSan') (corpus $corpus)" >&2
    t0=$SECONDS
    set +e
    "${PREFIX[@]}" "$PY" "$script" "${flags[@]}" "${EXTRA[@]}" "$corpus" >"$WORK/$h.log" 2>&1
    rc=$?
    set -e
    runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$WORK/$h.log" | grep -Eo '[0-9]+$' | tail -1 || true)
    [[ -n $runs ]] || runs=$(grep -Eo '^Done [0-9]+ runs' "$WORK/$h.log" | grep -Eo '[0-9]+' | tail -1 || true)
    steps=$(grep -Eo 'hostile-guest steps: [0-9]+' "$WORK/$h.log" | grep -Eo '[0-9]+$' | tail -1 || true)
    grep -E '^INFO: (random engine|atheris is not)|Finding|Error|ERROR|SUMMARY|runtime error|NEW finding' \
        "$WORK/$h.log" | head -40 >&2 || true
    grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE)' "$WORK/$h.log" | tail -1 >&2 || true
    echo "== $h: ${runs:-?} executions${steps:+, $steps guest steps} in $((SECONDS - t0)) s, exit $rc" >&2
    if [[ $rc -ne 0 ]]; then
        tail -60 "$WORK/$h.log" >&2
        echo "== $h FAILED (inputs under $FINDINGS)" >&2
        status=1
    fi
done
exit $status
