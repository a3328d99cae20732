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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import requests
from tqdm import tqdm
from urllib3.exceptions import NameResolutionError

from faceage.atomic import locked, write_text
from faceage.errors import FaceAgeError

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Network reads are small so that a dropped connection loses at most this much progress.
STREAM_BYTES = 1 << 16


class DownloadError(FaceAgeError, RuntimeError):
    """The file could not be fetched (network failure, HTTP error, retries exhausted)."""


class ChecksumError(DownloadError):
    """The fetched bytes do not match the expected checksum."""


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


def _stream_once(url: str, part: Path, timeout_s: float, progress: bool) -> bool:
    """Appends the missing bytes of ``url`` to ``part``; returns True when complete."""
    have = part.stat().st_size if part.exists() else 0
    # The bytes on disk must be the server's bytes: a body sent gzip-encoded would be stored decoded,
    # and a Range resume would then count decoded bytes against the encoded stream.
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    # If-Range: the rest of the body only if it is still the version the part's bytes came from, else
    # the whole new body (200). A part without a stored validator (none sent, or an older part) resumes as is.
    stored = _read_validators(part, url) if have else None
    if stored:
        headers["If-Range"] = stored.get("etag") or stored["last_modified"]
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as r:
        if r.status_code == 416 and have:
            # Range not satisfiable: the part file holds the whole body, unless the server's length
            # (Content-Range: bytes */LENGTH) says otherwise: a part longer than the file holds bytes of
            # another version of it (and was taken whole: as the file, where no checksum was given).
            length = _unsatisfiable_length(r.headers.get("Content-Range"))
            if length is None or length == have:
                return True
            log.info("%s holds %d bytes but %s has %d: restarting from byte 0", part.name, have, url, length)
            _discard(part)
            return _stream_once(url, part, timeout_s, progress)
        if r.status_code in RETRY_STATUSES:  # busy or briefly broken: worth the back-off, as a dropped connection is
            raise _BusyError(f"GET {url} answered HTTP {r.status_code} {r.reason}", r.headers.get("Retry-After"))
        if r.status_code not in (200, 206):
            raise DownloadError(f"GET {url} answered HTTP {r.status_code} {r.reason}")
        # A server may encode the body whatever the client accepts (gzip on a .zip): the part then holds
        # decoded bytes, which neither a Range nor the Content-Length count, so such a body is never resumed.
        encoded = r.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity")
        changed = _changed(stored, r.headers) if stored else None
        if r.status_code == 206 and have:
            start = _range_start(r.headers.get("Content-Range"))
            if encoded or start == 0 or changed:  # an encoded slice, the whole body again, or another version's
                if changed:
                    log.warning("%s changed on the server (%s) since %s was started: restarting from byte 0",
                                url, changed, part.name)
                else:
                    log.info("%s answered the Range with %s: restarting %s from byte 0", url,
                             "an encoded slice" if encoded else "the whole body", part.name)
                r.close()
                _discard(part)
                return _stream_once(url, part, timeout_s, progress)
            if start is not None and start != have:
                raise DownloadError(f"GET {url} asked from byte {have} answered from byte {start}")
        if r.status_code == 200 and have:
            if changed:  # If-Range did not match: the whole new version
                log.warning("%s changed on the server (%s) since %s was started: restarting from byte 0",
                            url, changed, part.name)
            else:
                log.info("server ignored the Range request: restarting %s from byte 0", url)
            have = 0
        length = _content_length(r.headers.get("Content-Length"))
        total = have + length if length is not None else None
        mode = "ab" if have else "wb"
        try:
            with open(part, mode) as f, tqdm(
                total=None if encoded else total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar:
                if not have:  # the part was just truncated: it holds this response's bytes from here on
                    _write_validators(part, url, _validators(r.headers))
                for chunk in r.iter_content(chunk_size=STREAM_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
            # The server's bytes: for an encoded body, those read off the wire, not the decoded ones on disk.
            got = have + r.raw.tell() if encoded else part.stat().st_size
            if total is not None and got < total:
                raise requests.ConnectionError(f"connection closed at byte {got} of {total}")
        except BaseException:
            if encoded:
                _discard(part)
            raise
        return True


def _meta_path(part: Path) -> Path:
    """Where the validator of ``part``'s bytes is kept: ``<dest>.part.meta``."""
    return part.with_name(part.name + ".meta")


def _discard(part: Path) -> None:
    """Removes the part file and its validator."""
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


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
        progress: Show a tqdm progress bar.
        check: Called with a complete, verified file; what it returns (a reason, e.g. "something that is
            not a zip file") rejects the file like a wrong checksum: deleted, and the next URL is tried.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ChecksumError: The complete file does not match ``md5``/``sha256`` (from every URL).
        ContentError: ``check`` rejected the complete file (from the last URL).
        DownloadError: An HTTP error, or the connection kept failing (at every URL; the message
            names each).
    """
    dest = Path(dest)  # locked() makes its folder
    urls = [url, *mirrors]
    failures: list[str] = []
    last: DownloadError | None = None
    # Runs side by side (dvc queue start -j 2) share the cache: one fetches, the other waits and reuses.
    with locked(dest, f"downloading {url} to {dest}"):
        for source, following in zip(urls, [*mirrors, None]):
            try:
                return _download_locked(source, dest, md5, sha256, retries, timeout_s, backoff_s, progress, check)
            except DownloadError as e:
                if not mirrors:
                    raise
                failures.append(f"{source}: {e}")
                last = e
                if following:
                    log.warning("%s failed (%s); trying the mirror %s", source, e, following)
    raise type(last)(f"every URL of {dest.name} failed:\n" + "\n".join(failures)) from last


def _download_locked(url: str, dest: Path, md5: str | None, sha256: str | None, retries: int, timeout_s: float,
                     backoff_s: float, progress: bool, check: Callable[[Path], str | None] | None = None) -> Path:
    if dest.exists() and _matches(dest, md5, sha256):
        if check is None or check(dest) is None:
            log.info("%s already present and verified", dest)
            return dest
        dest.unlink()  # kept before a check was asked for: fetched again
    part = dest.with_name(dest.name + ".part")
    delay = backoff_s
    # Failures since the part last grew past its furthest point: such a try starts the count (and the back-off)
    # anew; a restart from byte 0 (a changed file, a server ignoring Range) counts until it gets further than that.
    attempt, furthest = 0, part.stat().st_size if part.exists() else 0
    while True:
        try:
            _stream_once(url, part, timeout_s, progress)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if _unresolvable(e):
                # Waiting does not make a host name resolve (no network, no DNS, a typo): backing off
                # would only delay the mirror or the error by half a minute.
                raise DownloadError(f"GET {url} failed: cannot resolve the host name ({e})") from e
            have = part.stat().st_size if part.exists() else 0
            if have > furthest:  # a line that drops every so many MB still gets a large zip to its end
                attempt, delay, furthest = 0, backoff_s, have
            if attempt == retries:
                kept = f"; {part} keeps the {have} bytes fetched so far and the next run resumes from there" if have else ""
                raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {e}{kept}") from e
            attempt += 1
            wait = max(delay, getattr(e, "retry_after_s", 0.0))
            log.warning("download interrupted (%s); resuming in %.1f s", e, wait)
            time.sleep(wait)
            delay *= 2
        except requests.RequestException as e:  # a redirect loop, a bad URL scheme, undecodable content
            raise DownloadError(f"GET {url} failed: {type(e).__name__}: {e}") from e
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected:
            got = file_digest(part, algorithm)
            if got != expected.lower():
                _discard(part)
                raise ChecksumError(
                    f"{algorithm} of {url} is {got}, expected {expected}; the download was deleted"
                )
    wrong = check(part) if check is not None else None
    if wrong:
        _discard(part)
        raise ContentError(f"{url} sent {wrong}; it was deleted, and the next run fetches it again")
    _meta_path(part).unlink(missing_ok=True)  # first: a part left without it is resumed as before
    os.replace(part, dest)
    return dest


def _unresolvable(error: BaseException) -> bool:
    """True when ``error`` (or what it wraps) says the host name does not resolve. A temporary resolver
    failure (``EAI_AGAIN``: "Temporary failure in name resolution", common under a busy resolver) is not
    that: it is retried like a dropped connection."""
    seen: set[int] = set()
    todo: list[object] = [error]
    named = False
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror) and e.errno == socket.EAI_AGAIN:
            return False
        named = named or isinstance(e, NameResolutionError)
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
    return named


def _matches(path: Path, md5: str | None, sha256: str | None) -> bool:
    if not md5 and not sha256:
        return True
    return all(
        file_digest(path, algorithm) == expected.lower()
        for algorithm, expected in (("md5", md5), ("sha256", sha256))
        if expected
    )
