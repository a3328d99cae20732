"""MLflow tracking: where runs go, how they start, resume and get tagged.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db``
by absolute path, so runs of ``dvc exp run --temp`` / ``--queue`` (which execute in a copy
under ``.dvc/tmp/exps``) land in the same database as ``dvc repro``; a relative ``sqlite:///``
path in the variable is taken from the repo root for the same reason.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from faceage.atomic import locked, write_text
from faceage.errors import FaceAgeError
from faceage.logs import masked_netloc
from faceage.paths import repo_root

log = logging.getLogger(__name__)

EXPERIMENT = "face-age"
DVC_EXPERIMENT_TAG = "dvc_experiment"  # the DVC experiment a run trained in (``dvc exp run`` names it)
# The DVC experiment that last evaluated the run ("" outside one): an evaluate-only rerun in another experiment
# (train cached) re-tags the same run, whose dvc_experiment then names an experiment with another evaluation.
EVALUATED_IN_TAG = "evaluate.dvc_experiment"
# HEAD of the latest resume of a run that ran another commit than the one it started at (tag ``git_commit``)
RESUMED_AT_COMMIT_TAG = "resumed_at_commit"
# A tracking server not connected to in this long (seconds), or connected but silent for the second, is reported
# at once instead of retried for minutes
PROBE_TIMEOUT_S = (10, 60)
# A proxy's answers for a server behind it that does not answer: MLflow retries them for minutes, as a refusal
GATEWAY_DOWN = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
# MLflow's settings for its first request to a tracking server (:func:`_first_request`), where the user set none
FIRST_REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S[1])}


class TrackingError(FaceAgeError):
    """The MLflow tracking store cannot serve a stage: a server that does not answer, or a run not in it.

    ``status``: a proxy's 502/503/504 (:data:`GATEWAY_DOWN`) where :func:`check_reachable` found one in front of a
    server that is down, else ``None`` (a refused or timed-out connection is then the ``__cause__``).
    """

    def __init__(self, *args, status: int | None = None):
        super().__init__(*args)
        self.status = status


class NoExperimentError(TrackingError):
    """A reader (``setup_mlflow(writable=False)``) found no ``face-age`` experiment in the store: it holds no runs of
    this project, and a reader creates nothing."""


@contextmanager
def mlflow_env(name: str, value: str) -> Iterator[None]:
    """Sets an environment variable (MLflow reads its settings there) for the duration, then restores it.

    ``MLFLOW_TRACKING_URI`` also sets MLflow's process-wide tracking URI (``mlflow.set_tracking_uri``,
    which :func:`setup_mlflow` calls) for the duration and puts the previous one back after: MLflow
    reads that URI before the variable, so one set before the block would hide ``value`` and one set
    inside it (by ``setup_mlflow``) would outlive the block.
    """
    old = os.environ.get(name)
    uri_context = nullcontext()
    if name == "MLFLOW_TRACKING_URI":
        # MLflow's own save/set/restore of the global URI (what its test fixture ``tracking_uri_mock`` uses).
        try:
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri
        except ImportError:  # a later MLflow without it: the variable alone, as before
            _use_tracking_uri = None
        if _use_tracking_uri is not None:
            uri_context = _use_tracking_uri(value)
    try:
        with uri_context:
            os.environ[name] = value
            yield
    finally:
        if old is None:  # after the URI's restore, which also writes the variable
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the absolute ``sqlite:///.../mlflow.db`` of the repo (a ``%`` or ``?`` in
    its path quoted, :func:`_quoted`).

    A relative ``sqlite:///`` path in the variable (``sqlite:///mlflow.db``, as ``mlflow ui`` is given
    it) is taken from :func:`faceage.paths.repo_root`: taken from the working folder, as MLflow does,
    a ``dvc exp run --temp`` / ``--queue`` run logged into a database inside its temporary copy, deleted
    with it, and its ``run.json`` named a run no store held. Outside a DVC temp run it is the same file.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{_quoted(repo_root() / 'mlflow.db')}"
    if uri.startswith("sqlite:///"):
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        if path and path != ":memory:" and not Path(path).is_absolute():
            return f"sqlite:///{_quoted(repo_root())}/{path}{sep}{query}"  # ``path`` as given: quoted by the user
    return uri


def _quoted(path: Path | str) -> str:
    """A local path as the database part of a ``sqlite:///`` URI: SQLAlchemy reads ``%xx`` there as an escape and
    ``?`` as the start of the query, so a repo in ``100%-faces`` or ``what?`` opened another file ("unable to open
    database file" from every stage that logs). Other characters (spaces, ``ü``) are read as they are, and kept
    readable."""
    return str(path).replace("%", "%25").replace("?", "%3F")


def display_uri(uri: str | None = None) -> str:
    """The tracking URI (default :func:`tracking_uri`) as logs, error messages and the model card show it:
    a password in it (``http://user:secret@host``, which MLflow accepts) is masked, and so is a user part
    alone (``https://TOKEN@host``)."""
    from urllib.parse import urlsplit, urlunsplit

    uri = uri or tracking_uri()
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=masked_netloc(parts.netloc)))


def _in_repo(path: Path) -> str | None:
    """An absolute ``path`` relative to :func:`faceage.paths.repo_root` (POSIX form), or None where it is not under
    it."""
    root = repo_root()
    for candidate in (path, path.resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return None


def portable_path(path: str) -> str:
    """A local path as a file that leaves this machine shows it (the model card the bento serves, a committed
    report): an absolute one relative to :func:`faceage.paths.repo_root` where it is under it, else its file name
    alone (the folders of the machine that wrote it mean nothing elsewhere and name its user). A relative path, as
    it is."""
    given = Path(path)
    if not given.is_absolute():
        return path
    return _in_repo(given) or given.name


def portable_uri(uri: str | None = None) -> str:
    """The tracking URI (default :func:`tracking_uri`) as a file that leaves this machine shows it: masked as
    :func:`display_uri`, and a ``sqlite`` store at an absolute path shown as ``sqlite:///mlflow.db`` (relative, as
    ``mlflow ui --backend-store-uri`` is given it at the repo root) where it is under the repo root, else as the
    database's file name alone. A server's URI, as :func:`display_uri` shows it."""
    from urllib.parse import unquote

    uri = display_uri(uri)
    path, sep, query = uri.removeprefix("sqlite:///").partition("?")
    if not uri.startswith("sqlite:///") or not path or path == ":memory:" or not Path(path).is_absolute():
        return uri
    path = unquote(path)  # the file SQLAlchemy opens (:func:`_quoted`), compared with the repo root's folders
    inside = _in_repo(Path(path))
    return f"sqlite:///{_quoted(inside)}{sep}{query}" if inside else Path(path).name


def portable_source(source: str | None) -> str:
    """A data source (``fetch_data.source``) as a file that leaves this machine shows it (the model card, the sweep
    report): a URL with its secrets masked (:func:`masked_url`), a local path without this machine's folders
    (:func:`portable_path`), ``?`` where unknown."""
    if not source:
        return "?"
    return masked_url(source) if "://" in source else portable_path(source)


def masked_url(url: str | None) -> str | None:
    """A URL (``fetch_data.source``) as the model card and the bento lineage show it: a ``user:password@`` or
    token part masked (:func:`display_uri`), and each query value too (``?X-Amz-Signature=***``: a presigned
    download's signature is a credential). A local path, or None, as it is."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    if not url or "://" not in url:
        return url
    parts = urlsplit(display_uri(url))
    if not parts.query:
        return urlunsplit(parts)
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(parts.query, keep_blank_values=True)) or "***"
    return urlunsplit(parts._replace(query=query))


def _host_part(netloc: str) -> str:
    """``host[:port]`` of a URL's network location, without its ``user[:password]@`` part."""
    return netloc.rpartition("@")[2]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute, or relative to the working folder), else None: its path
    unquoted (``%20``, ``%25``), as SQLAlchemy opens it."""
    from urllib.parse import unquote

    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri.removeprefix("sqlite:///").partition("?")[0])).resolve()


def absent_store(uri: str | None = None) -> Path | None:
    """The database file of a ``sqlite:///`` store (``uri``, default :func:`tracking_uri`) that is not there: no
    file, or an empty one (no tables: MLflow's first read writes its schema into it); else None (a store there, an
    in-memory one, or a server's, not probed). A reader must stop before MLflow's first access, which creates the
    database, its tables and its folder (a mistyped ``MLFLOW_TRACKING_URI`` left an empty store behind)."""
    db = sqlite_path(tracking_uri() if uri is None else uri)
    if db is None or db.name == ":memory:":
        return None
    return None if db.is_file() and db.stat().st_size > 0 else db


def check_reachable(uri: str | None = None, *, writable: bool = True) -> None:
    """Fails fast when an ``http(s)`` tracking store does not answer, or (``writable``) a ``sqlite`` store cannot
    be written; other stores are not probed.

    MLflow retries a request to a server that refuses or drops the connection for about four minutes
    (seven retries with back-off) before its traceback; a stage then reported a mistyped
    ``MLFLOW_TRACKING_URI`` or a stopped server only after its work (and evaluate after all of it).
    Any HTTP answer counts as reachable (also 401/403 from a proxy: MLflow's own request reports those),
    except a proxy's 502/503/504 (:data:`GATEWAY_DOWN`), which MLflow retries as long as a refusal.

    Raises:
        TrackingError: The server does not answer (:data:`PROBE_TIMEOUT_S`), or the sqlite store is read-only
            (:func:`check_writable`).
    """
    uri = uri or tracking_uri()
    if writable:
        check_writable(uri)
    if not uri.startswith(("http://", "https://")):
        return
    import warnings

    import requests

    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    bare = urlunsplit(parts._replace(netloc=_host_part(parts.netloc)))  # no user:password in the URL
    try:
        # Only whether something answers, so no credentials go with it (neither the URL's nor ~/.netrc's: the
        # `auth` below adds none) and the certificate is not checked: MLflow's own requests check it as configured.
        # A TLS handshake that fails (a server that wants a client certificate, MLFLOW_TRACKING_CLIENT_CERT_PATH)
        # is a server that answers.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # urllib3's InsecureRequestWarning
            answer = requests.get(bare, timeout=PROBE_TIMEOUT_S, verify=False, allow_redirects=False,
                                  auth=lambda r: r)
            answer.close()
    except requests.exceptions.SSLError:
        return
    except requests.RequestException as e:
        raise TrackingError(f"the MLflow tracking server {display_uri(uri)} (MLFLOW_TRACKING_URI) does not answer "
                            f"({type(e).__name__}): start it (make mlflow-server), correct the URL, or unset "
                            "MLFLOW_TRACKING_URI to log to the repo's mlflow.db") from e
    if answer.status_code in GATEWAY_DOWN:
        raise TrackingError(f"the MLflow tracking server {display_uri(uri)} (MLFLOW_TRACKING_URI) answers "
                            f"{answer.status_code} {GATEWAY_DOWN[answer.status_code]}: the proxy there reaches no "
                            "server behind it; start the server, correct the URL, or unset MLFLOW_TRACKING_URI to "
                            "log to the repo's mlflow.db", status=answer.status_code)


def check_writable(uri: str | None = None) -> None:
    """Fails fast when a ``sqlite`` store (:func:`tracking_uri` by default) cannot be written: the database file, or
    its folder (SQLite writes its journal beside the file, MLflow the run artifacts in ``mlruns/`` there), is
    read-only for this user. Other stores are not checked.

    MLflow opens a read-only database for reading without a word; its first write (train's run, evaluate's
    logging after the whole evaluation) then failed with "attempt to write a readonly database" (or "unable to
    open database file") in a traceback.

    Raises:
        TrackingError: The file, or the folder it is (or would be created) in, cannot be written.
    """
    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if db is None or db.name == ":memory:":
        return
    if db.exists():
        # The artifacts folder setup_mlflow gives the experiment: a read-only one failed train at its very end
        artifacts = db.parent / "mlruns"
        path = next((p for p in (db, db.parent, artifacts) if p.exists() and not os.access(p, os.W_OK)), None)
    else:  # MLflow creates it (and locked() its folders)
        folder = next((f for f in db.parents if f.exists()), None)
        path = folder if folder is not None and not os.access(folder, os.W_OK) else None
        if path is not None and path != db.parent:
            # A store on a share that is not mounted, a mistyped folder: "<the first folder there> is read-only"
            # sent the user to make it writable when the path was what was wrong
            raise TrackingError(f"the MLflow store {display_uri(uri)} cannot be created: {db.parent} does not exist "
                                f"and {path}, where it would be made, is read-only for this user; correct "
                                "MLFLOW_TRACKING_URI (is its folder mounted?), or create that folder")
    if path is None:
        return
    raise TrackingError(f"the MLflow store {display_uri(uri)} cannot be written: {path} is read-only for this user "
                        "(the database and its folder must be writable); make them writable, or set "
                        "MLFLOW_TRACKING_URI to a store this user can write")


def setup_mlflow(*, writable: bool = True):
    """Points MLflow at :func:`tracking_uri` and the ``face-age`` experiment; returns the module. An
    ``MLFLOW_RUN_ID`` in the environment is dropped, with a warning: ``mlflow.start_run()`` would continue that run;
    an ``MLFLOW_EXPERIMENT_NAME`` or ``MLFLOW_EXPERIMENT_ID`` naming another experiment is ignored, with a warning.

    ``writable=False`` is for a caller that only reads runs (the sweep's report): a read-only sqlite store serves it,
    and a store without the ``face-age`` experiment is a :class:`NoExperimentError`, not created (the write failed
    on a read-only store with SQLite's "attempt to write a readonly database" in a traceback).

    MLflow creates and migrates a sqlite store's tables on a process's first access, and two
    processes doing that at once (``dvc queue start -j 2`` on a fresh clone) fail, one of them
    leaving a store every later run fails on. So the first access and the experiment's creation
    happen under a lock beside the database (``.mlflow.db.lock``); later writes need none.

    Raises:
        TrackingError: An ``http(s)`` store does not answer (:func:`check_reachable`), a ``sqlite`` store is
            read-only (``writable``), an ``http(s)`` store answers MLflow's first request with an error (:func:`refusal`),
            or the ``face-age`` experiment is deleted in the store.
        NoExperimentError: The store has no ``face-age`` experiment, and ``writable`` is False.
    """
    import mlflow

    uri = tracking_uri()
    check_reachable(uri, writable=writable)
    if display_uri(uri) != uri:  # MLflow prints "View run ... at: <the URI>" as each run ends, password and all
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    other_run = os.environ.pop("MLFLOW_RUN_ID", None)
    if other_run:
        # mlflow.start_run() without a run id continues the run this variable names (exported to inspect a run, or
        # set by `mlflow run`): train logged into that run, and each backbone of a sweep into the same one. Train
        # resumes its own run by id (its training state), so the variable has no use here.
        log.warning("MLFLOW_RUN_ID=%s ignored: train starts (or resumes, by its training state) its own MLflow run",
                    other_run)
    # As exported: set_experiment below writes the variable _ID itself (for the processes MLflow starts), so one that
    # names the active experiment was written by an earlier set_experiment of this process (maybe another store's)
    exported = {name: os.environ.get(name) for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    if exported["MLFLOW_EXPERIMENT_ID"] == getattr(mlflow.tracking.fluent, "_active_experiment_id", None):
        exported["MLFLOW_EXPERIMENT_ID"] = None
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    with locked(db, f"opening the MLflow store {db}") if db is not None else nullcontext():
        experiment = _first_request(mlflow, uri)
        if experiment is None and not writable:  # set_experiment would create it: a write
            raise NoExperimentError(f"the MLflow store {display_uri(uri)} holds no face-age runs (it has no "
                                    f"experiment {EXPERIMENT!r})")
        if experiment is None and db is not None:
            # Keep artifacts beside the database, not wherever the first run happened to start.
            mlflow.create_experiment(EXPERIMENT, artifact_location=(db.parent / "mlruns").as_uri())
        _refuse_deleted(experiment, uri)
        mlflow.set_experiment(EXPERIMENT)
    _warn_other_experiment(exported, mlflow.get_experiment_by_name(EXPERIMENT).experiment_id if experiment is None
                           else experiment.experiment_id)
    return mlflow


def _warn_other_experiment(exported: dict[str, str | None], experiment_id: str) -> None:
    """A warning for each of ``MLFLOW_EXPERIMENT_NAME`` / ``MLFLOW_EXPERIMENT_ID`` (``exported``: their values before
    :func:`setup_mlflow`) that names another experiment than ``face-age`` (id ``experiment_id``). Exported to keep
    one's runs apart on a shared server, it was dropped without a word (:func:`setup_mlflow` sets ``face-age``, where
    evaluate, the sweep and packaging read the runs), and the runs were looked for in the wrong experiment of
    ``mlflow ui``."""
    for name, ours in (("MLFLOW_EXPERIMENT_NAME", EXPERIMENT), ("MLFLOW_EXPERIMENT_ID", experiment_id)):
        value = exported.get(name)
        if value and value != ours:
            log.warning("%s=%s ignored: this project's runs go to the MLflow experiment %r (id %s), where "
                        "evaluate, the sweep and packaging read them", name, value, EXPERIMENT, experiment_id)


def _first_request(mlflow, uri: str):
    """The ``face-age`` experiment (None where the store has none): MLflow's first request to the store.

    Raises:
        TrackingError: An ``http(s)`` store answers, but not as an MLflow tracking server does (:func:`refusal`).
    """
    from contextlib import ExitStack

    from mlflow.exceptions import MlflowException

    server = uri.startswith(("http://", "https://"))
    try:
        with ExitStack() as first:
            # A server up but failing (its database down: the UI's page answers 200, :func:`check_reachable`'s probe,
            # and every API request 500) had MLflow retry this request for about four minutes (seven retries with
            # back-off) before the stage's one line. The first request gets a few quick tries and the probe's read
            # timeout; later ones MLflow's own retries (a server that fails for a moment mid-training), and a user's
            # own settings are kept.
            for name, value in FIRST_REQUEST_ENV.items():
                if server and name not in os.environ:
                    first.enter_context(mlflow_env(name, value))
            return mlflow.get_experiment_by_name(EXPERIMENT)
    except MlflowException as e:
        if not server:
            raise
        if not _rate_limited(e):
            raise TrackingError(refusal(uri, e)) from e
    try:  # a rate limit: MLflow's own retries, made for limits that last minutes
        return mlflow.get_experiment_by_name(EXPERIMENT)
    except MlflowException as e:
        raise TrackingError(refusal(uri, e)) from e


# The HTTP status an MLflow server's JSON error code stands for, where MLflow's message drops it: it names the status
# of an error it retried until its tries ran out ("too many 500 error responses", MLflow 3.17) or not at all (3.18
# returns the last answer, read as a RestException "INTERNAL_ERROR: ...")
ERROR_CODE_STATUS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "ENDPOINT_NOT_FOUND": 404,
                     "REQUEST_LIMIT_EXCEEDED": 429, "INTERNAL_ERROR": 500, "TEMPORARILY_UNAVAILABLE": 503}


def _rate_limited(error) -> bool:
    """Whether MLflow's ``error`` is a rate limit (429) its tries ran out on, in MLflow 3.17's words or 3.18's."""
    json_body = getattr(error, "json", None)
    return ("too many 429 error responses" in error.message
            or (isinstance(json_body, dict) and json_body.get("error_code") == "REQUEST_LIMIT_EXCEEDED"))


def refusal(uri: str, error) -> str:
    """One line for an ``http(s)`` store whose answer to MLflow's API request is an error (``error``, MLflow's
    ``MlflowException``).

    :func:`check_reachable` counts any HTTP answer as a server there; something else on that port (macOS's AirPlay
    receiver answers 403 on port 5000, MLflow's default; a BentoML service or a wrong path answers 404) then failed
    the stage with MLflow's "API request to endpoint ... failed with error code 404 != 200" in a traceback. Another
    web service's JSON error (FastAPI's ``{"detail": "Not Found"}``, which MLflow reads as its own and reports without
    the status) or a page answered with 200 is named as not an MLflow tracking server too.
    """
    import re

    # "... error code 404 != 200", or a status MLflow retried until its tries ran out ("too many 500 error responses")
    found = re.search(r"failed with error code (\d+)|too many (\d+) error responses", error.message)
    status = int(found.group(1) or found.group(2)) if found else None
    # MLflow's message names the URL as given, password and all (up to the last "@" before the host, as MLflow reads
    # it: a password may hold one); a server's HTML body goes on one line, cut short
    said = re.sub(r"//[^/\s]+@", "//***@", " ".join(error.message.split()))
    said = said if len(said) <= 200 else said[:200] + "..."
    # A JSON error body is read by MLflow as its own (RestException), the status dropped: MLflow's server always names
    # an error_code, so a body without one (FastAPI's 404 {"detail": "Not Found"}) is another web service's; the
    # code of one that has it stands for its status. A 200 that is not JSON (a web app's page for every path) is not
    # MLflow's answer either.
    json_body = getattr(error, "json", None)
    foreign = ((isinstance(json_body, dict) and not json_body.get("error_code"))
               or "response body was not in a valid JSON format" in error.message)
    status = status or ERROR_CODE_STATUS.get(json_body.get("error_code") if isinstance(json_body, dict) else None)
    where = (f"the MLflow tracking server {display_uri(uri)} (MLFLOW_TRACKING_URI) "
             + (f"answers {status} to MLflow's API ({said})" if status else
                f"answers MLflow's API, but not as MLflow does ({said})" if foreign else
                f"fails MLflow's first request ({said})"))
    fix = "correct the URL (its port and path), or unset MLFLOW_TRACKING_URI to log to the repo's mlflow.db"
    if status in (401, 403):
        return (f"{where}: it wants credentials this client did not give (MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN), or it is not an MLflow tracking server (on "
                f"macOS the AirPlay receiver answers 403 on port 5000: start MLflow on another port); set them, or {fix}")
    if status in (404, 405) or foreign:
        return f"{where}: it is not an MLflow tracking server, or not at this path; {fix}"
    if status in GATEWAY_DOWN:  # retried by MLflow until its tries ran out: not a moment's failure
        return f"{where}: the proxy there reaches no server behind it; start the server, {fix}"
    if status == 500:
        return f"{where}: the server is up but fails MLflow's requests (its database?); check the server's log, {fix}"
    return f"{where}; check the server's log, {fix}"


def _refuse_deleted(experiment, uri: str) -> None:
    """One line naming the fix where the ``face-age`` experiment is deleted (the MLflow UI's bin icon): MLflow's
    own "Cannot set a deleted experiment" ended every stage that logs in a traceback, without the id to restore.

    Raises:
        TrackingError: ``experiment`` is deleted.
    """
    if experiment is None or experiment.lifecycle_stage != "deleted":
        return
    exp_id = experiment.experiment_id
    raise TrackingError(f"the MLflow experiment {EXPERIMENT!r} (id {exp_id}) is deleted in {display_uri(uri)}, its runs "
                        f"with it: restore it (mlflow experiments restore --experiment-id {exp_id}), or delete it for "
                        f"good ({gc_command(uri, exp_id)}) and run again")


def gc_command(uri: str, experiment_id: str) -> str:
    """The ``mlflow gc`` command that deletes the deleted experiment ``experiment_id`` of the store ``uri`` for good.

    MLflow 3's ``gc`` refuses to run without a tracking URI ("Tracking URL is not set") and reads the database
    it is given as ``--backend-store-uri`` (default ``./mlflow.db``): ``mlflow gc --experiment-ids N`` alone
    failed with the repo's default store. A server's database is the one it was started with.
    """
    import shlex

    if uri.startswith(("http://", "https://")):
        return (f"on the server: mlflow gc --backend-store-uri <its --backend-store-uri> --tracking-uri "
                f"{display_uri(uri)} --experiment-ids {experiment_id}")
    store = shlex.quote(display_uri(uri))
    return f"mlflow gc --backend-store-uri {store} --tracking-uri {store} --experiment-ids {experiment_id}"


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit, or ``"unknown"`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_run_file(path: str | Path, run_id: str, experiment_id: str) -> None:
    """Records which MLflow run a ``train`` produced, for ``evaluate`` and packaging."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run_id, "experiment_id": experiment_id, "experiment": EXPERIMENT}
    # Whole or not at all (atomic.write_text): a train killed mid-write left a truncated run.json, and evaluate
    # then said "run the train stage first" of a run that had trained.
    write_text(path, json.dumps(info, indent=2) + "\n")


def read_run_file(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def check_run(run_file: str | Path) -> str:
    """The id of the run ``run_file`` (train's ``run.json``) names, once it is known that the run can be
    continued in :func:`tracking_uri`'s store.

    Before it, ``evaluate`` did all its work and then failed with MLflow's traceback where the run was
    not in the store (a fresh clone's ``mlflow.db`` after ``dvc pull``, or another ``MLFLOW_TRACKING_URI``)
    or had been deleted.

    Raises:
        TrackingError: ``run_file`` is missing or unreadable, the store does not answer, or the run is
            not in it or was deleted.
    """
    try:
        run_id = read_run_file(run_file)["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrackingError(f"cannot read the MLflow run from {run_file} ({type(e).__name__}: {e}): "
                            "run the train stage first") from e
    setup_mlflow()
    reason = lost_run(run_id)
    if reason is None:
        return run_id
    if reason.startswith("was deleted"):
        fix = f"restore it (mlflow runs restore --run-id {run_id}), or train again (dvc repro -f -s train, then dvc repro)"
    else:
        fix = (f"set MLFLOW_TRACKING_URI to the store train logged it in, or train again to log a new run in "
               f"{display_uri()} (dvc repro -f -s train, then dvc repro)")
    raise TrackingError(f"the MLflow run {run_id} of {run_file} {reason}: {fix}")


def lost_run(run_id: str) -> str | None:
    """Why an MLflow run of :func:`tracking_uri`'s store cannot be continued ("is not in the tracking store
    ...", "was deleted from the tracking store ..."), else None. Other MLflow errors (a store that does not
    answer) are raised."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return f"is not in the tracking store {display_uri()}"
    if run.info.lifecycle_stage == "deleted":
        return f"was deleted from the tracking store {display_uri()}"
    return None
