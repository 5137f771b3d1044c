"""What both fuzz harnesses share: the byte decoder, the driver, the oracle.

Inputs are decoded by `ByteInput`, a tiny pure-Python consumer (not
atheris.FuzzedDataProvider), so that a saved input replays bit for bit without
atheris -- tests/test_fuzz_regressions.py replays findings in plain pytest.

The driver (`main`) runs a harness's `one_input(data: bytes)`:
  * with atheris (coverage-guided libFuzzer): any libFuzzer flag works, e.g.
        python fuzz/fuzz_walker.py -max_total_time=60 CORPUS_DIR
        python fuzz/fuzz_walker.py -runs=10000000 CORPUS_DIR
    and file arguments replay saved inputs;
  * without atheris (or with PTEMU_FUZZ_ENGINE=random): a random-input loop
    honouring -max_total_time=, -runs= and -seed=, printing libFuzzer-style
    "Done N runs" lines, and replaying file arguments the same way.
See docs/reliability.md.
"""
import os
import random
import re
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

U64 = (1 << 64) - 1


class Finding(AssertionError):
    """An oracle violation: the harness saw something the contract forbids."""


class ByteInput:
    """Consume a fuzzer's bytes front to back; zeros once they run out."""

    __slots__ = ("data", "pos", "n")

    def __init__(self, data):
        self.data = bytes(data)
        self.pos = 0
        self.n = len(self.data)

    def _take(self, k):
        p = self.pos
        self.pos = p + k
        return int.from_bytes(self.data[p:p + k], "little")

    def u8(self):
        p = self.pos
        self.pos = p + 1
        return self.data[p] if p < self.n else 0

    def u16(self):
        return self._take(2)

    def u32(self):
        return self._take(4)

    def u64(self):
        return self._take(8)

    def bool(self):
        return self.u8() & 1 == 1

    def below(self, k):
        """0..k-1 (k <= 256)."""
        return self.u8() % k

    def pick(self, seq):
        return seq[self.u8() % len(seq)]

    def bytes(self, k):
        p = self.pos
        self.pos = p + k
        return self.data[p:p + k]

    @property
    def left(self):
        return max(0, self.n - self.pos)


def _flag(argv, name, default=None):
    for a in argv:
        if a.startswith("-" + name + "="):
            return a.split("=", 1)[1]
    return default


def _random_engine(argv, one_input, max_len):
    """A coverage-blind stand-in for libFuzzer: random inputs, same oracles."""
    files = [a for a in argv[1:] if not a.startswith("-") and os.path.isfile(a)]
    if files:
        for path in files:
            with open(path, "rb") as fh:
                data = fh.read()
            print("Running: %s" % path, file=sys.stderr)
            one_input(data)
        print("Executed %d inputs" % len(files), file=sys.stderr)
        return
    runs = int(_flag(argv, "runs", "-1"))
    limit = float(_flag(argv, "max_total_time", "0"))
    seed = int(_flag(argv, "seed", "0")) or int.from_bytes(os.urandom(4), "little")
    keep_going = _flag(argv, "keep_going", "0") == "1"
    findings_dir = _flag(argv, "artifact_prefix", None) or os.environ.get(
        "PTEMU_FUZZ_FINDINGS", os.path.join(tempfile.gettempdir(), "ptemu-fuzz-findings"))
    rng = random.Random(seed)
    print("INFO: random engine (no coverage guidance), seed %d" % seed, file=sys.stderr)
    t0 = time.monotonic()
    n = 0
    found = {}
    next_report = 1
    while (runs < 0 or n < runs) and not (limit and time.monotonic() - t0 > limit):
        data = rng.randbytes(rng.randrange(max_len + 1))
        try:
            one_input(data)
        except Exception as exc:
            os.makedirs(findings_dir, exist_ok=True)
            path = os.path.join(findings_dir, "crash-random-%d-%d" % (seed, n))
            with open(path, "wb") as fh:
                fh.write(data)
            kind = re.sub(r"0x[0-9a-f]+|\d+", "N", "%s: %s" % (type(exc).__name__, exc))[:160]
            found.setdefault(kind, []).append(path)
            if not keep_going:
                print("==%d== finding; input written to %s" % (os.getpid(), path),
                      file=sys.stderr)
                raise
            if len(found[kind]) == 1:
                print("==%d== NEW finding (%s); input written to %s\n%s" % (
                    os.getpid(), kind, path, describe_failure(exc)), file=sys.stderr)
        n += 1
        if n >= next_report:
            dt = time.monotonic() - t0
            print("#%d\texec/s: %d" % (n, n / dt if dt else 0), file=sys.stderr)
            next_report *= 2
    dt = time.monotonic() - t0
    print("Done %d runs in %d second(s)" % (n, dt), file=sys.stderr)
    print("stat::number_of_executed_units: %d" % n, file=sys.stderr)
    if found:
        print("findings (kind: count, first input):", file=sys.stderr)
        for kind, paths in found.items():
            print("  %s: %d, %s" % (kind, len(paths), paths[0]), file=sys.stderr)
        sys.exit(1)


def main(one_input, max_len=4096, instrument=()):
    """Run `one_input` under atheris if it is there, else the random engine.

    instrument: functions whose bytecode atheris should instrument for
    coverage (the harness's own branches, which mirror the C outcomes).
    """
    engine = os.environ.get("PTEMU_FUZZ_ENGINE", "atheris")
    atheris = None
    if engine == "atheris":
        try:
            import atheris  # noqa: F811
        except ImportError:
            print("INFO: atheris is not installed; using the random engine", file=sys.stderr)
    argv = list(sys.argv)
    if atheris is None:
        _random_engine(argv, one_input, max_len)
        return
    if not any(a.startswith("-max_len=") for a in argv):
        argv.append("-max_len=%d" % max_len)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def instrumented(fn):
    """atheris.instrument_func when atheris is importable, else fn itself."""
    if os.environ.get("PTEMU_FUZZ_ENGINE", "atheris") != "atheris":
        return fn
    try:
        import atheris
    except ImportError:
        return fn
    return atheris.instrument_func(fn)


def feedback_tree(nbits, name):
    """An instrumented function `name(sig)`: a binary tree of `if`s over the low
    `nbits` bits of sig, one leaf per value, so that a coverage-guided engine
    (which sees Python coverage only) tells distinct outcomes apart.  Several
    small trees rather than one big one: atheris instruments a function in
    time that grows fast with its size."""
    lines = ["def %s(sig):" % name]

    def emit(depth, indent):
        pad = "    " * indent
        if depth == nbits:
            lines.append(pad + "return None")
            return
        lines.append(pad + "if sig & %d:" % (1 << depth))
        emit(depth + 1, indent + 1)
        lines.append(pad + "else:")
        emit(depth + 1, indent + 1)

    emit(0, 1)
    ns = {}
    exec(compile("\n".join(lines), "<%s>" % name, "exec"), ns)  # noqa: S102 - generated code
    return instrumented(ns[name])


def describe_failure(exc):
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
