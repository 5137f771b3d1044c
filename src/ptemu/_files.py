"""Files in, files out and progress, one way for every part of ptemu.

The images, the traces and the study each read a file the user names, write
files the user asks for and show progress on long work; they do it through
this module so that they say the same things the same way:

- an input file that cannot be opened is one error naming what it is, the
  path and the problem (`open_input`);
- an output file is checked before the work that produces it starts
  (`check_output`), then written through a temporary name in the same
  directory and renamed (`write_atomic`), so an interrupted run never leaves
  a file that looks complete;
- progress is tqdm on stderr, shown when stderr is a terminal unless the
  caller says otherwise (`show_progress`, `progress_bar`).

Bottom floor: it imports nothing of ptemu; callers pass the exception class
their layer raises (ImageError, InvalidInput, StudyError).
"""
import os
import sys
import tempfile


def open_input(path, what, error):
    """`path` opened for binary reading, or error("WHAT PATH: problem")."""
    path = os.fspath(path)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise error("%s %s: no such file" % (what, path)) from None
    except IsADirectoryError:
        raise error("%s %s: is a directory, not a regular file" % (what, path)) from None
    except OSError as exc:
        raise error("%s %s: %s" % (what, path, exc.strerror or exc)) from None


def check_output(path, what, error):
    """Refuse, before any work, an output path that cannot be written:
    error("WHAT PATH: problem") for a missing or read-only directory, or a
    path that is a directory."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise error("%s %s: no directory %s" % (what, path, d))
    if not os.access(d, os.W_OK):
        raise error("%s %s: directory %s is not writable" % (what, path, d))
    if os.path.isdir(path):
        raise error("%s %s: is a directory" % (what, path))
    return path


def temp_beside(path):
    """(fd, name) of a new empty file in path's directory, with the mode a
    plain open() would give path: where a write goes before it is renamed
    over path (os.replace), so path is never seen half written."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=d)
    # mkstemp makes the file 0600; give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def write_atomic(path, data):
    """Write data (str or bytes, or a callable writing to a binary file object)
    to path through a temporary file in the same directory, renamed over path
    at the end: an interrupted write leaves no file that looks complete."""
    path = os.fspath(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def show_progress(progress):
    """Whether to show progress: `progress` when it is True or False, else
    (None) when stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _NoBar:
    """What progress_bar gives when progress is off: every call does nothing."""
    n = 0

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar(show=True, **kw):
    """A tqdm bar on stderr (keyword arguments as tqdm's), or a bar that does
    nothing when `show` is false or tqdm is missing (the work still runs)."""
    if not show:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)
