"""Atomic folder outputs: build beside the destination, swap in only when complete.

A stage killed half-way leaves its previous output (or none) and a hidden temporary folder
beside it, never a half-written output; the next build of that output removes such folders left
by processes no longer running. Outputs that
several processes may ask for at once (``dvc queue start -j 2`` runs two pipelines side by side)
are built under :func:`locked`: the first process builds, the others wait and reuse.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from faceage.errors import FaceAgeError

log = logging.getLogger(__name__)

# A write refused for want of room: a full disk, a quota, a file-size limit.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class WriteError(FaceAgeError, OSError):
    """Writing an output failed (a full disk, a quota, a folder without write access); nothing was left
    half-written, and the message names the source, the destination and, for a full disk, the space."""


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def free_bytes(folder: str | Path) -> int | None:
    """The bytes free in ``folder``'s file system, or None where that cannot be read: a full-disk message,
    which quotes it, must not fail in turn."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def errno_text(e: OSError) -> str:
    """``[Errno 28] No space left on device``, as an error line quotes an OSError (``str(e)`` without an errno)."""
    return f"[Errno {e.errno}] {e.strerror or e}" if e.errno is not None else str(e)


def place_in(filename: str | None, staged: Sequence[Path]) -> str:
    """Where an OSError's file was, for its error line: `` (at split/x.png)``, its place inside one of ``staged``
    (hidden folders a failed build has removed by now, whose own names say nothing), else ``: 'path'``; "" for
    none."""
    if not filename:
        return ""
    inside = [Path(filename).relative_to(s).as_posix() for s in staged if Path(filename).is_relative_to(s)]
    return f" (at {inside[0]})" if inside else f": {filename!r}"


def _host() -> str:
    """This host and PID namespace: a container sharing the host's name (``--uts=host``) numbers its
    processes apart, and a PID alive there looked dead from here (its build's folder was removed)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()} {namespace}".encode()).hexdigest()[:8]


@contextmanager
def replacing(path: str | Path, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Yields a file to write ``path``'s new contents to: a hidden temporary file beside it, fsynced and moved in
    with :func:`os.replace` when the block ends, removed (``path`` untouched) when it raises. A reader, or the next
    run after a killed write, finds the old contents or the new, never half of them. A file rewritten keeps its
    permission bits (:func:`_kept_mode`); a symbolic link at ``path`` is replaced, not followed.

    ``mode`` and ``open_args`` go to :func:`open`: ``"wb"`` for bytes (``torch.save``), ``"w"`` with
    ``newline=""`` for the csv module (its own line ends, untranslated). The temporary name is unique per call:
    one fixed name (``path.tmp``) made two writers of the same file move in each other's half-written file, and
    the second move fail.
    """
    path = Path(path)
    try:  # staging files of writers killed (kill -9) mid-write: a state file's are the weights, twice
        clear_stale(path)
    except OSError:  # a folder this user may write but not list: the write itself is what matters
        pass
    staged = scratch_name(path)
    tmp = staged.with_name(staged.name + ".tmp")
    kept = _kept_mode(path)
    try:
        f = open(tmp, mode, **open_args)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)  # made before the text layer failed (an unknown encoding)
        except OSError:  # a folder it could not be made in, which cannot be searched either
            pass
        if isinstance(e, OSError) and e.filename == str(tmp):  # (a folder missing or read-only): named as the
            e.filename = str(path)  # output, not as a staging file the user never sees
        raise
    try:
        with f:
            yield f
            f.flush()
            if kept is not None:
                # Once written, not before: a block may write the file by name through a handle of its own
                # (torch.save in save_checkpoint), which a 0444 taken from a DVC hardlink refused (Permission denied).
                try:
                    os.fchmod(f.fileno(), kept)
                except OSError:  # a file system without modes (CIFS, some FUSE mounts): the write matters more
                    pass
            # On disk before its name is: after a power loss, ext4/xfs could otherwise show the final
            # name on an empty file (the rename was journaled, the data still in the page cache).
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _kept_mode(path: Path) -> int | None:
    """The permission bits the rewrite of ``path`` takes over: the file's own where one is there (a file made
    private, 0600, or shared with a group, 0664, became the umask's 0644 on every rewrite: readable by all, or no
    longer writable by the group's other members); None for a new file (the umask's mode, as any file made here)
    and for a symbolic link, which the rewrite replaces rather than follows (DVC's ``cache.type: symlink`` output
    points into the cache, whose 0444 the new output must not take). Never set-ID bits."""
    if not hasattr(os, "fchmod"):  # pragma: no cover - Windows before Python 3.13
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_IMODE(st.st_mode) & 0o777 if stat.S_ISREG(st.st_mode) else None


def write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (:func:`replacing`)."""
    with replacing(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (:func:`replacing`)."""
    with replacing(path) as f:
        f.write(data)


