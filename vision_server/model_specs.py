"""Which models a server serves: the ``--model [NAME=]SOURCE[+ADAPTER]`` grammar and its typed view.

One ``--model`` value (a *spec*)::

    SPEC   := [NAME "="] SOURCE ["+" ADAPTER]
    NAME   := [A-Za-z0-9][A-Za-z0-9._-]*

- ``NAME=`` is read when the text before the first ``=`` holds no ``/``, ``\\`` or ``:``; it must
  then be a NAME. So ``./a=b``, ``C:\\models\\a=b`` and ``test:tiny`` are sources, never names.
- Without ``NAME=`` a model is named after its SOURCE text, exactly as the single model always was,
  except a local directory: it is named after its folder (``/srv/models/florence`` serves as
  ``florence``), so clients never see the server's paths; as few more folders as tell two apart
  (``a/final``, ``b/final``). Its path still picks it (requests, ``NAME:VALUE``, ``--default-model``).
- ``+ADAPTER`` (a local PEFT adapter directory): when the whole text after ``NAME=`` is an existing
  path it is the source, ``+`` and all. Otherwise it is split at a ``+`` whose right-hand side is an
  existing path, the rightmost such one; when there is none, at the last ``+`` (hub ids and
  ``test:`` sources never hold a ``+``, so only local paths need this rule).

``--idle-timeout``, ``--revision`` and ``--backend`` values are ``VALUE`` (the server-wide value) or
``NAME:VALUE`` (one model's own; split at the last ``:``, so names that hold a colon, such as
``test:tiny``, work). The values themselves never hold a colon: seconds, backend names, and git
revisions (branches, tags, commits and ``refs/pr/N`` cannot contain one), so an entry with more
colons than its model's name is refused, saying which value it would have given.

Everything here raises :class:`ValueError` with a message meant for the user (an
:class:`EntryError` when one ``NAME:VALUE`` entry is at fault); the settings turn it into a
``SettingsError`` that says where the value was set.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_GRAMMAR = "letters, digits, '.', '_' and '-', starting with a letter or digit"
_NOT_A_NAME = re.compile(r"[/\\:]")
_DRIVE = re.compile(r"[A-Za-z]:[/\\]")
V = TypeVar("V")


class EntryError(ValueError):
    """One ``NAME:VALUE`` entry of ``setting`` is refused; ``name`` is its NAME as given, so the
    message can say which flag, variable or config file gave that entry (each may give some)."""

    def __init__(self, message: str, *, setting: str, name: str) -> None:
        super().__init__(message)
        self.setting = setting
        self.name = name


@dataclass(frozen=True)
class ModelSpec:
    """One served model as configured: the name requests pick it by, where its weights come from,
    an optional adapter on top, its own idle timeout (None: the server-wide one), and the hub
    revision and backend it loads with (the server-wide ones unless ``NAME:VALUE`` overrode them)."""

    name: str
    source: str
    adapter: str | None = None
    idle_timeout: float | None = None
    revision: str | None = None
    backend: str = "auto"
    named: bool = True  # False: no NAME= was given, the name comes from the source

    def describe(self) -> str:
        """``name (source + adapter)`` for logs; just the source when the name is the source."""
        shown = self.source if self.adapter is None else f"{self.source} + {self.adapter}"
        return shown if self.name == self.source else f"{self.name} ({shown})"


def parse_model_spec(text: str) -> ModelSpec:
    """One ``--model`` value as a :class:`ModelSpec` (without its idle timeout)."""
    text = text.strip()
    if not text:
        raise ValueError("model: an empty value names no model")
    name: str | None = None
    head, equals, rest = text.partition("=")
    if equals and not _NOT_A_NAME.search(head):
        if not NAME_PATTERN.fullmatch(head):
            raise ValueError(
                f"model {text!r}: {head!r} is not a model name (NAME=SOURCE; a name has {NAME_GRAMMAR})"
            )
        name, text = head, rest.strip()
        if not text:
            raise ValueError(f"model {name}=: give the model's source after '='")
    source, adapter = split_adapter(text)
    if not source:
        raise ValueError(f"model {text!r}: nothing before '+' (SOURCE+ADAPTER_DIR)")
    if adapter is not None and not adapter:
        raise ValueError(f"model {text!r}: nothing after '+' (SOURCE+ADAPTER_DIR)")
    return ModelSpec(
        name=name if name is not None else source, source=source, adapter=adapter, named=name is not None
    )


def is_path_source(source: str) -> bool:
    """True for a source written as a filesystem path (``/srv/models/x``, ``~/x``, ``./x``,
    ``C:\\models\\x``, ``a/b/c``); False for a hub id (``org/name``), a ``test:`` preset or a
    name. A served name is a path only when a local directory was given without ``NAME=``."""
    if source.startswith(("/", "~", ".")) or "\\" in source or _DRIVE.match(source):
        return True
    return source.count("/") > 1


def public_labels(names: Iterable[str]) -> dict[str, str]:
    """How each served name is shown where anyone may read it (``/metrics``, ``/health``; open
    even with an API key): the name itself, except that a name that is a path (a captioner an
    embedder serves under its directory; configured models never are, see
    :func:`folder_names`) shows only its last folders, since a full path tells a stranger the
    user's name and how the disk is laid out.
    """
    names = list(names)
    tails = shortest_tails({name: name for name in names if is_path_source(name)}, names)
    return {name: tails.get(name) or name for name in names}


def shortest_tails(paths: Mapping[str, str], names: Iterable[str]) -> dict[str, str | None]:
    """For each key, the fewest trailing folders of its path that no other path's as many
    trailing folders, and none of ``names`` but its own key, are (``/home/me/models/x`` is ``x``;
    beside ``/srv/x`` they are ``models/x`` and ``srv/x``); None when even the whole path clashes."""
    folders = {key: _folders(path) for key, path in paths.items()}
    others = set(names)
    tails: dict[str, str | None] = {}
    for key, parts in folders.items():
        tails[key] = None
        for depth in range(1, len(parts) + 1):
            tail = "/".join(parts[-depth:])
            clashes = (tail in others and tail != key) or any(
                "/".join(other[-depth:]) == tail for name, other in folders.items() if name != key
            )
            if not clashes:
                tails[key] = tail
                break
    return tails


def _folders(path: str) -> list[str]:
    """A path's folder names, the last one last; one that ends in ``.`` or ``..`` (``./``,
    ``../``) is read from the working directory, whose folder it means."""
    parts = [part for part in re.split(r"[/\\]+", path) if part not in ("", ".", "~")]
    if not parts or parts[-1] == "..":
        parts = [part for part in re.split(r"[/\\]+", os.path.abspath(os.path.expanduser(path))) if part]
    return parts


def folder_names(specs: Sequence[ModelSpec]) -> list[ModelSpec]:
    """``specs`` with each local directory given without ``NAME=`` named after its folder, not
    its path: a served name shows in ``/v1/models``, the ``X-Model`` header and SillyTavern's
    model list, and a path there tells every client the user's name and how the server's disk
    is laid out. Two such folders of one name get as many more of their folders as tell them
    apart; one whose every ending is another model's name is refused (give it a NAME=)."""
    paths = {spec.name: spec.source for spec in specs if not spec.named and is_path_source(spec.source)}
    tails = shortest_tails(paths, [spec.name for spec in specs])
    for source, tail in tails.items():
        if tail is None:
            raise ValueError(
                f"model: {source!r}, given without NAME=, is served under its folder's name, but "
                f"every ending of its path names another model; give it a name: NAME={source}"
            )
    return [replace(spec, name=tails.get(spec.name) or spec.name) for spec in specs]


