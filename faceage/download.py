"""Streamed, resumable, checksummed, atomic HTTP downloads.

Input: a URL, a destination path and an expected checksum. Output: the file at the
destination, present only once it is complete and verified.

The bytes go to ``<dest>.part`` first. An interrupted transfer (dropped connection,
killed process) leaves that part file behind, and the next call asks the server for
the remaining bytes with an HTTP ``Range`` request. The validator of the response the part's
bytes came from (its strong ``ETag``, else its ``Last-Modified``) is kept in ``<dest>.part.meta``
and sent as ``If-Range`` with the resume: a file changed on the server since (a new release at the
same URL) comes back whole (200) and replaces the part, instead of its tail being appended to the
old head. A part resumed from a mirror (another URL) sends none: the checksum decides there. Only a verified file is moved to
``dest`` with :func:`os.replace`, so ``dest`` is never half-written; a checksum
mismatch deletes the part file, since resuming from bad bytes cannot succeed. Processes
asking for the same ``dest`` at once take turns (a lock file beside it): the first
fetches, the next finds the verified file.

A part whose resume fails the checksum is fetched whole once more before the error (its head may be another
version's; a restart from byte 0, a server ignoring the Range, is not a resume). A 206 from before the part's end
is cut to fit, one from after it restarts from byte 0, and a range short of the end that gets no further (a
server sending the same first slice for every Range) counts as a failed try, not a loop. A restart from byte 0
that the validators do not call a new version (a server or proxy ignoring the Range, a captive portal answering
with its page) keeps the part's bytes aside in ``<dest>.part.kept`` until it gets past them or passes the
checksum and ``check``; one cut short or rejected puts them back, for the next try or run to resume
(without a checksum, one that is not a new version and is shorter than the part, by its ``Content-Length``
or once it ends, is a :class:`ContentError`, not the file). A 416
without the file's length (``Content-Range: bytes */LENGTH``) is a complete part only where a checksum checks
it; without one the file is fetched whole. A full disk (or a
folder without write access) is one :class:`DownloadWriteError` naming the URL, the destination and the space
needed vs free; the part is kept for the resume only where a checksum will check it. A certificate that is
not trusted fails at once (no retry changes it); ``SSL_CERT_FILE`` is honoured beside requests' own
``REQUESTS_CA_BUNDLE``. Without a terminal the progress is a log line every 30 s, not a bar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
from tqdm import tqdm
from urllib3.exceptions import NameResolutionError
from urllib3.exceptions import ProxyError as Urllib3ProxyError

from faceage.atomic import NO_SPACE, WriteError, errno_text, free_bytes, locked, megabytes, write_text
from faceage.errors import FaceAgeError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Network reads are small so that a dropped connection loses at most this much progress.
STREAM_BYTES = 1 << 16


class DownloadError(FaceAgeError, RuntimeError):
    """The file could not be fetched (network failure, HTTP error, retries exhausted)."""


class HTTPStatusError(DownloadError):
    """The server answered, with an HTTP error status no retry changes (404, 403, 410...): the URL, not the
    connection, is what to check."""


class UnreachableError(DownloadError):
    """No connection to the server could be made or kept (a host name that does not resolve, a certificate that is
    not trusted, a connection that kept dropping or timing out): the network, not the URL, is what to check. From
    :func:`download` with mirrors: no URL was reached (one that answered makes it a :class:`DownloadError`)."""


class ChecksumError(DownloadError):
    """The fetched bytes do not match the expected checksum."""


class DownloadWriteError(WriteError):
    """The fetched bytes could not be written (a full disk or quota, a folder without write access). Not a
    :class:`DownloadError`: no mirror or retry can help, so none is tried; the message names the URL, the
    destination and, for a full disk, the space still needed against what is free."""


# Without a terminal (DVC's log, CI) the progress is a log line this often instead of a redrawn bar.
PROGRESS_LOG_S = 30.0


class ContentError(DownloadError):
    """The complete file is not what was asked for (``download``'s ``check`` says why): an error page
    sent with 200 OK, where no checksum would tell."""


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Returns the hex digest of a file, read in 1 MiB chunks.

    Args:
        path: The file.
        algorithm: Any :mod:`hashlib` algorithm name (``"md5"``, ``"sha256"``).

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _stream_once(url: str, part: Path, timeout_s: float, progress: bool,
                 verified: bool = False) -> tuple[bool, bool]:
    """Appends the missing bytes of ``url`` to ``part``.

    ``verified``: a checksum will check the finished file, so a part cut short by a full disk is kept
    for the next run to resume (without one, bytes the disk may have mangled are deleted).

    Returns:
        ``(complete, appended)``: whether the part now holds the whole file, and whether it keeps bytes
        it held before this call (a resume; a restart from byte 0 is not one).
    """
    have = part.stat().st_size if part.exists() else 0
    # The bytes on disk must be the server's bytes: a body sent gzip-encoded would be stored decoded,
    # and a Range resume would then count decoded bytes against the encoded stream.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    # If-Range: the rest of the body only if it is still the version the part's bytes came from, else
    # the whole new body (200). A part without a stored validator (none sent, or an older part) resumes as is.
    stored = _read_validators(part, url) if have else None
    if stored:
        headers["If-Range"] = stored.get("etag") or stored["last_modified"]
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s, verify=_verify()) as r:
        if r.status_code == 416 and have:
            # Range not satisfiable: the part file holds the whole body where the server's length
            # (Content-Range: bytes */LENGTH) says so; a part longer than the file holds bytes of another
            # version of it (and was taken whole: as the file, where no checksum was given).
            length = _unsatisfiable_length(r.headers.get("Content-Range"))
            if length == have or (length is None and verified):
                # Without a length the checksum decides, as for any resume (a mismatch fetches it whole).
                return True, True
            if length is None:
                # Nothing said about the length, nothing to check against: a 1000-byte part became the file.
                log.info("%s answered the Range from byte %d with 416 and no length: fetching %s whole", url,
                         have, part.name.removesuffix(".part"))
                _set_aside(part)
            else:
                log.info("%s holds %d bytes but %s has %d: restarting from byte 0", part.name, have, url, length)
                _discard(part)
            r.close()
            return _stream_once(url, part, timeout_s, progress, verified)
        if r.status_code in RETRY_STATUSES:  # busy or briefly broken: worth the back-off, as a dropped connection is
            raise _BusyError(f"GET {url} answered HTTP {r.status_code} {r.reason}", r.headers.get("Retry-After"))
        if r.status_code not in (200, 206):
            raise HTTPStatusError(f"GET {url} answered HTTP {r.status_code} {r.reason}")
        # A server may encode the body whatever the client accepts (gzip on a .zip): the part then holds
        # decoded bytes, which neither a Range nor the Content-Length count, so such a body is never resumed.
        encoded = r.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        changed = _changed(stored, r.headers) if stored else None
        if r.status_code == 206 and have:
            start = _range_start(r.headers.get("Content-Range"))
            # An encoded slice, the body from byte 0 again, a range past the part's end (a gap no later
            # byte fills), or another version's: the part cannot be continued.
            if encoded or start == 0 or changed or (start is not None and start > have):
                if changed:
                    log.warning("%s changed on the server (%s) since %s was started: restarting from byte 0",
                                url, changed, part.name)
                else:
                    log.info("%s answered the Range from byte %d with %s: restarting %s from byte 0", url, have,
                             "an encoded slice" if encoded else f"a range from byte {start}", part.name)
                r.close()
                if changed:
                    _discard(part)
                else:  # the part's bytes are still good: they stay until the restart gets past them
                    _set_aside(part)
                return _stream_once(url, part, timeout_s, progress, verified)
            if start is not None and start < have:
                # A range from before the part's end (a server rounding to its blocks): it was an error, and
                # every later run asked the same and failed the same. The bytes from `start` on are sent
                # again, so the part is cut back to them (the checksum checks the whole, as for any resume).
                log.info("%s answered the Range from byte %d from byte %d: cutting %s back to it", url, have,
                         start, part.name)
                os.truncate(part, start)
                have = start
        held, unsized = have, False  # a body without a length is measured once it has ended (below)
        length = _content_length(r.headers.get("Content-Length"))
        if r.status_code == 200 and have:
            shorter = length is not None and length < have
            if shorter and not changed and not verified:
                # The same version (or one that does not say) cannot be shorter than the bytes held of it, and
                # no checksum would tell: a captive portal's page became the file (plain-http dlib.net).
                raise _shorter_body(url, part, have, length)
            unsized = length is None and not changed and not verified
            if changed:  # If-Range did not match: the whole new version
                log.warning("%s changed on the server (%s) since %s was started: restarting from byte 0",
                            url, changed, part.name)
            else:
                log.info("server ignored the Range request: restarting %s from byte 0", url)
            if shorter or not changed:
                # A server ignoring Range, or a captive portal or proxy answering with its own page (with
                # validators of its own, a "new version" shorter than the part): the part's bytes stay aside
                # until this body gets past them or is verified (a 1 GB zip's part was wiped for a portal's page,
                # which then failed the checksum). A longer new version replaces the part as it streams.
                _set_aside(part)
            have = 0
        total = have + length if length is not None else None
        # A 206 may stop short of the end (a CDN capping each range): then the next range follows.
        whole = _range_length(r.headers.get("Content-Range")) if r.status_code == 206 and not encoded else None
        mode = "ab" if have else "wb"
        # Without a terminal (DVC's log, CI), tqdm's redraws went into the log joined by carriage returns.
        bar_shown = progress and _stderr_is_tty()
        logged = progress and not bar_shown
        if logged:
            log.info("downloading %s to %s (%s%s)", url, part.name.removesuffix(".part"),
                     megabytes(total) if total is not None and not encoded else "size unknown",
                     f", resuming at {megabytes(have)}" if have else "")
        writing = True  # an OSError while True is the disk's (open, write, flush), not the network's
        try:
            try:
                with open(part, mode) as f, tqdm(
                    total=None if encoded else total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    disable=not bar_shown,
                ) as bar:
                    if not have:  # the part was just truncated: it holds this response's bytes from here on
                        _write_validators(part, url, _validators(r.headers))
                    chunks, next_log = r.iter_content(chunk_size=STREAM_BYTES), time.monotonic() + PROGRESS_LOG_S
                    # Counted here: a disabled tqdm (no terminal) keeps its count at `initial`, and the log
                    # lines said "0.0 MB" every 30 s of a 1 GB download.
                    done = have
                    # The part set aside for this restart goes once the restart holds more (a decoded body is
                    # discarded on failure, so it never proves itself before the end).
                    kept_bytes = _kept_size(part) if not encoded else None
                    while True:
                        writing = False
                        chunk = next(chunks, None)
                        writing = True
                        if chunk is None:
                            break
                        f.write(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
                        if kept_bytes is not None and done > kept_bytes:
                            f.flush()  # on disk before the kept bytes go: a killed run puts back the longer
                            _drop_kept(part)
                            kept_bytes = None
                        if logged and time.monotonic() >= next_log:
                            next_log = time.monotonic() + PROGRESS_LOG_S
                            log.info("%s: %s%s", part.name.removesuffix(".part"), megabytes(done),
                                     f" of {megabytes(total)}" if total and not encoded else "")
                writing = False
                # The server's bytes: for an encoded body, those read off the wire, not the decoded ones on disk.
                got = have + r.raw.tell() if encoded else part.stat().st_size
                if total is not None and got < total:
                    raise requests.ConnectionError(f"connection closed at byte {got} of {total}")
                if whole is not None and got < whole:
                    if got <= have:
                        raise requests.ConnectionError(f"a range from byte {have} of {whole} came back empty")
                    log.debug("%s sent bytes %d-%d of %d: asking for the rest", url, have, got - 1, whole)
                    return False, have > 0
            except OSError as e:
                if not writing or isinstance(e, requests.RequestException):
                    raise
                raise _write_error(e, url, part, total, keep=verified and not encoded) from e
        except BaseException:
            if encoded:
                _discard(part)
            raise
        if unsized and _kept_size(part) is not None and part.stat().st_size < held:
            # The same check for a page sent without a length (chunked, or ended by closing the connection, as a
            # portal's dynamic page is): it ended short of the bytes held, which are still aside (they go once a
            # restart gets past them), and go back in its place.
            got = part.stat().st_size
            _put_back(part)
            raise _shorter_body(url, part, held, got)
        return True, have > 0


def _shorter_body(url: str, part: Path, held: int, length: int) -> ContentError:
    """The error for a whole body of ``length`` bytes answering the resume of ``part`` (``held`` bytes), without a
    checksum to decide: shorter than the bytes already held of the same version, it is not the file."""
    return ContentError(
        f"{url} answered the resume of {part.name} (a Range from byte {held}) with a whole body of {length} bytes, "
        f"shorter than the {held} bytes already fetched of it: not the file (a captive portal's or a proxy's "
        f"page?); {part} keeps the {held} bytes fetched before, which the next run resumes (delete it if the file "
        "did change on the server)")


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _write_error(e: OSError, url: str, part: Path, total: int | None, keep: bool) -> DownloadWriteError:
    """One line for an OSError met writing ``url``'s bytes to ``part``. The part is kept for the next run to
    resume only where ``keep`` (a checksum will check the result); a full disk also gets the space still
    needed (where the server said the length) against what is free."""
    dest = part.with_name(part.name.removesuffix(".part"))
    why = errno_text(e)
    if e.filename and Path(e.filename) not in (part, dest):
        why += f": {e.filename!r}"
    message = f"writing {url} to {dest} failed: {why}"
    kept = _kept_size(part)
    if kept is not None:
        # A restart from byte 0 (the server ignored the Range): its bytes go, and the part it was to replace is
        # put back (by _fetch): that one is what the next run resumes, not "the bytes written so far".
        _discard_quietly(part)
        if e.errno in NO_SPACE:
            free = free_bytes(part.parent)
            message += (f"; the server sent the file again from byte 0 (it ignored the Range), which needs room "
                        f"beside the {megabytes(kept)} fetched before until it gets past them"
                        + (f", {megabytes(free)} is free in {part.parent}" if free is not None else "")
                        + ": free some space there and rerun")
        return DownloadWriteError(f"{message}; {part} keeps the {kept} bytes fetched before and the next run "
                                  "resumes from there")
    try:
        have = part.stat().st_size if part.is_file() else 0
    except OSError:
        have = 0
    if not keep or not have:
        _discard_quietly(part)
    if e.errno in NO_SPACE:
        free = free_bytes(part.parent)
        free = megabytes(free) if free is not None else None
        need = total - (have if keep else 0) if total is not None else None
        if need is not None and free is not None:
            message += f"; it needs {megabytes(need)} more in {part.parent}, {free} is free"
        elif free is not None:
            message += f"; {free} is free in {part.parent}"
        message += ": free some space there and rerun"
    if keep and have:
        message += f"; {part} keeps the {have} bytes written so far and the next run resumes from there"
    elif have:
        message += (f"; the partial download ({part}, {have} bytes) was deleted: without a checksum, bytes the "
                    "disk refused could not be told from good ones")
    return DownloadWriteError(message)


def _meta_path(part: Path) -> Path:
    """Where the validator of ``part``'s bytes is kept: ``<dest>.part.meta``."""
    return part.with_name(part.name + ".meta")


def _discard(part: Path) -> None:
    """Removes the part file and its validator."""
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _discard_quietly(part: Path) -> None:
    """:func:`_discard` where a write already failed: that error is the one to report."""
    try:
        _discard(part)
    except OSError:
        pass


def _kept_path(part: Path) -> Path:
    """Where a part waits while a restart from byte 0 that may not be the file streams: ``<dest>.part.kept``."""
    return part.with_name(part.name + ".kept")


def _kept_size(part: Path) -> int | None:
    try:
        return _kept_path(part).stat().st_size
    except FileNotFoundError:
        return None


def _set_aside(part: Path) -> None:
    """Moves ``part`` (and its validator) to ``<dest>.part.kept``, for a restart from byte 0 whose body has not
    proven itself yet (a captive portal's page answering the resume); :func:`_settle_kept` puts it back."""
    kept = _kept_path(part)
    os.replace(part, kept)
    _move_meta(part, kept)


def _move_meta(source: Path, target: Path) -> None:
    try:
        os.replace(_meta_path(source), _meta_path(target))
    except FileNotFoundError:
        _meta_path(target).unlink(missing_ok=True)


def _drop_kept(part: Path) -> None:
    _discard(_kept_path(part))


def _put_back(part: Path) -> int | None:
    """Puts the part set aside back in place of ``part`` (whatever it holds); returns its size, or None when
    none was set aside."""
    size = _kept_size(part)
    if size is not None:
        os.replace(_kept_path(part), part)
        _move_meta(_kept_path(part), part)
    return size


def _settle_kept(part: Path) -> int | None:
    """After a restart from byte 0 that ended (failed, or a run killed): the part set aside is put back unless
    the restart got further; returns its size where it was put back."""
    size = _kept_size(part)
    if size is None:
        return None
    if part.exists() and part.stat().st_size > size:
        _drop_kept(part)
        return None
    return _put_back(part)


def _validators(headers) -> dict[str, str] | None:
    """A response's validator usable in If-Range (RFC 9110, 13.1.5): its strong ETag, else its
    Last-Modified; None when it has neither, or only a weak ``W/`` ETag (which If-Range may not
    carry, and beside which the date may not be sent either)."""
    etag = (headers.get("ETag") or "").strip()
    if etag:
        return None if etag.startswith("W/") else {"etag": etag}
    modified = (headers.get("Last-Modified") or "").strip()
    return {"last_modified": modified} if modified else None


def _read_validators(part: Path, url: str) -> dict[str, str] | None:
    """The validator stored for ``part`` when its bytes came from ``url``, or None: none stored, an
    unreadable file, or another URL's (a mirror's ETag names its own copy, not the file: resumed as
    before, and the checksum decides)."""
    try:
        found = json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or found.get("url") != url:
        return None
    kept = {key: found[key] for key in ("etag", "last_modified") if isinstance(found.get(key), str) and found[key]}
    return kept or None


def _write_validators(part: Path, url: str, found: dict[str, str] | None) -> None:
    """Stores ``found`` (from ``url``) for ``part`` atomically (a temporary file moved into place), or
    removes a stale one."""
    meta = _meta_path(part)
    if not found:
        meta.unlink(missing_ok=True)
        return
    write_text(meta, json.dumps({"url": url, **found}))


def _changed(stored: dict[str, str], headers) -> str | None:
    """How a response's validator differs from the stored one (``"ETag ... was ..."``), or None when it is
    the same or the response does not say. The ETag decides where one was stored, else Last-Modified."""
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        if stored.get(key):
            now = (headers.get(header) or "").strip()
            return f"{header} {now}, was {stored[key]}" if now and now != stored[key] else None
    return None


RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_MAX_S = 60.0


class _BusyError(requests.ConnectionError):
    """An HTTP status that a later try may not get (:data:`RETRY_STATUSES`), with the server's Retry-After."""

    def __init__(self, message: str, retry_after: str | None):
        super().__init__(message)
        try:
            self.retry_after_s = min(float(retry_after), RETRY_AFTER_MAX_S) if retry_after else 0.0
        except ValueError:  # an HTTP date: the back-off's own delay
            self.retry_after_s = 0.0


class _StalledError(_BusyError):
    """A range short of the file's end that left the part no longer than before (a server answering each Range
    with the same first slice): counted and backed off as a busy answer, as a dropped connection is."""

    def __init__(self, message: str):
        super().__init__(message, None)


def _content_length(value: str | None) -> int | None:
    """A Content-Length header's value, or None when absent or not one number (a value sent twice,
    ``"100, 100"``, as some proxies do, is that number)."""
    values = {v.strip() for v in (value or "").split(",")}
    if len(values) != 1:
        return None
    (only,) = values
    return int(only) if only.isdigit() else None


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a 206 answer's ``Content-Range: bytes START-END/LENGTH``, or None."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", content_range or "")
    return int(match[1]) if match else None


def _range_length(content_range: str | None) -> int | None:
    """The whole file's length in a 206 answer's ``Content-Range: bytes START-END/LENGTH``, or None (``*``)."""
    match = re.fullmatch(r"\s*bytes\s+\d+-\d+/(\d+)\s*", content_range or "")
    return int(match[1]) if match else None


def _verify() -> bool | str:
    """requests' ``verify``: the CA file ``SSL_CERT_FILE`` names (which Python's ssl, uv and curl builds
    read, and requests does not) where neither ``REQUESTS_CA_BUNDLE`` nor ``CURL_CA_BUNDLE`` is set, else
    True (those, or certifi's bundle, as requests decides)."""
    if os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"):
        return True
    cert_file = os.environ.get("SSL_CERT_FILE")
    return cert_file if cert_file and os.path.isfile(cert_file) else True


def _unsatisfiable_length(content_range: str | None) -> int | None:
    """The file's length in a 416 answer's ``Content-Range: bytes */LENGTH``, or None."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", content_range or "")
    return int(match[1]) if match else None


def download(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    mirrors: tuple[str, ...] | list[str] = (),
    retries: int = 5,
    timeout_s: float = 30.0,
    backoff_s: float = 1.0,
    progress: bool = True,
    check: Callable[[Path], str | None] | None = None,
) -> Path:
    """Downloads ``url`` to ``dest``, resuming and verifying, and moves it into place atomically.

    If ``dest`` already exists and matches the checksum, nothing is fetched.

    Args:
        url: HTTP(S) URL.
        dest: Final path of the file.
        md5: Expected md5 hex digest, or None.
        sha256: Expected sha256 hex digest, or None.
        mirrors: Other URLs of the same file, tried in order when one fails (an HTTP error, a
            connection that keeps failing, or a checksum mismatch); the next resumes the bytes
            the last one fetched, and the checksum decides (If-Range goes only to the URL the
            part's bytes came from: a mirror's validator names its own copy).
        retries: Attempts after a dropped connection or a busy server (HTTP 408, 429, 500, 502, 503,
            504) in a row; each resumes where the last stopped, and one that got further than any before
            starts the count anew.
        timeout_s: Connect timeout, and the longest wait for the next bytes (not for the whole body).
        backoff_s: Sleep before the first retry; doubled each retry.
        progress: Show a tqdm progress bar (where stderr is not a terminal: a log line every 30 s).
        check: Called with a complete, verified file; what it returns (a reason, e.g. "something that is
            not a zip file") rejects the file like a wrong checksum: deleted, and the next URL is tried.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ChecksumError: The complete file does not match ``md5``/``sha256`` (from any URL: with mirrors, also where
            the others failed otherwise, before or after it; the message lists each URL's failure).
        ContentError: ``check`` rejected the complete file (from any URL, and no URL sent a wrong checksum).
        HTTPStatusError: The server answered an HTTP error status (every URL's did).
        UnreachableError: No connection could be made or kept (to any URL): a host name that does not
            resolve, an untrusted certificate, a connection that kept failing.
        DownloadError: An HTTP error, the connection kept failing (at every URL; the message
            names each), or a TLS certificate that is not trusted (``REQUESTS_CA_BUNDLE`` or
            ``SSL_CERT_FILE`` names the CA file to trust).
        DownloadWriteError: The bytes could not be written (a full disk, a folder without write access);
            no mirror is tried.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only cache (a team's shared one) without this folder yet
        raise DownloadWriteError(f"cannot download {url} to {dest}: [Errno {e.errno}] {e.strerror}: "
                                 f"{e.filename!r}") from e
    urls = [url, *mirrors]
    failures: list[str] = []
    errors: list[DownloadError] = []
    # Runs side by side (dvc queue start -j 2) share the cache: one fetches, the other waits and reuses.
    with locked(dest, f"downloading {url} to {dest}"):
        # Once for every URL: the file there is the same whichever is asked (a release zip is over 1 GB to hash).
        stale = None
        if dest.exists():
            if _matches(dest, md5, sha256):
                if check is None or check(dest) is None:
                    log.info("%s already present and verified", dest)
                    # A part left beside it (a killed run's, and the one it had set aside for a restart, up to
                    # the whole file each) is of no use now, and nothing else would ever remove it.
                    part = dest.with_name(dest.name + ".part")
                    _discard_quietly(part)
                    _discard_quietly(_kept_path(part))
                    return dest
                dest.unlink()  # kept before a check was asked for: fetched again
            else:
                # A copy put there by hand (offline) that is not the file: without saying so, a failed fetch
                # read as if no copy had been there at all.
                stale = (f"{dest} is there but its {'sha256' if sha256 else 'md5'} does not match (another "
                         "version, or cut short), so it is not used: replace it with the right file, or rerun online")
                log.warning("%s; fetching %s", stale, url)
        for source, following in zip(urls, [*mirrors, None]):
            try:
                return _download_locked(source, dest, md5, sha256, retries, timeout_s, backoff_s, progress, check)
            except DownloadError as e:
                if not mirrors:
                    if stale is None:
                        raise
                    raise type(e)(f"{e}; {stale}") from e
                failures.append(f"{source}: {e}")
                errors.append(e)
                if following:
                    log.warning("%s failed (%s); trying the mirror %s", source, e, following)
    kind, cause = _telling_error(errors)
    raise kind(f"every URL of {dest.name} failed:\n" + "\n".join(failures) + (f"\n{stale}" if stale else "")) \
        from cause


def _telling_error(errors: list[DownloadError]) -> tuple[type[DownloadError], DownloadError]:
    """Of the failures of every URL (in the order tried), the type :func:`download` raises and the failure it
    names as the cause: what went wrong, whichever URL happened to be tried last.

    A URL that sent the whole file with other bytes (:class:`ChecksumError`, else :class:`ContentError`: a page
    sent for the file) is a data-integrity problem with its own fix (the pinned checksum, another source): a mirror
    that was not reached, or answered 404, after it no longer hides it (the mix's plain :class:`DownloadError`, or
    the last URL's type, was raised). Without wrong bytes, "the server answered" (:class:`HTTPStatusError`) or
    "none was reached" (:class:`UnreachableError`) only where it is so of every URL; another mix is a plain
    :class:`DownloadError`.
    """
    for kind in (ChecksumError, ContentError):
        found = next((e for e in errors if isinstance(e, kind)), None)
        if found is not None:
            return type(found), found
    last = errors[-1]
    kind = type(last)
    if kind in (HTTPStatusError, UnreachableError) and not all(isinstance(e, kind) for e in errors):
        kind = DownloadError
    return kind, last


def _download_locked(url: str, dest: Path, md5: str | None, sha256: str | None, retries: int, timeout_s: float,
                     backoff_s: float, progress: bool, check: Callable[[Path], str | None] | None = None) -> Path:
    """Fetches ``url`` into ``dest`` (not there, or not the file: :func:`download` has looked) through its part."""
    part = dest.with_name(dest.name + ".part")
    verified = bool(md5 or sha256)
    resumed = _fetch(url, part, retries, timeout_s, backoff_s, progress, verified)
    wrong = _wrong_checksum(part, url, md5, sha256)
    if wrong:
        _reject_restart(part, url, ChecksumError, wrong)
    if wrong and resumed:
        # The part's head may be another version's (a server without ETag or Last-Modified for If-Range, a
        # part left by a mirror or an older run): only bytes fetched in one piece are called wrong.
        log.warning("%s after resuming %s: the bytes kept from before may be another version's; fetching it "
                    "whole", wrong, part.name)
        _discard(part)
        _fetch(url, part, retries, timeout_s, backoff_s, progress, verified)
        wrong = _wrong_checksum(part, url, md5, sha256)
        if wrong:
            _reject_restart(part, url, ChecksumError, wrong)
    if wrong:
        _discard(part)
        raise ChecksumError(f"{wrong}; the download was deleted: rerun to fetch it again. If it fails the same way, "
                            "the server (or a proxy between) sends other bytes than the file: fetch it another way "
                            f"and put it at {dest}")
    wrong = check(part) if check is not None else None
    if wrong:
        _reject_restart(part, url, ContentError, f"{url} sent {wrong}")
        _discard(part)
        raise ContentError(f"{url} sent {wrong}; it was deleted, and the next run fetches it again")
    _drop_kept(part)  # the restart proved itself: the bytes it replaces are no longer needed
    _meta_path(part).unlink(missing_ok=True)  # first: a part left without it is resumed as before
    os.replace(part, dest)
    return dest


def _reject_restart(part: Path, url: str, kind: type[DownloadError], wrong: str) -> None:
    """Where the rejected bytes are a restart from byte 0 that answered a resume (a captive portal's page sent
    with 200 for a Range), puts the part they were to replace back and raises ``kind`` saying so."""
    if _kept_size(part) is None:
        return
    size = _put_back(part)
    raise kind(f"{wrong}: {url} answered the resume of {part.name} (a Range request) with a whole body that is not "
               f"the file (a captive portal's or a proxy's page?), which was dropped; {part} keeps the {size} bytes "
               "fetched before, which the next run resumes")


def _wrong_checksum(part: Path, url: str, md5: str | None, sha256: str | None) -> str | None:
    """``"<algorithm> of <url> is <got>, expected <expected>"`` for the first checksum ``part`` fails, or None."""
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            got = file_digest(part, algorithm)
            if got != expected.lower():
                return f"{algorithm} of {url} is {got}, expected {expected}"
    return None


def _fetch(url: str, part: Path, retries: int, timeout_s: float, backoff_s: float, progress: bool,
           verified: bool) -> bool:
    """Streams ``url`` into ``part`` to its end, retrying dropped connections and busy servers; returns
    whether its last try appended to bytes already in the part (a resume: they may be another version's)."""
    _settle_kept(part)  # a run killed while a restart streamed
    try:
        return _fetch_settled(url, part, retries, timeout_s, backoff_s, progress, verified)
    except BaseException:
        _settle_kept(part)  # a restart that failed (an HTTP error, a stop) gives the part back its bytes
        raise


def _fetch_settled(url: str, part: Path, retries: int, timeout_s: float, backoff_s: float, progress: bool,
                   verified: bool) -> bool:
    delay = backoff_s
    # Failures since the part last grew past its furthest point: such a try starts the count (and the back-off)
    # anew; a restart from byte 0 (a changed file, a server ignoring Range) counts until it gets further than that.
    attempt, furthest = 0, part.stat().st_size if part.exists() else 0
    while True:
        try:
            before = part.stat().st_size if part.exists() else 0
            complete, appended = _stream_once(url, part, timeout_s, progress, verified)
            # Only bytes appended to older ones may mix two versions; a restart from byte 0 (a server that
            # ignores Range) leaves one piece, which a checksum mismatch then fetched whole once more in vain.
            resumed = appended
            if complete:
                return resumed
            after = part.stat().st_size
            if after <= before:
                # A short range that restarted the part and stopped where it was (the same first slice for every
                # Range): asking for the next one at once, uncounted, looped for ever.
                # A restart's bytes (from byte 0) are put back by the part they were to replace, below.
                raise _StalledError(f"GET {url} from byte {before} got no further: the server answered with a "
                                    f"range from {'an earlier byte' if appended else 'byte 0'} that stops short "
                                    f"of the end, at {after} bytes")
            continue  # a range short of the end: the next one at once (it got further: no back-off owed)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if _unresolvable(e):
                # Waiting does not make a host name resolve (no network, no DNS, a typo): backing off
                # would only delay the mirror or the error by half a minute.
                if _through_proxy(e):  # the proxy's name, not the URL's: the setting is what to check
                    raise UnreachableError(f"GET {url} failed: cannot resolve the host name of the proxy"
                                           f"{PROXY_HINT} ({e})") from e
                raise UnreachableError(f"GET {url} failed: cannot resolve the host name ({e})") from e
            if _untrusted(e):
                # No retry changes a certificate: backing off only delayed the mirror or the error.
                raise UnreachableError(
                    f"GET {url} failed: the server's TLS certificate is not trusted ({e}); behind a proxy that "
                    "inspects TLS, point REQUESTS_CA_BUNDLE (or SSL_CERT_FILE) at its CA certificate (a PEM file)"
                ) from e
            _settle_kept(part)  # a restart cut short: the part it was to replace is resumed instead
            have = part.stat().st_size if part.exists() else 0
            if have > furthest:  # a line that drops every so many MB still gets a large zip to its end
                attempt, delay, furthest = 0, backoff_s, have
            if attempt == retries:
                kept = f"; {part} keeps the {have} bytes fetched so far and the next run resumes from there" if have else ""
                proxy = f" through the proxy{PROXY_HINT}" if _through_proxy(e) else ""
                # A server that kept answering "busy" (503...) was reached: its URL and state, not the line, are news.
                kind = DownloadError if isinstance(e, _BusyError) else UnreachableError
                raise kind(f"download of {url}{proxy} failed after {retries + 1} attempts: {e}{kept}") from e
            attempt += 1
            wait = max(delay, getattr(e, "retry_after_s", 0.0))
            log.warning("download interrupted (%s); resuming in %.1f s", e, wait)
            time.sleep(wait)
            delay *= 2
        except requests.RequestException as e:  # a redirect loop, a bad URL scheme, undecodable content
            raise DownloadError(f"GET {url} failed: {type(e).__name__}: {e}") from e


def _causes(error: BaseException):
    """``error`` and every exception it wraps (cause, context, urllib3's ``reason``, arguments), once each."""
    seen: set[int] = set()
    todo: list[object] = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]


PROXY_HINT = (" (the HTTPS_PROXY / HTTP_PROXY / ALL_PROXY setting: check it, or list the host in NO_PROXY to "
              "bypass the proxy)")


def _through_proxy(error: BaseException) -> bool:
    """True when ``error`` (or what it wraps) is the proxy's failure (requests' or urllib3's ProxyError)."""
    return any(isinstance(e, (requests.exceptions.ProxyError, Urllib3ProxyError)) for e in _causes(error))


def _untrusted(error: BaseException) -> bool:
    """True when ``error`` (or what it wraps) is a failed certificate verification: an unknown CA, a
    self-signed or expired certificate, a host name it does not name."""
    return any(isinstance(e, ssl.SSLCertVerificationError) for e in _causes(error))


def _unresolvable(error: BaseException) -> bool:
    """True when ``error`` (or what it wraps) says the host name does not resolve. A temporary resolver
    failure (``EAI_AGAIN``: "Temporary failure in name resolution", common under a busy resolver) is not
    that: it is retried like a dropped connection."""
    named = False
    for e in _causes(error):
        if isinstance(e, socket.gaierror) and e.errno == socket.EAI_AGAIN:
            return False
        named = named or isinstance(e, NameResolutionError)
    return named


def _matches(path: Path, md5: str | None, sha256: str | None) -> bool:
    if not md5 and not sha256:
        return True
    return all(
        file_digest(path, algorithm) == expected.lower()
        for algorithm, expected in (("md5", md5), ("sha256", sha256))
        if expected
    )
