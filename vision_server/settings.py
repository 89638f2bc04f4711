"""One frozen :class:`Settings` object, built once from defaults < config file < env < flags.

Nothing here reads the environment at import time: :func:`load_settings` takes the environment
and the flags as arguments, so tests and embedders build settings explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import sys
import types
import typing
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from vision_server.allowed_hosts import AllowedHosts
from vision_server.byte_sizes import EXAMPLES, parse_byte_size
from vision_server.captioner import GenerationOptions
from vision_server.errors import InvalidTask
from vision_server.model_specs import (
    EntryError,
    ModelSpec,
    build_specs,
    parse_idle_timeouts,
    parse_named_values,
    served_name,
)
from vision_server.settings_types import WrongType, checked
from vision_server.tasks import FLORENCE_TASKS, PROMPTGEN_TASKS, normalize_task
from vision_server.trusted_proxies import TrustedProxies

# Every task token some model offers: --default-task must be one (a model lacking it uses its first).
KNOWN_TASKS = tuple(dict.fromkeys(PROMPTGEN_TASKS + FLORENCE_TASKS))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

APP_NAME = "vision-server"
ENV_PREFIX = "VISION_SERVER_"
DEFAULT_MODEL = "MiaoshouAI/Florence-2-large-PromptGen-v2.0"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A settings field whose help text feeds ``--help``, the README and the config docs."""
    metadata = {"help": help, **extra}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told. Field names are the config-file keys."""

    # network
    host: str = _opt("127.0.0.1", "Address to bind. Loopback by default; use 0.0.0.0 to serve a network.")
    port: int = _opt(54880, "TCP port to listen on.")
    # model
    model: tuple[str, ...] = _opt(
        (DEFAULT_MODEL,),
        "The model to serve: a hub id or local directory of a Florence-2 model, or of another "
        "transformers image-to-text model (BLIP, GIT, ViT+GPT-2, Idefics3/SmolVLM; see --backend); "
        "'test:tiny' serves a self-built tiny Florence-2 (and 'test:base', 'test:large' ones of the real "
        "sizes with random weights, for memory and speed tests) whose captions are meaningless. Repeat as "
        "NAME=SOURCE to serve several models, requests picking one by NAME; SOURCE+ADAPTER_DIR puts a "
        "LoRA adapter on top. The first is the default (the one vision-server caption uses).",
        metavar="[NAME=]SOURCE[+ADAPTER_DIR]",
    )
    default_model: str | None = _opt(
        None, "Name of the model that requests naming none get. Unset: the first --model.", metavar="NAME"
    )
    backend: str = _opt(
        "auto",
        "Which code runs the model: auto (read from the model's config.json), florence2, blip, git, "
        "vision-encoder-decoder or idefics3. A plain value applies to every --model; NAME:BACKEND "
        "(repeatable) sets one model's own.",
        entries=True,
        metavar="BACKEND|NAME:BACKEND",
    )
    revision: str | None = _opt(
        None,
        "Hub revision (branch, tag or commit) to pin the download to. A plain value applies to every "
        "--model; NAME:REVISION (repeatable) pins one model's own.",
        entries=True,
        metavar="REVISION|NAME:REVISION",
    )
    adapter: str | None = _opt(
        None,
        "Directory of a PEFT LoRA adapter to apply on top of the model (a single unnamed --model; "
        "with named models write NAME=SOURCE+ADAPTER_DIR).",
    )
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N. auto picks CUDA when available.")
    dtype: str = _opt("auto", "auto, float16, bfloat16 or float32. auto: float16 on CUDA, float32 on CPU.")
    cache_dir: Path = _opt(
        Path(platformdirs.user_cache_dir(APP_NAME)),
        "Where converted models and built test models are kept; serve and caption make it at start "
        "(a path that cannot be made stops them; an existing read-only one is fine).",
    )
    # lifecycle
    idle_timeout: float = _opt(
        300.0,
        "Seconds without work before a model is unloaded. 0 unloads as soon as its queue drains; -1 "
        "never. NAME:SECONDS (repeatable) sets one model's own.",
        entries=True,
        metavar="SECONDS|NAME:SECONDS",
    )
    memory_budget: str | None = _opt(
        None,
        "Most memory the loaded models may hold together (GPU memory on CUDA, RAM on the CPU), e.g. "
        "24GiB, 8G, 512MB: idle models are unloaded, least recently used first, to make room. "
        "Unset: no budget.",
        metavar="SIZE",
    )
    preload: bool = _opt(
        False,
        "Load the default model at start instead of on the first request (the other models "
        "still load on demand).",
    )
    offload_timeout: float = _opt(
        1800.0,
        "GPU only: after the idle timeout the weights wait this many seconds in pinned host memory "
        "(a wake takes a fraction of a load) before they are freed. 0 skips this tier.",
        metavar="SECONDS",
    )
    max_keep_alive: float | None = _opt(
        None,
        "Most seconds a request's keep_alive may keep the model loaded; more is granted this "
        "much, and 'forever' (negative) is refused. Unset: the idle timeout. -1: no cap.",
        metavar="SECONDS",
    )
    # queue and batching
    max_queue: int = _opt(
        256,
        "Most jobs waiting in each priority lane (interactive, bulk); more get 503 with Retry-After. "
        "A full bulk lane never refuses interactive requests.",
    )
    bulk_aging: int = _opt(
        4,
        "Batches in a row that may leave waiting bulk jobs out; the next batch then keeps a quarter "
        "of its places for bulk jobs, so bulk work never starves under interactive load.",
    )
    max_batch_size: int | None = _opt(
        None, "Most images captioned in one generate call. Unset: 32 on CUDA, 16 on CPU."
    )
    max_batch_wait_ms: float = _opt(5.0, "How long the worker waits for more jobs to fill a batch.")
    request_timeout: float = _opt(
        600.0, "Seconds a request may wait and run before it fails with 504.", metavar="SECONDS"
    )
    decode_threads: int = _opt(
        4,
        "Threads that decode and resize images before the queue, per lane (bulk uploads have "
        "threads of their own); their full-size decodes together hold at most --max-image-pixels pixels.",
    )
    # limits
    max_request_bytes: int = _opt(
        20 * 1024 * 1024,
        "Largest request body accepted (413 above), e.g. 20MiB, 100MB or a number of bytes.",
        byte_size=True,
        metavar="SIZE",
    )
    body_timeout: float = _opt(
        120.0,
        "Seconds a client may take to send a request's body (408 above), so slow or stalled "
        "uploads cannot hold connections open forever.",
        metavar="SECONDS",
    )
    max_image_pixels: int = _opt(64_000_000, "Largest image accepted, in pixels (413 above; stops bombs).")
    max_images_per_request: int = _opt(
        16, "Most images in one request (OpenAI messages, /batch_caption); more is a 400."
    )
    # generation defaults
    num_beams: int = _opt(3, "Beam count for generation (the reference server's default).")
    max_new_tokens: int = _opt(
        1024,
        "Most tokens generated per caption (a request asking for more gets this many). A model whose text "
        "decoder holds fewer (BLIP: 512) is clamped to its own limit.",
    )
    min_new_tokens: int = _opt(
        0, "Benchmarks only: generate at least this many tokens, so random-weight models give fixed lengths."
    )
    default_task: str = _opt(
        "<MORE_DETAILED_CAPTION>", "Task used when a free-text prompt (OpenAI, SillyTavern) names none."
    )
    # security
    api_key: str | None = _opt(
        None, "Require 'Authorization: Bearer KEY' on every route but /health and /ready."
    )
    api_key_file: Path | None = _opt(None, "Read the API key from this file (first line).")
    admin_key: str | None = _opt(
        None,
        "Key for /v1/model/load, /v1/model/unload and /v1/model/offload. Without one they answer "
        "only on loopback, and never through a proxy: set one behind nginx or HAProxy.",
    )
    metrics_require_key: bool = _opt(False, "Require the API key on /metrics too.")
    cors_origins: tuple[str, ...] = _opt(
        (), "Origin allowed to call from a browser (repeatable). Off by default.", flag="cors-origin"
    )
    rate_limit: float | None = _opt(
        None, "Requests per minute per client address (429 above). Off by default."
    )
    trusted_proxies: tuple[str, ...] = _opt(
        (),
        "Address or CIDR network of a reverse proxy (HAProxy, nginx) whose X-Forwarded-For names the "
        "client (repeatable): the access log, --rate-limit and the bulk lane's turns then see that "
        "client instead of the proxy. Off by default: the header is ignored from every peer.",
        flag="trusted-proxy",
        metavar="ADDRESS|CIDR",
    )
    allowed_hosts: tuple[str, ...] = _opt(
        (),
        "Host name the server answers besides localhost and IP addresses (repeatable; .example.com "
        "for a domain and its subdomains, *.example.com for its subdomains only, * for any): the "
        "name a reverse proxy or hosts file gives it. Requests for other names get 403, which stops "
        "web pages that use DNS rebinding. The check is on when --host is loopback (the default) "
        "or this is given, off with *.",
        flag="allowed-host",
        metavar="NAME",
    )
    ssl_cert: Path | None = _opt(None, "TLS certificate (PEM). Serve HTTPS when given with --ssl-key.")
    ssl_key: Path | None = _opt(None, "TLS private key (PEM).")
    # operations
    shutdown_grace: float = _opt(
        60.0, "Seconds to finish queued and running jobs on SIGTERM/SIGINT.", metavar="SECONDS"
    )
    log_level: str = _opt("info", "debug, info, warning or error (any case).")
    log_format: str = _opt("text", "text or json (one JSON object per line).")
    log_file: Path | None = _opt(None, "Also write logs to this file.")
    # web page
    ui: bool = _opt(True, "Serve the web page at / (try a caption, browse a gallery, watch the server).")
    gallery: Path | None = _opt(
        None, "Dataset folder the web page's gallery shows (images and their caption files). Off by default."
    )
    gallery_writable: bool = _opt(
        False, "Let the gallery save edited and re-made captions into the caption files (read-only without)."
    )
    gallery_page_size: int = _opt(48, "Images per gallery page (1 to 500).")
    gallery_jsonl: Path | None = _opt(
        None, "A JSONL of captions (vision-server caption --jsonl, metadata.jsonl) shown as one more source."
    )
    thumbnail_cache_size: str = _opt(
        "1GiB",
        "Most disk space the gallery's thumbnails may take in the cache dir, e.g. 512MB or 2GiB; "
        "past it the least recently shown ones are deleted. 0: keep no thumbnails on disk.",
        metavar="SIZE",
    )
    compile: bool = _opt(
        False,
        "CUDA only: static KV cache + torch.compile for the default generation options; batches are "
        "padded to buckets 1, 2, 4 ... max-batch-size, each compiled right after load (10-25 s each).",
    )

    # Filled from the NAME:VALUE entries of `idle_timeout`, `backend` and `revision` (no flag, key
    # or variable of their own; see PER_MODEL).
    model_idle_timeouts: tuple[tuple[str, float], ...] = field(default=(), metadata={"internal": True})
    model_backends: tuple[tuple[str, str], ...] = field(default=(), metadata={"internal": True})
    model_revisions: tuple[tuple[str, str], ...] = field(default=(), metadata={"internal": True})
    # Where each setting not left at its default came from ("--port", "VISION_SERVER_PORT",
    # "port in /etc/vision-server/config.toml"), for error messages; filled by load_settings. A
    # NAME:VALUE entry has its own ("revision:blip"), and "revision" is its server-wide value's.
    sources: tuple[tuple[str, str], ...] = field(
        default=(), repr=False, compare=False, metadata={"internal": True}
    )
    # Derived in __post_init__ (not arguments): the parsed --model values and --memory-budget.
    _model_specs: tuple[ModelSpec, ...] = field(init=False, repr=False, compare=False, default=())
    _memory_budget_bytes: int | None = field(init=False, repr=False, compare=False, default=None)
    _trusted_proxy_networks: TrustedProxies = field(
        init=False, repr=False, compare=False, default=TrustedProxies()
    )

    _allowed_host_names: AllowedHosts = field(init=False, repr=False, compare=False, default=AllowedHosts())

    def __post_init__(self) -> None:
        for name, hint in _INIT_TYPES.items():  # Settings(model="test:tiny") is ("test:tiny",)
            object.__setattr__(self, name, _typed(name, hint, getattr(self, name)))
        for name in _ANY_CASE:  # LOG_LEVEL=INFO, as Python's logging spells it, in an env file
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, value.strip().lower())
        try:
            _validate(self)
        except SettingsError as exc:
            raise self.located(exc) from None

    def located(self, error: SettingsError) -> SettingsError:
        """``error`` ending with where its settings' values came from (``(set by --port)``), once:
        an error that says so already, or whose settings were left at their defaults, is kept.
        An error about one ``NAME:VALUE`` entry names where that entry was given."""
        if error.source is not None:
            return error
        known = dict(self.sources)
        entry = [] if error.entry is None else [f"{name}:{error.entry}" for name in error.settings]
        given = [known[key] for key in entry if key in known] or [
            known[name] for name in error.settings if name in known
        ]
        return error.set_by(" and ".join(dict.fromkeys(given))) if given else error

    @property
    def model_specs(self) -> tuple[ModelSpec, ...]:
        """Every configured model, in the order given (the first is the default unless
        ``default_model`` names another)."""
        return self._model_specs

    @property
    def default_model_name(self) -> str:
        """The served name of the default model (``default_model`` may be a local model's path)."""
        if self.default_model is None:
            return self._model_specs[0].name
        return served_name(self._model_specs, self.default_model) or self.default_model

    @property
    def default_model_spec(self) -> ModelSpec:
        """The model requests that name none get; the offline ``caption`` command uses it alone."""
        return next(spec for spec in self._model_specs if spec.name == self.default_model_name)

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget`` in bytes; None: no budget."""
        return self._memory_budget_bytes

    @property
    def trusted_proxy_networks(self) -> TrustedProxies:
        """``trusted_proxies`` parsed (empty: no peer's forwarding headers are believed)."""
        return self._trusted_proxy_networks

    @property
    def allowed_host_names(self) -> AllowedHosts:
        """``allowed_hosts`` parsed, with whether the ``Host`` check is on for ``host``."""
        return self._allowed_host_names

    @property
    def thumbnail_cache_bytes(self) -> int:
        """``thumbnail_cache_size`` in bytes (0: no thumbnails on disk)."""
        return parse_byte_size(self.thumbnail_cache_size)

    @property
    def max_batch_wait(self) -> float:
        return self.max_batch_wait_ms / 1000.0

    def generation_defaults(self) -> GenerationOptions:
        """Generation options of a request that overrides nothing."""
        return GenerationOptions(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            min_new_tokens=min(self.min_new_tokens, self.max_new_tokens),
        )


class SettingsError(ValueError):
    """A setting has a value the server cannot use; the message names the setting.

    ``setting`` is the field at fault (a tuple when two are, as a TLS certificate and its key;
    None for none, as a config file that is no TOML), so the message can end with where the
    value came from, ``(set by SOURCE)``: a bad value set in a service's environment or a config
    file is otherwise hard to find. ``source`` is that place when the raiser knows it (a flag
    being read); otherwise :meth:`Settings.located` adds it. The message itself never names the
    place, so every error says it once, and always in the same words at the same end.
    """

    def __init__(
        self,
        message: str,
        *,
        setting: str | tuple[str, ...] | None = None,
        source: str | None = None,
        entry: str | None = None,
    ) -> None:
        super().__init__(message if source is None else f"{message} (set by {source})")
        self.reason = message
        self.settings: tuple[str, ...] = (setting,) if isinstance(setting, str) else setting or ()
        self.source = source
        self.entry = entry  # the NAME of the NAME:VALUE entry at fault, when one is

    @property
    def setting(self) -> str | None:
        """The (first) setting at fault."""
        return self.settings[0] if self.settings else None

    def set_by(self, source: str) -> SettingsError:
        """This error ending with ``(set by SOURCE)``; unchanged when it names a source already."""
        if self.source is not None:
            return self
        return type(self)(self.reason, setting=self.settings, source=source, entry=self.entry)


class SettingsTypeError(SettingsError, TypeError):
    """A value given to ``Settings(...)`` directly is not of its field's type (flags, variables and
    config keys are converted before they get here). Both a ``TypeError`` and a :class:`SettingsError`,
    so either ``except`` catches it."""


# Each argument's declared type (``X | None`` included), checked by ``Settings.__post_init__``.
_INIT_TYPES: dict[str, Any] = {
    f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings) if f.init
}


def _typed(name: str, hint: Any, value: Any) -> Any:
    """``value`` in the field's own type (see :mod:`vision_server.settings_types`), or an error
    that names the field."""
    try:
        return checked(hint, value)
    except WrongType as exc:
        hint_text = ""
        if name in PER_MODEL and isinstance(value, str) and ":" in value:  # the flags' NAME:VALUE form
            hint_text = f"; one model's own value goes in {PER_MODEL[name][0]} as (NAME, VALUE) pairs"
        raise SettingsTypeError(f"Settings({name}=...): {exc}{hint_text}", setting=name) from None


BACKENDS = ("auto", "florence2", "blip", "git", "vision-encoder-decoder", "idefics3")

_CHOICES: dict[str, tuple[str, ...]] = {
    "backend": BACKENDS,
    "dtype": ("auto", "float16", "bfloat16", "float32"),
    "log_level": ("debug", "info", "warning", "error"),
    "log_format": ("text", "json"),
}
# The settings that are numbers with a fraction (seconds, a rate): each must be finite.
_FLOATS = tuple(name for name, hint in _INIT_TYPES.items() if hint in (float, float | None))
# Choices taken in any case: people write log levels as Python's logging does (INFO, DEBUG).
_ANY_CASE = ("log_level", "log_format")


def _validate(s: Settings) -> None:
    for name, choices in _CHOICES.items():
        if getattr(s, name) not in choices:
            raise SettingsError(
                f"{name} must be one of {', '.join(choices)}, not {getattr(s, name)!r}", setting=name
            )
    if not (s.device in ("auto", "cpu", "cuda") or s.device.startswith("cuda:")):
        raise SettingsError(f"device must be auto, cpu, cuda or cuda:N, not {s.device!r}", setting="device")
    positive = (
        "max_queue",
        "max_batch_size",
        "decode_threads",
        "max_request_bytes",
        "max_image_pixels",
        "max_images_per_request",
        "bulk_aging",
    )
    for name in (*positive, "num_beams", "max_new_tokens"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            raise SettingsError(f"{name} must be at least 1, not {getattr(s, name)}", setting=name)
    if s.min_new_tokens < 0:
        raise SettingsError("min_new_tokens must be >= 0", setting="min_new_tokens")
    if s.idle_timeout < 0 and s.idle_timeout != -1:
        raise SettingsError("idle_timeout must be >= 0, or -1 for never", setting="idle_timeout")
    _derive(s)
    if s.offload_timeout < 0:
        raise SettingsError(
            "offload_timeout must be >= 0 (0 skips the host-memory tier)", setting="offload_timeout"
        )
    if s.max_keep_alive is not None and s.max_keep_alive < 0 and s.max_keep_alive != -1:
        raise SettingsError("max_keep_alive must be >= 0, or -1 for no cap", setting="max_keep_alive")
    if not s.body_timeout > 0:
        raise SettingsError(
            f"body_timeout must be more than 0 seconds, not {s.body_timeout}", setting="body_timeout"
        )
    if not s.request_timeout > 0:
        raise SettingsError(
            f"request_timeout must be more than 0 seconds, not {s.request_timeout}",
            setting="request_timeout",
        )
    for name in ("shutdown_grace", "max_batch_wait_ms"):
        if not getattr(s, name) >= 0:
            raise SettingsError(f"{name} must be 0 or more, not {getattr(s, name)}", setting=name)
    for name in _FLOATS:  # float("nan") and float("inf") parse; neither is a number of seconds
        value = getattr(s, name)
        if value is not None and not math.isfinite(value):
            raise SettingsError(f"{name} must be a finite number, not {value}", setting=name)
    if not 0 <= s.port <= 65535:
        raise SettingsError(f"port must be 0..65535, not {s.port}", setting="port")
    if s.gallery_jsonl is not None and s.gallery is None:
        raise SettingsError(
            "gallery_jsonl adds captions to a gallery: give the dataset folder with gallery too",
            setting="gallery_jsonl",
        )
    if not 1 <= s.gallery_page_size <= 500:
        raise SettingsError(
            f"gallery_page_size must be 1..500, not {s.gallery_page_size}", setting="gallery_page_size"
        )
    try:
        parse_byte_size(s.thumbnail_cache_size)
    except ValueError as exc:
        raise SettingsError(
            f"thumbnail_cache_size: {exc}, or 0 for none", setting="thumbnail_cache_size"
        ) from None
    if (s.ssl_cert is None) != (s.ssl_key is None):
        given, missing = ("ssl_cert", "ssl_key") if s.ssl_key is None else ("ssl_key", "ssl_cert")
        raise SettingsError(
            f"ssl_cert and ssl_key must be given together: {given} is set but {missing} is not; give "
            f"{missing} too, as {flag_name(missing)}, {env_name(missing)} or a config-file key",
            setting=given,
        )
    for name in ("api_key", "admin_key"):
        _check_key(name, getattr(s, name))
    for origin in s.cors_origins:
        _check_origin(origin)
    try:  # a typo here would quietly give every free-text request the model's first task (tags)
        normalize_task(s.default_task, KNOWN_TASKS)
    except InvalidTask:
        raise SettingsError(
            f"default_task {s.default_task!r} is no task of any model; use one of {', '.join(KNOWN_TASKS)}",
            setting="default_task",
        ) from None
    if s.rate_limit is not None and not s.rate_limit >= 0:
        raise SettingsError(
            f"rate_limit must be a number of requests a minute (0 or unset: no limit), not {s.rate_limit}",
            setting="rate_limit",
        )


def _check_origin(origin: str) -> None:
    """A browser's ``Origin`` is ``scheme://host[:port]``; anything else (no scheme, a path) would
    never match one, and the page's calls would fail with nothing in the server's log."""
    if origin.strip() == "*":
        return
    parts = urllib.parse.urlsplit(origin.strip())
    if not (parts.scheme and parts.netloc) or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise SettingsError(
            f"cors_origins: {origin!r} is not an origin; write it as the browser sends it, "
            "scheme://host[:port] like http://127.0.0.1:8000 (no path), or * for any",
            setting="cors_origins",
        )


def _check_key(name: str, key: str | None) -> None:
    """An empty key (``VISION_SERVER_API_KEY=`` from a template whose secret was missing) would
    quietly serve without one; a key with spaces at its ends could never match a bearer token."""
    if key is None:
        return
    if not key.strip():
        raise SettingsError(
            f"{name} is empty, which would serve without a key; give the key, or leave {name} "
            "unset to serve without one",
            setting=name,
        )
    if key != key.strip():
        raise SettingsError(
            f"{name} has spaces at its start or end; clients could never send it", setting=name
        )


def _derive(s: Settings) -> None:
    """Parse ``model`` (with ``adapter``, ``default_model`` and the per-model idle timeouts,
    revisions and backends) and ``memory_budget`` once, so every reader gets the same checked
    values."""
    try:
        specs = build_specs(
            s.model,
            adapter=s.adapter,
            default=s.default_model,
            idle_timeouts=dict(s.model_idle_timeouts),
            revision=s.revision,
            revisions=dict(s.model_revisions),
            backend=s.backend,
            backends=dict(s.model_backends),
        )
    except EntryError as exc:
        raise SettingsError(str(exc), setting=exc.setting, entry=exc.name) from None
    except ValueError as exc:  # each message starts with the setting at fault ("default_model: ...")
        named = re.match(r"[a-z_]+", str(exc))
        at_fault = named.group() if named is not None and named.group() in FIELDS else None
        raise SettingsError(str(exc), setting=at_fault) from None
    for name, backend in s.model_backends:
        if backend not in BACKENDS:
            raise SettingsError(
                f"backend for {name} must be one of {', '.join(BACKENDS)}, not {backend!r}",
                setting="backend",
                entry=name,
            )
    object.__setattr__(s, "_model_specs", specs)
    budget = None
    if s.memory_budget is not None and s.memory_budget.strip().lower() not in ("", "none"):
        try:
            budget = parse_byte_size(s.memory_budget)
        except ValueError as exc:
            raise SettingsError(f"memory_budget: {exc}", setting="memory_budget") from None
        if budget < 1:
            raise SettingsError(
                f"memory_budget must be more than 0 bytes (like {EXAMPLES}), or unset",
                setting="memory_budget",
            )
    object.__setattr__(s, "_memory_budget_bytes", budget)
    try:
        trusted = TrustedProxies.parse(s.trusted_proxies)
    except ValueError as exc:
        raise SettingsError(f"trusted_proxies: {exc}", setting="trusted_proxies") from None
    object.__setattr__(s, "_trusted_proxy_networks", trusted)
    try:
        allowed = AllowedHosts.parse(s.allowed_hosts, s.host)
    except ValueError as exc:
        raise SettingsError(f"allowed_hosts: {exc}", setting="allowed_hosts") from None
    object.__setattr__(s, "_allowed_host_names", allowed)


# --- building settings from sources ------------------------------------------------------------

# The settings a user sets (flags, config keys, variables); derived and internal fields are not.
FIELDS: dict[str, dataclasses.Field[Any]] = {
    f.name: f for f in dataclasses.fields(Settings) if f.init and not f.metadata.get("internal")
}


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def flag_name(name: str) -> str:
    """The command-line flag of a setting (``--cors-origin`` for the repeatable ``cors_origins``)."""
    return "--" + FIELDS[name].metadata.get("flag", name.replace("_", "-"))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def field_type(name: str) -> Any:
    """The runtime type of a field, with ``X | None`` reduced to ``X``."""
    hint = typing.get_type_hints(Settings)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def coerce(name: str, value: Any) -> Any:
    """Turn a config-file, environment or flag value into the field's type, or explain why not
    (the caller adds where the value was given)."""
    if value is None:
        return None
    if FIELDS[name].metadata.get("entries"):
        return _entries(value)
    kind = field_type(name)
    try:
        if kind is bool:
            return _to_bool(value)
        if typing.get_origin(kind) is tuple:
            items = value.split(",") if isinstance(value, str) else value
            items = items if isinstance(items, (list, tuple)) else [_text(items, "text or a list of text")]
            texts = (_text(item, "a list of text, not of lists, tables or true/false") for item in items)
            return tuple(text.strip() for text in texts if text.strip())
        if kind is Path:
            return Path(_text(value, "a path")).expanduser()
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError("expected a number, not true/false")
        if FIELDS[name].metadata.get("byte_size") and isinstance(value, str):
            return parse_byte_size(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        if kind in (int, float):
            return _number(kind, value)
        return _text(value, "text") if kind is str else kind(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name}: cannot use {value!r}: {exc}", setting=name) from None


def _text(value: Any, expected: str) -> str:
    """A config value where text belongs: a TOML number or date reads as its text (``api-key =
    123``), but true/false, an array or a table was meant for another setting (``gallery = true``
    made a folder named True)."""
    if isinstance(value, (bool, list, tuple, dict)):
        raise ValueError(f"expected {expected}")
    return str(value)


def _number(kind: type[int] | type[float], value: Any) -> int | float:
    """``int("abc")`` says "invalid literal for int() with base 10"; a user wants what is expected."""
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError("expected a whole number" if kind is int else "expected a number") from None


def _entries(value: Any) -> tuple[str | float, ...]:
    """A repeatable flag's values as given: a number, comma-separated text, or a list of either."""
    items = (
        value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    )
    return tuple(item.strip() if isinstance(item, str) else item for item in items if item != "")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false")


def read_config_file(path: Path, written: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a TOML config; keys may use dashes or underscores. Unknown keys are errors.

    ``written`` (when given) gets each setting's key as the file spells it (``max-queue``), so
    an error names the key the user will search the file for."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _FLAG_KEYS.get(key.replace("_", "-"), key.replace("-", "_"))
        if name not in FIELDS:
            raise SettingsError(f"config file {path}: unknown setting {key!r}")
        if name in values:
            raise SettingsError(f"config file {path}: {key!r} sets {name} a second time")
        if written is not None:
            written[name] = key
        try:
            values[name] = coerce(name, value)
        except SettingsError as exc:
            raise exc.set_by(in_config_file(key, path)) from None
    return values


def in_config_file(key: str, path: Path) -> str:
    """Where a config file sets a setting, as its errors say: ``max-queue in /etc/vs.toml``."""
    return f"{key} in {path}"


# A setting whose flag is not its name (``cors-origin`` for ``cors_origins``) also takes the flag's
# name as a config key, so a key copied from the command line works.
_FLAG_KEYS = {spec.metadata["flag"]: name for name, spec in FIELDS.items() if "flag" in spec.metadata}


def is_list(name: str) -> bool:
    """True for the settings that take several values (a repeatable flag, a list in the config)."""
    return bool(FIELDS[name].metadata.get("entries")) or typing.get_origin(field_type(name)) is tuple


def read_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in (name for name in FIELDS if env_name(name) in environ):
        try:
            values[name] = coerce(name, environment_value(name, environ[env_name(name)]))
        except SettingsError as exc:
            raise exc.set_by(env_name(name)) from None
    return values


def read_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags given (None and an empty repeatable flag mean not given), coerced."""
    values: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None or value == ():
            continue
        try:
            values[name] = coerce(name, value)
        except SettingsError as exc:
            raise exc.set_by(flag_name(name)) from None
    return values


def environment_value(name: str, text: str) -> Any:
    """A variable's text; for a list setting, text that starts with ``[`` is a JSON list.

    Lists in variables are otherwise comma-separated, which cannot hold a value with a comma
    (a local path such as ``/models/a,b``); ``["a=/models/a,b", "test:tiny"]`` can.
    """
    if not (is_list(name) and text.lstrip().startswith("[")):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(
            f"{name}: a variable's value that starts with '[' is read as a JSON list, and this one "
            f"is not valid JSON ({exc.msg} at character {exc.pos + 1}); write it like "
            '["first", "second"], or without the brackets as a comma-separated list',
            setting=name,
            source=env_name(name),
        ) from None
    # Text that starts with '[' and parses is a JSON array, so ``value`` is a list here.
    wrong = [item for item in value if isinstance(item, (bool, list, dict)) or item is None]
    if wrong:
        shown = json.dumps(wrong[0])
        raise SettingsError(
            f"{name}: the JSON list may hold only strings and numbers, not {shown}",
            setting=name,
            source=env_name(name),
        )
    return value


def load_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> Settings:
    """Merge defaults < config file < environment < flags (flags set to None are ignored).

    Without ``config_path`` the platformdirs config file is used when it exists.
    """
    environ = environ if environ is not None else {}
    explicit = config_path or (Path(environ[env_name("config")]) if env_name("config") in environ else None)
    path = explicit or default_config_path()
    layers: list[dict[str, Any]] = []
    where: list[Callable[[str], str]] = []
    if explicit is not None and not path.is_file():
        raise SettingsError(f"config file {path} does not exist")
    if path.is_file():
        keys: dict[str, str] = {}
        layers.append(read_config_file(path, keys))
        where.append(lambda name: in_config_file(keys.get(name, name), path))
    layers.append(read_environment(environ))
    where.append(env_name)
    layers.append(read_flags(flags or {}))
    where.append(flag_name)
    sources = {name: describe(name) for layer, describe in zip(layers, where, strict=True) for name in layer}
    values = merge_layers(layers, where, sources)
    return Settings(**values, sources=tuple(sources.items()))


# Settings that take ``VALUE`` (server-wide) or ``NAME:VALUE`` (one model) entries: the internal
# field that collects the NAME:VALUE ones, and the parser of a layer's entries.
PER_MODEL: dict[str, tuple[str, Callable[[Iterable[Any]], tuple[Any, dict[str, Any]]]]] = {
    "idle_timeout": ("model_idle_timeouts", parse_idle_timeouts),
    "backend": ("model_backends", functools.partial(parse_named_values, "backend")),
    "revision": ("model_revisions", functools.partial(parse_named_values, "revision")),
}


def merge_layers(
    layers: list[dict[str, Any]],
    where: list[Callable[[str], str]] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Later layers win, setting by setting, with two refinements for several models:

    - ``idle_timeout``, ``backend`` and ``revision`` entries merge finer: a layer's server-wide
      value replaces the earlier one, its NAME:VALUE entries replace those names only, so
      ``--idle-timeout big:60`` keeps the config file's server-wide value;
    - a layer that sets ``model`` replaces the earlier model list together with what named its
      models (earlier ``default_model`` and NAME:VALUE entries), so ``--model x=...`` on the
      command line is not refused over names from the config file's list.

    ``where`` names each layer's source of a setting (``--idle-timeout``), for its errors; with
    it, ``sources`` gets the source of each server-wide value (``revision``) and each entry
    (``revision:blip``) that the merged values hold.
    """
    values: dict[str, Any] = {}
    per_model: dict[str, dict[str, Any]] = {name: {} for name in PER_MODEL}
    found = sources if sources is not None else {}
    for index, layer in enumerate(layers):
        layer = dict(layer)
        if "model" in layer:
            for named in per_model.values():
                named.clear()
            values.pop("default_model", None)
            for key in [key for key in found if ":" in key and key.partition(":")[0] in PER_MODEL]:
                del found[key]  # the entries that named the models now gone
        for name, (_, parse) in PER_MODEL.items():
            if name not in layer:
                continue
            try:
                server_wide, overrides = parse(layer.pop(name))
            except ValueError as exc:
                source = where[index](name) if where else None
                raise SettingsError(str(exc), setting=name, source=source) from None
            if server_wide is not None:
                values[name] = server_wide
            per_model[name].update(overrides)
            if where:
                if server_wide is not None:
                    found[name] = where[index](name)
                found.update({f"{name}:{entry}": where[index](name) for entry in overrides})
        values.update(layer)
    for name, (internal, _) in PER_MODEL.items():
        if per_model[name]:
            values[internal] = tuple(per_model[name].items())
    return values