def served_name(specs: Sequence[ModelSpec], name: str) -> str | None:
    """The served name ``name`` means among ``specs``: itself, or the folder name of the unnamed
    local directory whose path it is (that path was the model's name before folder names)."""
    if any(spec.name == name for spec in specs):
        return name
    return next((spec.name for spec in specs if not spec.named and spec.source == name), None)


def adapter_identity(adapter: str) -> str:
    """One name for one adapter folder however it was typed: its absolute path with ``~`` and
    symlinks resolved. ``my-adapter/``, ``my-adapter`` and ``./my-adapter`` are the same folder,
    and so is ``/data/my-adapter`` from another working directory; what a caption row records
    and compares (a rerun from anywhere resumes) and what keys a loaded adapter."""
    return str(Path(adapter).expanduser().resolve())


def model_identity(source: str) -> str:
    """One name for an unnamed model's source however it was typed, for caption rows: a local
    model folder (as the loader takes it: a path that exists) is its absolute path with ``~`` and
    symlinks resolved, as :func:`adapter_identity` names adapters, so ``./m/``, ``m`` and
    ``/data/m`` from another working directory are one model; a hub id or a ``test:`` preset is
    itself."""
    if source.startswith("test:"):
        return source
    path = Path(source).expanduser()
    try:
        return str(path.resolve()) if path.exists() else source
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL: not a folder to name
        return source


