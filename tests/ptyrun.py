"""Run a command with its stderr on a pseudo-terminal (120x24), as a user's
terminal would be: how the tests see progress bars that show only on a tty.
(tqdm draws nothing on a pty that has no size, so one is set.)"""
import fcntl
import os
import pty
import struct
import subprocess
import termios


def run_on_a_pty(argv, timeout=120, stdout=subprocess.PIPE):
    """(CompletedProcess, bytes the command wrote to its terminal stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        p = subprocess.run(argv, stdout=stdout, stderr=slave, timeout=timeout)
    finally:
        os.close(slave)
    err = b""
    while True:
        try:
            piece = os.read(master, 65536)
        except OSError:         # EIO: the command closed its end
            break
        if not piece:
            break
        err += piece
    os.close(master)
    return p, err
