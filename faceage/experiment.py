"""A named profile run as a DVC experiment on top of the committed ``params.yaml``.

``dvc exp run -S key=value`` writes its overrides into the workspace's ``params.yaml`` and leaves
them there, so the next ``dvc exp run -S ...`` starts from them: ``make quick-finetune`` (12
epochs, lr 0.003, ...) followed by ``make quick`` ran the fine-tuning recipe again, and the sweep
trained every backbone after the first CNN with the CNN profile's ``pretrained=none, image_size=64``.
A profile is meant as *the committed params plus its overrides*: :func:`run_profile` adds a
``-S`` putting back the committed value of every key the workspace changed and the profile does
not set (``~key`` for one an earlier ``-S +key=...`` added, ``++key=...`` for one ``-S ~key`` removed; put
before the profile's own where it sets a part of the key, ``evaluate.low_res.0=...``), names each in the log,
checks the params the run would have as every stage reads them (a mistyped key or a refused value stops it there,
with ``params.yaml`` untouched), and runs ``dvc exp run``.

Usage (the Makefile's profiles and :mod:`faceage.sweep`), from anywhere in the repo, as ``dvc exp run``::

    python -m faceage.experiment -S train.backbone=dlib_age -S fetch_data.source=/abs/sample [-n NAME [-f]]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import yaml

from faceage.config import (ConfigError, MissingKeyError, Params, did_you_mean, params_from_dict, parse_params,
                            yaml_where)
from faceage.errors import FaceAgeError, error_line
from faceage.logs import Terminated, die_of_signal, raise_on_sigterm, setup_logging

log = logging.getLogger("faceage.experiment")  # also when run as __main__ (python -m)

PARAMS = "params.yaml"
CTRL_C_STATUS = 128 + signal.SIGINT  # main's status after Ctrl-C, which end_like_a_shell turns into the signal


class ProfileError(FaceAgeError):
    """An override DVC cannot read, no DVC repo around the working folder, or its ``params.yaml`` is
    missing or unreadable."""


def dvc_root(start: str | Path | None = None) -> Path:
    """The DVC repo around ``start`` (default: the working folder): the nearest folder upwards
    holding ``.dvc/``, the one ``dvc exp run`` itself finds from a subdirectory.

    Raises:
        ProfileError: No folder from ``start`` up to ``/`` holds ``.dvc/``.
    """
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise ProfileError(f"not inside a DVC repository: no .dvc/ folder in {here} or above (run from the FaceAge repo)")


def read_params(root: str | Path) -> dict[str, Any]:
    """The workspace's ``params.yaml`` at ``root`` as a raw mapping (sections of keys).

    Raises:
        ProfileError: The file is missing, is not YAML, or is not a mapping.
    """
    path = Path(root) / PARAMS
    try:
        raw = parse_params(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{path} not found: run from the repo, or restore it (git checkout {PARAMS})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = yaml_where(e) if isinstance(e, yaml.YAMLError) else ""
        raise ProfileError(f"{path} is not valid YAML{where}: fix it, or restore it (git checkout {PARAMS})") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def flatten(params: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (the keys ``-S`` names)."""
    return {f"{section}.{key}": value for section, keys in params.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def _quoted(text: str) -> str:
    """``text`` as a Hydra quoted string that DVC's ``apply_overrides`` reads back unchanged.

    Two layers read it. Hydra's override grammar: inside double quotes only backslashes that
    precede a quote, or the closing quote, are escapes (``C:\\data`` stays as it is; JSON's
    ``\\uXXXX`` and doubled backslashes would be kept literally). Then OmegaConf, which resolves
    ``${...}`` interpolations in the value: ``\\${`` is a literal ``${``, and backslashes before
    it are doubled.
    """
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return '"' + re.sub(r'(\\*)("|\Z)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), text) + '"'


def override_value(value: Any) -> str:
    """``value`` written for ``-S key=...`` (DVC parses it with Hydra's override grammar): strings
    quoted (:func:`_quoted`), so a URL or a path (spaces, commas, brackets, ``=``, non-ASCII,
    backslashes) is never read as anything else."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    return _quoted(str(value))


def committed_params(root: str | Path = ".") -> dict[str, Any] | None:
    """``params.yaml`` as the last commit holds it; None outside git or before the first commit.

    Raises:
        ProfileError: The committed file is not YAML (a key twice, as a merge that kept both sides leaves it; a tab)
            or not a mapping of sections: the profiles run on top of it, so it must be committed fixed. Its
            workspace copy already fixed, the runner and the recipe died with PyYAML's traceback.
    """
    done = subprocess.run(["git", "show", f"HEAD:./{PARAMS}"], cwd=root, capture_output=True)
    if done.returncode != 0:
        return None
    fix = f"fix it and commit it (git commit {PARAMS}): profiles run on top of the committed file"
    try:
        raw = parse_params(done.stdout.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"{PARAMS} as committed (git show HEAD:{PARAMS}) is not valid UTF-8 (byte offset "
                           f"{e.start}): {fix}") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{PARAMS} as committed (git show HEAD:{PARAMS}) is not valid YAML{yaml_where(e)}: "
                           f"{fix}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ProfileError(f"{PARAMS} as committed (git show HEAD:{PARAMS}) must be a mapping of sections, got "
                           f"{type(raw).__name__}: {fix}")
    return raw


def override_text(override: str) -> str:
    """One ``-S`` override without the file name DVC reads before it (``params.yaml:train.lr=1`` ->
    ``train.lr=1``): a ``:`` before the first ``=`` names the file (``dvc.utils.cli_parse.to_path_overrides``)."""
    return override.partition(":")[2] if ":" in override.partition("=")[0] else override


def override_key(override: str, root: str | Path | None = None) -> str | None:
    """The ``params.yaml`` key that one ``-S`` override names, or None when it is another file's.

    DVC reads ``-S [<filename>:]<key>=<value>`` (a ``:`` before the first ``=`` names the file,
    ``dvc.utils.cli_parse.to_path_overrides``), and Hydra's grammar adds ``+key=``, ``++key=`` and
    ``~key``: ``params.yaml:train.epochs=5`` and ``++train.epochs=5`` both set ``train.epochs``.

    Args:
        override: One ``-S`` override.
        root: The repo root, where ``dvc exp run`` runs and opens the file named: any path to its ``params.yaml``
            (``/abs/repo/params.yaml:``) names it. None: ``params.yaml`` spelt relative (``./params.yaml``).
    """
    if ":" in override.partition("=")[0] and not _names_params(override.partition(":")[0], root):
        return None
    return override_text(override).partition("=")[0].strip().lstrip("+~").strip()


def _names_params(path: str, root: str | Path | None) -> bool:
    """Whether ``path``, an ``-S`` file prefix, is ``params.yaml`` at ``root`` as DVC opens it there (relative to
    ``root``). ``/abs/repo/params.yaml:train.epochs=5`` was taken for another file's key: the reset of a drifted
    ``train.epochs`` then came after it and won, and its value went unchecked."""
    if root is None:
        return os.path.normpath(path) == PARAMS
    return Path(root, path).resolve() == Path(root, PARAMS).resolve()


def _list_items(text: str) -> list[str]:
    """The elements of a list typed inside ``[...]``: a comma inside quotes (``'/a,b'``) or inner
    brackets does not split one."""
    items, start, quote, depth = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            if c == quote and text[i - 1] != "\\":
                quote = ""
        elif c in "\"'" and not text[start:i].strip():  # a quote opens only at an item's start (not /a/it's)
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def quoted_value(text: str) -> str:
    """An override's value as typed, with each string quoted for Hydra (:func:`_quoted`): a list's
    elements one by one (``[/a, /José]`` -> ``["/a","/José"]``), so it stays a list; an element the
    user quoted (``['/a,b', /José]``) is kept as typed."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return "[" + ",".join(quoted_value(item) for item in _list_items(text[1:-1])) + "]"
    return text if text[:1] in "\"'" else _quoted(text)


def check_overrides(overrides: list[str]) -> None:
    """Each ``-S`` override parses with the grammar DVC reads it with (Hydra's), before any work.

    An unquoted value with a non-ASCII letter, ``#``, ``~`` or brackets (``/home/José/sample``)
    is refused by ``dvc exp run`` with only "Invalid --set-param value", and one with a comma outside
    brackets (``/data/a,b/sample``) is a sweep, which it refuses without ``--queue``; here the message
    names it and shows the quoted form.

    Raises:
        ProfileError: An override DVC would refuse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        text = override_text(override)
        key, eq, value = text.partition("=")
        suggestion = shlex.quote(f"{key}={quoted_value(value)}")
        try:
            [parsed] = parser.parse_overrides([text])
        except OverrideParseException:
            raise ProfileError(f"-S {override!r} is not an override DVC can read " + (
                f"(Hydra's grammar: a value with a non-ASCII letter or one of # = ~ [ ] {{ }} ( ) ! & ; ^ < > ' \" ` "
                f"needs quotes): quote the value, as in -S {suggestion}" if eq else "(KEY=VALUE, or ~KEY)")) from None
        if parsed.is_sweep_override():
            raise ProfileError(f"-S {override!r} is a sweep to DVC (a comma outside brackets, or choice/range/glob: "
                               f"several experiments), which `dvc exp run` takes only with --queue; a list goes in "
                               f"brackets ({key}=[a, b]), and one value with a comma in quotes, as in -S {suggestion}")


def _same(a: Any, b: Any) -> bool:
    """``a == b`` with the same types all the way down: ``30.0 == 30`` and ``1 == True`` in Python, but
    ``train.epochs: 30.0`` or ``train.amp: 1`` (left by a failed ``dvc exp run -S``) stop every stage."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def drifted(workspace: dict[str, Any], committed: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (workspace value, committed value)}`` for each key the workspace changed (an earlier
    ``dvc exp run -S``, or an edit), in value or in type."""
    now, base = flatten(workspace), flatten(committed)
    return {key: (now[key], value) for key, value in base.items() if key in now and not _same(now[key], value)}


def leftover_resets(overrides: list[str], workspace: dict[str, Any], committed: dict[str, Any], *,
                    root: str | Path | None = None) -> list[str]:
    """The overrides that put back the committed ``params.yaml`` wherever the workspace's differs from it (an
    earlier ``dvc exp run -S``, or an edit) and ``overrides`` does not set the key: ``key=value`` for a changed
    value, ``++key=value`` for a committed key the workspace lacks (left by ``-S ~key``), ``~key`` for a key or
    section the workspace added (left by ``-S +key=...``, DVC's own advice for a key it does not know: every
    stage then stopped on ``Unknown config key``, and so did every later profile). ``root``: see
    :func:`override_key`."""
    chosen = {override_key(o, root) for o in overrides}

    def named(key: str) -> bool:  # set by the profile: the key, a key of it (a section), or its section
        return any(c and (c == key or c.startswith(key + ".") or key.startswith(c + ".")) for c in chosen)
    # (a key the profile sets a part of is put back before it instead: :func:`resets_under`)

    now, base = flatten(workspace), flatten(committed)
    resets = _restores(workspace, committed, lambda key: not named(key))
    resets += [f"~{key}" for key in now if key not in base and key.partition(".")[0] in committed
               and not named(key)]
    resets += [f"~{section}" for section in workspace if section not in committed and not named(section)]
    return resets


def resets_under(overrides: list[str], workspace: dict[str, Any], committed: dict[str, Any], *,
                 root: str | Path | None = None) -> list[str]:
    """The overrides that put back, *before* ``overrides``, the committed value of each key or section the workspace
    changed (or lacks) of which ``overrides`` sets only a part: ``evaluate.low_res=[0.75,0.5]`` under
    ``evaluate.low_res.0=0.6``. :func:`leftover_resets` leaves such a key alone (the profile sets it), so the item
    landed on the list an earlier ``dvc exp run -S`` left: ``[0.6, 0.8, 0.7]`` without a word, or refused ("has 0
    items", "no key") where the committed list has it. A key or section the workspace added is not put back here:
    the profile's part of it is refused as unknown either way. ``root``: see :func:`override_key`."""
    chosen = {k for k in (override_key(o, root) for o in overrides) if k}

    def under(key: str) -> bool:  # the profile sets a part of it, and neither it nor its section whole
        return (any(c.startswith(key + ".") for c in chosen)
                and not any(c == key or key.startswith(c + ".") for c in chosen))

    return _restores(workspace, committed, under)


def _restores(workspace: dict[str, Any], committed: dict[str, Any], picked: Callable[[str], bool]) -> list[str]:
    """The overrides that put back the committed value of each key (or section) ``picked`` takes among those the
    workspace changed or lacks: ``key=value`` for a changed value, ``++key=value`` for a committed key or section the
    workspace lacks (left by ``-S ~key``). :func:`leftover_resets` and :func:`resets_under` pick differently."""
    now, base = flatten(workspace), flatten(committed)
    resets = [f"{key}={override_value(base[key])}" for key in drifted(workspace, committed) if picked(key)]
    resets += [f"++{key}={override_value(value)}" for key, value in base.items()
               if key not in now and key.partition(".")[0] in workspace and picked(key)]
    resets += [f"++{section}={override_value(keys)}" for section, keys in committed.items()
               if section not in workspace and picked(section)]
    return resets


def committed_base(root: str | Path = ".", *, user: str) -> Params:
    """The committed ``params.yaml`` at ``root``, validated, for a tool that runs outside ``dvc exp run``
    (:mod:`faceage.recipe`): the workspace's holds what the last ``dvc exp run -S`` left there.

    Args:
        root: The repo root.
        user: Who runs with it, for the warnings (``"the recipe"``).

    Returns:
        The committed params (the workspace's outside git or before the first commit, with a
        warning); a warning names each key whose workspace value differs.

    Raises:
        ProfileError: ``params.yaml`` is missing or unreadable.
        faceage.config.ConfigError: A key is unknown, missing or out of range.
    """
    workspace = read_params(root)
    committed = committed_params(root)
    if committed is None:
        log.warning("%s has no committed version: %s runs with the workspace's", PARAMS, user)
        return params_from_dict(workspace)
    for key, (now, base) in drifted(workspace, committed).items():
        log.warning("%s: %s is %r in the workspace (left by an earlier `dvc exp run -S`, or edited); %s runs "
                    "with the committed %r (commit params.yaml to make a value the base)", PARAMS, key, now, user, base)
    return params_from_dict(committed)


def run_profile(overrides: list[str], *, name: str | None = None, root: str | Path | None = None,
                force: bool = False) -> None:
    """Runs ``dvc exp run`` with ``overrides`` on top of the committed ``params.yaml``.

    Args:
        overrides: ``key=value`` strings, as given to ``dvc exp run -S``.
        name: The experiment's name (``-n``), or None for DVC's.
        force: Replace an experiment of that name (``-f``: DVC's advice when ``name`` is taken).
        root: The repo root (where ``params.yaml`` is); None: the DVC repo around the working
            folder (:func:`dvc_root`), as ``dvc exp run`` finds it.

    Raises:
        ProfileError: An override DVC cannot read, no DVC repo here, or ``params.yaml`` is missing or unreadable;
            or the params the run would have are refused (a key ``params.yaml`` lacks, a value a stage refuses:
            :func:`check_result`), before ``dvc exp run`` starts, so ``params.yaml`` is left as it was.
        subprocess.CalledProcessError: ``dvc exp run`` failed (its output is shown).
        ProfileError: Also where ``dvc`` is not found.
        ProfileInterrupted: Ctrl-C (a ``KeyboardInterrupt``) or SIGTERM: before ``dvc exp run`` started, or once
            it (which got Ctrl-C too: from the terminal, or sent here for SIGTERM) has stopped and cleaned up; it
            says which.
    """
    started = [False]  # whether `dvc exp run` was (or was being) started: what a Ctrl-C stopped
    # SIGTERM (kill, timeout, a cancelled CI job) stops the profile as Ctrl-C does: killed outright, the runner left
    # `dvc exp run` and its stage running with nobody waiting for them (then their refs and locks).
    previous_term = _raise_on_sigterm()
    try:
        _run_profile(overrides, name=name, root=root, force=force, started=started)
    except ProfileInterrupted:
        raise
    except KeyboardInterrupt as e:  # before `dvc exp run` (the overrides check, git), or as the runner returned
        raise ProfileInterrupted(dvc_started=started[0],
                                 signum=signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT) from None
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _raise_on_sigterm() -> Any:
    """From now on SIGTERM raises :class:`faceage.logs.Terminated` here (:func:`faceage.logs.raise_on_sigterm`),
    where it had its default action in the main thread; returns the handler to put back, or None where nothing
    changed."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return None
    return raise_on_sigterm()


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_profile`, with what it stopped.

    Attributes:
        dvc_started: Whether ``dvc exp run`` had been started (it has stopped and cleaned up since).
        params_changed: Whether ``params.yaml`` differs from before the run (``dvc exp run`` wrote its ``-S``
            values there); False when ``dvc exp run`` never started.
        signum: ``signal.SIGINT`` (Ctrl-C) or ``signal.SIGTERM``: what stopped it.
        dvc_code: ``dvc exp run``'s exit code, where it had started; 0: it did not stop for the signal and ran to
            its end (a SIGINT sent to the runner alone, ``kill -INT``, never reaches it).
    """

    def __init__(self, dvc_started: bool, params_changed: bool = False, signum: int = signal.SIGINT,
                 dvc_code: int | None = None):
        super().__init__()
        self.dvc_started, self.params_changed, self.signum = dvc_started, params_changed, signum
        self.dvc_code = dvc_code

    @property
    def how(self) -> str:
        """``"stopped by SIGTERM"`` or ``"interrupted (Ctrl-C)"``."""
        return "stopped by SIGTERM" if self.signum == signal.SIGTERM else "interrupted (Ctrl-C)"

    def describe(self) -> str:
        """One line: what stopped the profile, and what it leaves (``params.yaml``)."""
        how = self.how
        if not self.dvc_started:
            return f"{how} before `dvc exp run` started: nothing ran, params.yaml is unchanged"
        if self.dvc_code == 0:  # "has stopped" had the user rerun an experiment that was complete
            return (f"{how}; the `dvc exp run` it had started did not get the signal and ran to its end (exit 0): "
                    "its experiment is complete and applied to the workspace")
        if self.params_changed:
            return (f"{how}; the `dvc exp run` it had started has stopped, and params.yaml keeps its -S values (the "
                    "next profile run puts back the committed ones)")
        return f"{how}; the `dvc exp run` it had started has stopped, and params.yaml is unchanged"


def _run_profile(overrides: list[str], *, name: str | None, root: str | Path | None, force: bool,
                 started: list[bool]) -> None:
    check_overrides(overrides)
    root = dvc_root() if root is None else Path(root)
    workspace = read_params(root)
    committed = committed_params(root)
    resets = leftover_resets(overrides, workspace, committed, root=root) if committed is not None else []
    first = resets_under(overrides, workspace, committed, root=root) if committed is not None else []
    if committed is None:
        log.warning("%s has no committed version: the profile runs on top of the workspace's", PARAMS)
    now = {**workspace, **flatten(workspace)}
    for reset in first:
        key, _, value = reset.lstrip("+").partition("=")
        log.warning("%s: %s is %s in the workspace (left by an earlier `dvc exp run -S`, or edited); this profile "
                    "sets its part of it on the committed %s (commit params.yaml to make a value the base)",
                    PARAMS, key, repr(now[key]) if key in now else "missing", value)
    for reset in resets:
        key, _, value = reset.lstrip("+~").partition("=")
        if reset.startswith("~"):
            log.warning("%s: %s is %r in the workspace (left by an earlier `dvc exp run -S +...`, or edited) and "
                        "not in the committed file; this profile runs without it", PARAMS, key, now[key])
        else:
            log.warning("%s: %s is %s in the workspace (left by an earlier `dvc exp run -S`, or edited); this "
                        "profile runs with the committed %s (commit params.yaml to make a value the base)",
                        PARAMS, key, repr(now[key]) if key in now else "missing", value)
    # DVC applies a file's overrides in order (after grouping them by file name, in the order each name first comes):
    # the resets under the profile's parts first, bare (params.yaml's group), so that those parts land on them
    check_result(root, [*first, *overrides, *resets], typed=overrides)
    cmd = ["dvc", "exp", "run", *(["-f"] if force else []), *(["-n", name] if name else []),
           *[arg for o in [*first, *overrides, *resets] for arg in ("-S", o)]]
    log.info("%s", shlex.join(cmd))  # as a shell reads it back: a path with a space, the resets' quotes
    before = file_bytes(root / PARAMS)
    code, stopped_by = _run_dvc(cmd, root, started)
    if stopped_by:
        raise ProfileInterrupted(dvc_started=started[0], params_changed=file_bytes(root / PARAMS) != before,
                                 signum=stopped_by, dvc_code=code if started[0] else None)
    if code != 0:
        raise subprocess.CalledProcessError(code, cmd)


def check_result(root: Path, overrides: list[str], typed: list[str] | None = None) -> None:
    """The params ``dvc exp run -S`` would run with, validated before it starts: ``overrides`` applied to a copy
    of ``params.yaml`` with DVC's own function, in order, as DVC applies them, then read as every stage reads it.

    Started with a value the stages refuse (``train.epochs=abc``, ``train.batch_size=0``), ``dvc exp run`` wrote it
    into ``params.yaml``, took DVC's lock and failed in ``check_sources``, leaving the file modified; with a key
    ``params.yaml`` lacks (``train.learning_rate``) it said only "Invalid `--set-param` value". Whatever DVC applies
    passes here, nested keys too (``evaluate.external.0=...``: Hydra's dotted keys, a mapping's key or a list's
    index); one it refuses is named with the key meant (:func:`_unreachable`).

    Args:
        root: The repo root.
        overrides: Every override, in order: the user's, then the runner's resets (:func:`leftover_resets`).
        typed: The user's alone (default: all), so a key a reset removes is not blamed on a ``-S`` nobody typed.

    Raises:
        ProfileError: The overrides cannot be applied, or give params a stage would refuse; the message names the key.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    unchanged = "nothing ran, params.yaml is unchanged"
    with tempfile.TemporaryDirectory(prefix="faceage-params-") as tmp:
        copy = Path(tmp) / PARAMS
        shutil.copyfile(Path(root) / PARAMS, copy)
        for override in overrides:
            if override_key(override, root) is None:  # another file's: DVC applies it there
                continue
            text = override_text(override)
            try:  # one at a time, on what the earlier ones left: the one refused is the one named
                apply_overrides(copy, [text])
            except (InvalidArgumentError, ValueError) as e:  # ValueError: OmegaConf's int() of a list index (`.x`)
                why = _unreachable(parse_params(copy.read_text(encoding="utf-8")), text)
                if why:
                    raise ProfileError(f"-S {override}: {why}; {unchanged}") from None
                cause = e.__cause__ or e
                raise ProfileError(f"DVC cannot apply -S {override} to params.yaml "
                                   f"({' '.join(str(cause).split())}); {unchanged}") from None
        try:
            params_from_dict(parse_params(copy.read_text(encoding="utf-8")))
        except MissingKeyError as e:  # the file has it, where a `-S ~key` removed it: not an older params.yaml
            # the Hydra part: `-S params.yaml:~train.lr` removes train.lr too (DVC drops the file's name)
            removals = [o for o in overrides if override_text(o).strip().startswith("~")
                        and override_key(o, root) in (e.key, e.key.partition(".")[0])]
            removal = next((o for o in removals if typed is None or o in typed), None)
            if removal is None and removals:  # the runner's reset: the workspace has it, the commit does not
                raise ProfileError(f"Missing config key: {e.key} in the committed params.yaml, which profiles run on "
                                   f"(the workspace's has it): commit params.yaml; {unchanged}") from None
            if removal is None:
                raise ProfileError(f"{e}; {unchanged}") from None
            what = (f"{e.key}, which the stages read ({e.accepts}): drop it, or set a value (-S {e.key}=...)"
                    if "." in e.key else f"the {e.key} section, which the stages read: drop it")
            raise ProfileError(f"-S {removal} removes {what}; {unchanged}") from None
        except ConfigError as e:
            raise ProfileError(f"{e}; {unchanged}") from None


def _unreachable(params: dict[str, Any], override: str) -> str | None:
    """Why DVC cannot set or delete the key ``override`` names (``key=value`` or ``~key``; Hydra's dotted key: a
    mapping's string key, or a list's index from 0) in ``params``: a key missing on the way (with the key meant:
    :func:`faceage.config.did_you_mean`), an index past a list's end, a key below a plain value; None where the key
    is there (or ``+key=``/``++key=``, which add it), or ``override`` does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        [parsed] = OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return None
    if parsed.is_add() or parsed.is_force_add() or parsed.package is not None:
        return None
    key = parsed.key_or_group
    node: Any = params
    parts = key.split(".")
    for i, part in enumerate(parts):
        where, rest = ".".join(parts[:i]), "".join(f".{p}" for p in parts[i + 1:])
        if isinstance(node, dict):
            if part not in node:
                meant = did_you_mean(part, node, f"{where}." if where else "").replace("?)", f"{rest}?)")
                return f"params.yaml has no key {key}{meant}"
            node = node[part]
        elif isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                return (f"params.yaml's {where} has {len(node)} item{'' if len(node) == 1 else 's'}, numbered from "
                        f"0: no item {part}")
            node = node[int(part)]
        else:
            return f"params.yaml's {where} is a value ({node!r}), not a section: it has no key {part}"
    return None


def file_bytes(path: Path) -> bytes | None:
    """``path``'s bytes, or None where it cannot be read (missing)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _run_dvc(cmd: list[str], root: Path, started: list[bool]) -> tuple[int, int | None]:
    """Runs ``cmd`` (``dvc exp run``) at ``root`` to its end; returns its exit code and the signal that stopped
    the profile (``signal.SIGINT``: Ctrl-C, ``signal.SIGTERM``), or None.

    Ctrl-C reaches dvc too (the terminal signals the whole foreground group): it lets its stage stop, then
    removes its experiment refs and locks. So from just before dvc starts until it has exited, Ctrl-C is only
    recorded here, never raised: raised, one landing as ``Popen`` returned (Python raises it at the next
    bytecode) left the child unwaited for, and ``subprocess.run`` killed it 0.25 s later, which left its refs
    and locks, and the stage still running after the prompt came back. One recorded before the start starts
    nothing (``started`` stays False).

    SIGTERM reaches this process alone: each one is passed on as a Ctrl-C to dvc and every process under it
    (:func:`_interrupt_tree`), and the runner waits as for Ctrl-C. Passed on as SIGTERM it killed dvc outright
    (DVC has no handler for it), which left its locks and its stage running.
    """
    stops: list[int] = []
    dvc: list[subprocess.Popen] = []
    forwarded = [0]  # SIGTERMs passed on to dvc so far

    def forward() -> None:
        while dvc and forwarded[0] < stops.count(signal.SIGTERM):
            forwarded[0] += 1
            _interrupt_tree(dvc[0])

    def on_signal(signum: int, frame: Any) -> None:
        if not stops and started[0]:
            log.warning("%s: waiting for `dvc exp run` to stop its stage and clean up",
                        "SIGTERM, passed on to it as Ctrl-C" if signum == signal.SIGTERM else "interrupted")
        stops.append(signum)
        forward()

    def stopped_by() -> int | None:
        return signal.SIGTERM if signal.SIGTERM in stops else signal.SIGINT if stops else None

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if stops:  # between the runner's last step and here
            return 128 + stops[0], stopped_by()
        started[0] = True
        try:
            with subprocess.Popen(cmd, cwd=root, env=tool_env()) as process:
                dvc.append(process)
                forward()  # a SIGTERM that came as it started
                return process.wait(), stopped_by()
        except FileNotFoundError:  # no dvc on PATH, nor beside this Python
            started[0] = False
            raise ProfileError(f"`{cmd[0]}` not found on PATH nor in {Path(sys.executable).parent}: install the "
                               "project's environment (make setup), or activate it") from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _interrupt_tree(process: subprocess.Popen) -> None:
    """Sends SIGINT to ``process`` and every process under it: what a terminal's Ctrl-C sends its foreground group.

    ``dvc exp run`` ignores SIGINT while a stage runs (``dvc.stage.run``) and relies on the stage getting it too; the
    stage stops and cleans up (``faceage.logs.run_stage``), then DVC removes its refs and locks. Processes are found
    with psutil (a DVC dependency); without it only dvc gets the signal.
    """
    if process.returncode is not None:
        return
    pids = []
    try:
        import psutil

        pids = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    except ImportError:
        log.warning("psutil is not installed: SIGINT goes to `dvc exp run` alone, and a stage it runs goes on")
    except Exception as e:  # psutil.NoSuchProcess: dvc has just ended
        log.debug("listing the processes under dvc failed: %s", e)
    for pid in [*pids, process.pid]:
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:  # ended meanwhile
            pass


def tool_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default this process's environment) with this Python's folder on ``PATH``, first where it was
    not there: ``dvc``, and the ``python`` its stages run, are then this environment's
    (``.venv/bin/python -m faceage.experiment`` without an activated venv found no ``dvc``, or another
    installation's). Where it is on ``PATH`` already (an activated venv, ``make``), the order is the user's."""
    env = dict(os.environ if env is None else env)
    here, path = str(Path(sys.executable).parent), [p for p in env.get("PATH", "").split(os.pathsep) if p]
    if here not in path:
        env["PATH"] = os.pathsep.join([here, *path])
    return env


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9: the name a log line gives a signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param override, as for dvc exp run -S (repeatable)")
    parser.add_argument("-n", "--name", help="the experiment's name")
    parser.add_argument("-f", "--force", action="store_true",
                        help="replace an experiment of that name, as dvc exp run -f (DVC's advice when it is taken)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run_profile(args.overrides, name=args.name, force=args.force)
    except ProfileError as e:
        log.error("%s", error_line(e, with_type=False))  # one line, as a stage's
        return 1
    except subprocess.CalledProcessError as e:
        if e.returncode < 0:  # killed by a signal (Popen's -N): exit 128 + N as a shell does (-9 exited 247)
            log.error("`dvc exp run` was killed by signal %d (%s)", -e.returncode, signal_name(-e.returncode))
            return 128 - e.returncode
        log.error("`dvc exp run` failed (exit %s): its output is above", e.returncode)
        return e.returncode or 1
    except ProfileInterrupted as e:
        if e.signum == signal.SIGTERM:  # ends by the signal, as a stage stopped by it (faceage.logs.run_stage)
            die_of_signal(signal.SIGTERM, e.describe())
        log.error("%s", e.describe())
        return CTRL_C_STATUS
    except KeyboardInterrupt:  # before the profile's run began (the arguments, the logging set-up)
        log.error("interrupted (Ctrl-C) before `dvc exp run` started: nothing ran, params.yaml is unchanged")
        return CTRL_C_STATUS
    return 0


def end_like_a_shell(status: int) -> None:
    """Ends a command-line tool with ``status``; :data:`CTRL_C_STATUS` (its Ctrl-C) by SIGINT itself, as a stage
    stopped by Ctrl-C ends (:func:`faceage.logs.die_of_signal`). The tool's ``main`` returns 130, for a caller in
    the same process (a test, :mod:`faceage.sweep`); a process that exited 130 let a shell's loop of profiles go on
    to the next one (bash's "wait and cooperative exit" takes the child to have handled Ctrl-C itself)."""
    if status == CTRL_C_STATUS:
        die_of_signal(signal.SIGINT)
    raise SystemExit(status)


if __name__ == "__main__":
    end_like_a_shell(main())