def _fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (its entry on disk). Where folders cannot be opened or synced
    (Windows, some network file systems) the rename stands as it is: nothing more can be done there."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def scratch_name(out_dir: Path, tag: str = "") -> Path:
    """A new hidden path beside ``out_dir`` for building it: ``.NAME-PID@HOST-RANDOM[-TAG]``, so that a
    later build can tell a folder left by a killed process (:func:`clear_stale`) from one in use."""
    return out_dir.parent / f".{out_dir.name}-{os.getpid()}@{_host()}-{uuid.uuid4().hex[:12]}{tag and '-' + tag}"


def clear_stale(out_dir: Path) -> None:
    """Removes the :func:`scratch_name` folders (or a :func:`replacing` file's staging files) beside ``out_dir``
    whose process, on this host, has ended (a build killed before it could clean up: a copy of the whole data set
    each). Others are left."""
    if os.name != "posix" or not out_dir.parent.is_dir():  # os.kill(pid, 0) ends the process on Windows
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}-(\d+)@{_host()}-[0-9a-f]{{12}}(-[a-z]+|\.tmp)?")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not _running(int(match[1])):
            log.info("removing %s, left by a build of %s that was stopped", path, out_dir)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # another user's, in a sticky folder (/tmp): theirs to remove
                    pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextmanager
def scratch_dir(beside: str | Path, tag: str) -> Iterator[Path]:
    """Yields an empty hidden folder beside ``beside`` (e.g. an unzipped source), deleted afterwards."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(beside)
    tmp = scratch_name(beside, tag)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty folder next to ``out_dir``; on success it replaces ``out_dir``.

    On any exception the staged folder is deleted and ``out_dir`` is left untouched. The swap is two
    renames (the previous output is moved aside, then deleted), so a process killed at any point
    leaves under ``out_dir`` the previous output, the new one, or (between the renames) none, never
    part of one. Staged folders
    that killed processes left beside ``out_dir`` are removed first (:func:`clear_stale`).

    Raises:
        WriteError: Something other than a folder stands at ``out_dir`` (:func:`_check_out_dir`); checked before
            any work, and left as it is.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out_dir)
    # A plain mkdir, not mkdtemp: the swap keeps the folder's mode, and mkdtemp's is private (0700);
    # this one gets the mode any folder made here gets (the umask's), as its subfolders have.
    tmp = scratch_name(out_dir)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        # Two renames, then the slow part: deleted in place, a previous output (thousands of crops) was
        # half gone under its own name when the process was killed during the deletion.
        _check_out_dir(out_dir)  # again: what is moved aside here is deleted below, so it must be a folder of ours
        if out_dir.exists():
            old = scratch_name(out_dir, "old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the new one did not go in: the old one goes back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # killed during this, clear_stale removes the rest


def _check_out_dir(out_dir: Path) -> None:
    """Raises WriteError (one line) where something other than a folder stands at ``out_dir``.

    A file there was moved aside under a :func:`scratch_name`, its ``rmtree`` failed unseen, and a later
    :func:`clear_stale` deleted it. A symbolic link (even to a folder) is refused too, not followed: the swap renames
    the folder built beside the path onto it, which replaces the link itself (the output lands on the link's disk,
    not on the one it points to, and the link, moved aside, went the same way as the file); building beside the
    link's target instead would put the output on a disk that the work folders beside ``out_dir`` (preprocess's
    ``.NAME.partial``, renamed into it) are not on. The library never makes either, so it is left as it is.
    """
    try:
        st = os.lstat(out_dir)
    except (FileNotFoundError, NotADirectoryError):  # nothing there yet (a file above it: the mkdir says so)
        return
    if stat.S_ISDIR(st.st_mode):
        return
    built = ("the output written there is a folder, built beside it and renamed onto the path, which replaces "
             "whatever stands there")
    if stat.S_ISLNK(st.st_mode):
        raise WriteError(f"{out_dir} is a symbolic link (to {link_target(out_dir)}): {built}, the link itself, not "
                         "what it points to; remove the link (what it points to is not touched) and rerun (to keep "
                         "the output on another disk, make the folder above it a link there instead)")
    if stat.S_ISREG(st.st_mode):
        raise WriteError(f"{out_dir} is a file: {built}; move the file away (or delete it) and rerun (it was left "
                         "as it is)")
    raise WriteError(f"{out_dir} is not a folder but {_kind(st.st_mode)}: {built}; move it away (or delete it) and "
                     "rerun (it was left as it is)")


def _kind(mode: int) -> str:
    """What a file of ``mode`` (not a regular file) is, for an error line."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "an unknown kind of file"


def link_target(path: Path) -> str:
    """Where the symbolic link ``path`` points, for an error line ("?" where it is gone meanwhile)."""
    try:
        return os.readlink(path)
    except OSError:  # replaced meanwhile
        return "?"