def adapter_name(adapter: str) -> str:
    """How an adapter is shown to clients (``/v1/status``, ``/model_info``, ``/v1/models``): the
    name of its folder, not its path, which would tell a remote client the user's name and how
    the server's disk is laid out. The full path is in the server's start line."""
    return Path(os.path.abspath(os.path.expanduser(adapter))).name or adapter


LOCAL_SOURCE = "local"  # what clients see as the source of a model loaded from a directory path


def public_source(source: str) -> str:
    """How a model's source is shown to clients (``/v1/models``, ``/v1/status``, the web page):
    a hub id or ``test:`` preset as it is, a directory path as ``"local"``. The path would tell
    any client the user's name and how the server's disk is laid out; it is in the server's
    start line and logs, and still picks the model in requests."""
    return LOCAL_SOURCE if is_path_source(source) else source


def public_model_id(source: str, name: str) -> str:
    """The model id clients see (``GET /model``, ``/model_info``, ``/v1/status``' ``model``):
    a hub id or ``test:`` preset as it is, a model loaded from a directory path by its served
    ``name`` (its folder's name, or its ``NAME=``), never the path (see :func:`public_source`)."""
    return name if is_path_source(source) else source


def without_local_path(text: str, source: str, name: str) -> str:
    """``text`` (an error clients read: a 503, ``last_error`` in the open ``/v1/status``) with a
    directory ``source`` written as the served ``name`` in every form a loader may have printed
    it (as given, ``~`` expanded, absolute, resolved). The log line keeps the path for the
    operator; see :func:`public_source` for why clients do not get it."""
    if not is_path_source(source):
        return text
    given = Path(source).expanduser()
    forms = {source, str(given), str(given.absolute()), str(given.resolve())}
    # a bare "." or "~" would match inside any sentence: only forms with a separator are paths
    for form in sorted((f for f in forms if "/" in f or "\\" in f), key=len, reverse=True):
        text = text.replace(form, name)
    return text


def split_adapter(text: str) -> tuple[str, str | None]:
    """``SOURCE+ADAPTER`` → (source, adapter); see the module docstring for which ``+`` counts."""
    if "+" not in text or Path(text).expanduser().exists():
        return text, None
    cuts = [index for index, char in enumerate(text) if char == "+"]
    for cut in reversed(cuts):
        adapter = text[cut + 1 :]
        if adapter and Path(adapter).expanduser().exists():
            return text[:cut], adapter
    return text[: cuts[-1]], text[cuts[-1] + 1 :]


def parse_idle_timeouts(entries: Iterable[str | float]) -> tuple[float | None, dict[str, float]]:
    """``--idle-timeout`` values → (server-wide seconds or None, {model name: seconds}).

    The same server-wide value or the same name twice in one place is an error: one of them
    would be silently ignored.
    """
    return _by_model("idle_timeout", map(_idle_pair, entries), lambda seconds: f"{seconds:g}")


def _idle_pair(entry: str | float) -> tuple[str | None, float]:
    if isinstance(entry, bool):
        raise ValueError(f"idle_timeout: {entry!r} is not a number of seconds")
    if isinstance(entry, (int, float)):
        return None, float(entry)
    return _idle_entry(str(entry).strip())


