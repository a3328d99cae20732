"""Round 34, second read of :func:`faceage.atomic.locked`'s lock-file open (``O_NOFOLLOW|O_NONBLOCK``).

``O_NONBLOCK`` was added so that a FIFO at the lock path fails at once instead of hanging; on a regular file it has
one other effect: an open that conflicts with a lease (Samba's kernel oplocks, nfsd's delegations on the NFS server
itself, both of which a team's shared cache folder may be under) fails at once with ``EAGAIN`` instead of waiting for
the holder to let go. The old ``open(path, "a")`` waited; the new one ended the run in a raw ``BlockingIOError``.
"""

import fcntl
import subprocess
import sys
import time

import pytest

from faceage.atomic import lock_file, locked

F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)  # Linux

# Holds a read lease on argv[1] (as an NFS server holds one for a client's read delegation) and lets go of it when
# the kernel says another open wants the file (SIGIO), as a lease holder does.
LEASE_HOLDER = r"""
import fcntl, os, signal, sys, time
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
fd = os.open(sys.argv[1], os.O_RDONLY)
def let_go(*_):  # os.write, os._exit: a print here could interrupt the print of "held" (a reentrant call)
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    os.write(1, b"let go\n")
    os._exit(0)
signal.signal(signal.SIGIO, let_go)
try:
    fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
except OSError as e:
    os.write(1, f"no lease: {e}\n".encode())
    os._exit(0)
os.write(1, b"held\n")
time.sleep(30)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases (F_SETLEASE) are Linux's")
def test_a_lease_on_the_lock_file_is_waited_for_not_an_error(tmp_path):
    target = tmp_path / "entry"
    lock = lock_file(target)
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        first = holder.stdout.readline().strip()
        if first.startswith("no lease"):
            pytest.skip(f"this system grants no file lease ({first})")
        assert first == "held", first
        start = time.monotonic()
        with locked(target, "building entry"):
            inside = True
        assert inside and time.monotonic() - start < 20
        assert holder.wait(timeout=20) == 0 and holder.stdout.read().strip() == "let go"
    finally:
        holder.kill()
        holder.wait()
    assert lock.is_file() and not lock.is_symlink()