@contextmanager
def locked(target: str | Path, what: str = "") -> Iterator[None]:
    """Holds an exclusive lock on ``target`` against other processes, for building it once.

    The lock is an advisory ``flock`` on the hidden file ``.<name>.lock`` beside ``target`` (not
    inside: a staged folder replaces ``target`` whole), released when the holder exits or dies, so a
    killed process never leaves a stale lock. Where ``fcntl`` is missing (Windows) it does not lock.

    A folder this user cannot write (a team's shared, already built cache): a lock file someone else
    made there is locked through a read-only handle (``flock`` needs no write access); where there is
    none and none can be made, it does not lock. Such a user cannot build there anyway: the caller
    reuses a complete ``target``, and the build of an incomplete one fails with the write it needs.

    The lock file is opened without following a symbolic link (``O_NOFOLLOW``): a link there (dangling or not)
    made, or locked, a file wherever it pointed. A link, a folder or any other non-file there is the user's (this
    never makes one), so it is refused, not removed.

    Args:
        target: What is built under the lock (a file or folder; it need not exist yet).
        what: What is being done, for the log line when another process holds the lock.

    Raises:
        WriteError: Something other than a file stands at the lock path (:func:`lock_file`): a folder, a
            symbolic link, a FIFO.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = lock_file(target)
    while True:
        fh = _open_lock(path, target)
        if fh is None:
            log.debug("not locking %s: %s cannot be created (a read-only folder)", target, path)
            yield
            return
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process to finish %s (lock %s)", what or f"with {target}", path)
                fcntl.flock(fh, fcntl.LOCK_EX)
            # The lock file may have been deleted (with the cache entry it guards: faceage.external's pruning,
            # which deletes it only while holding it) while this waited: the lock of a file no longer at the path
            # excludes no one arriving later, who makes a new file and locks it at once. Take the one there.
            if same_file(fh.fileno(), path):
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                return


def lock_file(target: str | Path) -> Path:
    """:func:`locked`'s lock file for ``target``: ``.<name>.lock`` beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is the file now at ``path`` (not one unlinked, or replaced by another, since it was opened).
    A symbolic link at ``path`` is not the file, even one pointing to it (:func:`locked` never follows one)."""
    try:
        st, now = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


# How open() fails on what is not a file: a folder opened for writing, a link with O_NOFOLLOW (ELOOP; EMLINK on
# FreeBSD), a FIFO without a reader or a socket with O_NONBLOCK (ENXIO).
_NOT_A_FILE = frozenset({errno.EISDIR, errno.ELOOP, errno.EMLINK, errno.ENXIO})
# O_NONBLOCK: a FIFO opened for writing otherwise waits, silently and for ever, for a reader (flock ignores it).
_LOCK_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _open_lock_fd(path: Path, flags: int) -> int:
    """``os.open(path, flags | _LOCK_FLAGS)``, except that a regular file held under a lease is waited for.

    O_NONBLOCK has one other effect on a regular file: an open that conflicts with a lease on it (Samba's kernel
    oplocks, nfsd's delegations on the NFS server itself: a team's shared cache folder) fails at once with EAGAIN
    instead of waiting for the holder to let go, which it does within the kernel's lease-break time. A file there
    is opened again the way the old ``open(path, "a")`` did, waiting; anything else (a FIFO) is not waited for.
    """
    try:
        return os.open(path, flags | _LOCK_FLAGS, 0o666)
    except BlockingIOError:
        try:
            regular = stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            regular = False
        if not regular:
            raise
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


def _open_lock(path: Path, target: Path) -> IO | None:
    """The lock file, opened to be locked: created if need be; read-only where this user may not write
    it (another user's file, a read-only folder or file system); None where it is not there to open.

    Raises:
        WriteError: Something other than a file is at ``path`` (:func:`_lock_path_error`).
    """
    try:
        fd = _open_lock_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        if e.errno in _NOT_A_FILE:
            raise _lock_path_error(path, target, e) from e
        if e.errno not in _NOT_WRITABLE:
            raise
        try:  # flock needs no write access; a read-only open also opens a folder, which fstat tells below
            fd = _open_lock_fd(path, os.O_RDONLY)
        except OSError as e:
            if e.errno in _NOT_A_FILE:
                raise _lock_path_error(path, target, e) from e
            if e.errno not in (*_NOT_WRITABLE, errno.ENOENT):
                raise
            return None
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _lock_path_error(path, target, opened=mode)
    return os.fdopen(fd, "rb")


def _lock_path_error(path: Path, target: Path, e: OSError | None = None, opened: int | None = None) -> OSError:
    """One line for something other than a file at :func:`locked`'s lock file ``path`` (for ``target``), as it is
    now, else as ``opened`` (the mode fstat read on what was opened) says; ``e`` itself where a file is there after
    all (replaced meanwhile) or nothing tells what is there."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = opened
    if mode is None or stat.S_ISREG(mode):
        return e if e is not None else WriteError(f"{path} could not be opened as a lock file for {target}")
    why = f"a lock file of that name is kept beside {target}, so that one process at a time builds it"
    if stat.S_ISLNK(mode):
        return WriteError(f"{path} is a symbolic link (to {link_target(path)}): {why}, and a link there is not "
                          "followed; remove the link (what it points to is not touched) and rerun")
    return WriteError(f"{path} is not a file but {_kind(mode)}: {why}; move it away (or delete it) and rerun (it was "
                      "left as it is)")