def _idle_entry(text: str) -> tuple[str | None, float]:
    name, colon, number = text.rpartition(":")
    try:
        seconds = float(number)
    except ValueError:
        shape = "SECONDS or NAME:SECONDS"
        raise ValueError(f"idle_timeout: {text!r} is not {shape} (seconds: a number, -1 for never)") from None
    if colon and not name.strip():
        raise ValueError(f"idle_timeout: {text!r} names no model before ':'")
    return (name.strip() if colon else None), seconds


def parse_named_values(setting: str, entries: Iterable[object]) -> tuple[str | None, dict[str, str]]:
    """``--revision`` / ``--backend`` values → (server-wide value or None, {model name: value}).

    Like :func:`parse_idle_timeouts`: ``VALUE`` or ``NAME:VALUE`` (split at the last ``:``), and
    the same server-wide value or the same name twice in one place is an error.
    """
    shape = f"{setting.upper()} or NAME:{setting.upper()}"

    def pair(entry: object) -> tuple[str | None, str]:
        if isinstance(entry, (bool, float)) or not isinstance(entry, (str, int)):
            raise ValueError(f"{setting}: {entry!r} is not {shape} (give text)")
        text = str(entry).strip()
        name, colon, value = text.rpartition(":")
        name, value = name.strip(), value.strip()
        if colon and not name:
            raise ValueError(f"{setting}: {text!r} names no model before ':' ({shape})")
        if not value:
            raise ValueError(f"{setting}: {text!r} gives no value ({shape})")
        return (name if colon else None), value

    return _by_model(setting, map(pair, entries), str)


def _by_model(
    setting: str, pairs: Iterable[tuple[str | None, V]], shown: Callable[[V], str]
) -> tuple[V | None, dict[str, V]]:
    """(name or None, value) pairs → (server-wide value or None, {model name: value}); a second
    server-wide value or a name given twice is an error, since one of them would be ignored."""
    server_wide: V | None = None
    per_model: dict[str, V] = {}
    for name, value in pairs:
        if name is None:
            if server_wide is not None:
                raise ValueError(
                    f"{setting}: two server-wide values ({shown(server_wide)} and {shown(value)})"
                )
            server_wide = value
        else:
            if name in per_model:
                raise ValueError(f"{setting}: {name} is given twice")
            per_model[name] = value
    return server_wide, per_model


def check_idle_seconds(what: str, seconds: float) -> None:
    if not math.isfinite(seconds):  # float("nan") parses, and nan < 0 is false
        raise ValueError(f"{what} must be a finite number of seconds, or -1 for never (not {seconds:g})")
    if seconds < 0 and seconds != -1:
        raise ValueError(f"{what} must be >= 0, or -1 for never (not {seconds:g})")


def build_specs(
    texts: Sequence[str],
    *,
    adapter: str | None = None,
    default: str | None = None,
    idle_timeouts: Mapping[str, float] | None = None,
    revision: str | None = None,
    revisions: Mapping[str, str] | None = None,
    backend: str = "auto",
    backends: Mapping[str, str] | None = None,
) -> tuple[ModelSpec, ...]:
    """Every configured model, in the order given; ``adapter`` is the old single-model ``--adapter``.

    ``revision`` and ``backend`` are the server-wide values; ``revisions`` and ``backends`` give
    single models their own. Checks: at least one model, no name twice, ``--adapter`` only beside
    one bare ``--model``, ``default`` and every per-model name among the served names (which
    backends exist is the settings' check).
    """
    specs = [parse_model_spec(text) for text in texts]
    _by_unique_name(specs)
    if adapter is not None:
        specs = [_with_old_adapter(specs, texts, adapter)]
    specs = folder_names(specs)
    names = [spec.name for spec in specs]
    for name, seconds in (idle_timeouts or {}).items():
        try:
            check_idle_seconds(f"idle_timeout for {name}", seconds)
        except ValueError as exc:
            raise EntryError(str(exc), setting="idle_timeout", name=name) from None
    overrides = _by_served_name("idle_timeout", specs, idle_timeouts or {})
    own_revisions = _by_served_name("revision", specs, revisions or {})
    own_backends = _by_served_name("backend", specs, backends or {})
    specs = [
        replace(
            spec,
            idle_timeout=overrides.get(spec.name, spec.idle_timeout),
            revision=own_revisions.get(spec.name, revision),
            backend=own_backends.get(spec.name, backend),
        )
        for spec in specs
    ]
    if default is not None and served_name(specs, default) is None:
        raise ValueError(f"default_model: no model is named {default!r}; the models are {_listed(names)}")
    return tuple(specs)


def _by_served_name(setting: str, specs: Sequence[ModelSpec], named: Mapping[str, V]) -> dict[str, V]:
    """A setting's NAME:VALUE entries keyed by served name (a local directory's path names its
    model too); an unknown name, or two entries for one model, is refused."""
    names = [spec.name for spec in specs]
    served: dict[str, V] = {}
    for name, value in named.items():
        model = served_name(specs, name)
        if model is None:
            raise EntryError(_no_such_model(setting, name, value, names), setting=setting, name=name)
        if model in served:
            raise EntryError(
                f"{setting}: {model} is given twice ({name!r} is its path)", setting=setting, name=name
            )
        served[model] = value
    return served


# What each NAME:VALUE setting's VALUE is, for its refusals.
_VALUES = {
    "idle_timeout": ("SECONDS", "a number of seconds"),
    "revision": ("REVISION", "a revision (branch, tag, commit or refs/pr/N)"),
    "backend": ("BACKEND", "a backend"),
}


def _no_such_model(setting: str, name: str, value: object, names: Sequence[str]) -> str:
    """The refusal of a ``NAME:VALUE`` entry whose NAME, the text before its last ``:``, is no
    served name. ``a:b:c`` beside a model ``a`` asks for the value ``b:c``, which cannot be: no
    value holds a ``:`` (git forbids it in branch and tag names, a commit is hex), and reading
    the entry at its first ``:`` instead would break names that hold one (``test:tiny``)."""
    word, what = _VALUES[setting]
    entry = f"{name}:{value:g}" if isinstance(value, float) else f"{name}:{value}"
    listed = f"the models are {_listed(names)}"
    owner = max((served for served in names if name.startswith(f"{served}:")), key=len, default=None)
    if owner is not None:
        meant = entry[len(owner) + 1 :]
        return (
            f"{setting}: {entry!r} is not {word} or NAME:{word}: for model {owner!r} it would be "
            f"{meant!r}, and {what} never holds ':'"
        )
    if ":" in name:
        return (
            f"{setting}: {entry!r} is not {word} or NAME:{word}: NAME ends at the last ':', and no "
            f"model is named {name!r}; {listed}"
        )
    return f"{setting}: no model is named {name!r}; {listed}"


def _by_unique_name(specs: list[ModelSpec]) -> dict[str, ModelSpec]:
    """The models by name; none at all, or a name given twice, is refused."""
    if not specs:
        raise ValueError("model: give at least one model")
    seen: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise ValueError(
                f"model: the name {spec.name!r} is used twice; give each model its own name (NAME=SOURCE)"
            )
        seen[spec.name] = spec
    return seen


def _with_old_adapter(specs: list[ModelSpec], texts: Sequence[str], adapter: str) -> ModelSpec:
    """``--adapter DIR`` beside a single bare ``--model SOURCE``: the spec ``SOURCE+DIR``."""
    spec = specs[0] if len(specs) == 1 else None
    if spec is not None and spec.adapter is not None:
        raise ValueError(f"adapter: {texts[0]!r} already names an adapter after '+'; leave adapter unset")
    if spec is None or spec.named:
        raise ValueError(
            f"adapter: a separate adapter goes with a single unnamed model; with {_listed(list(texts))} "
            "write the adapter into the model instead: NAME=SOURCE+ADAPTER_DIR"
        )
    return replace(spec, adapter=adapter)


def _listed(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)
