"""One copy of a base model in memory for every captioner that differs from another only by adapter.

A server that serves ``large`` and ``large+mystyle`` would otherwise hold the large weights
twice. Captioners register with the server's one :class:`SharedBases` when they are made; when
two or more have the same :class:`BaseKey`, they load that base through the pool: the first
loads it, the others find it, each attaches its LoRA adapter *unmerged* under its own name
through PEFT's multi-adapter API, and the base stays loaded while any of them is (a count of
users). A captioner picks its adapter at the start of each ``caption`` call (or disables them
all, for the plain base); the entry's lock keeps an adapter from being attached or removed
while another sharer's batch runs.

A lone adapter model has nobody to share with and merges its adapter, which costs nothing per
token; an unmerged adapter adds a small matmul to every adapted layer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the pool is made where torch is not imported yet (runtime.build_models)
    import torch

    from vision_server.florence.tiers import DeviceMover

log = logging.getLogger(__name__)


def device_key(device: torch.device | str) -> str:
    """One spelling per device, so that ``cuda`` and ``cuda:0`` name the same memory.

    An index-less accelerator is the current one (``torch.cuda.current_device()``, normally 0);
    without CUDA, where nothing can be asked, it is 0. The CPU has one memory: ``cpu``.
    """
    import torch

    where = torch.device(device)
    if where.type == "cpu":
        return "cpu"
    index = where.index
    if index is None:
        index = torch.cuda.current_device() if where.type == "cuda" and torch.cuda.is_available() else 0
    return f"{where.type}:{index}"


@dataclass(frozen=True)
class BaseKey:
    """What makes two bases the same weights in the same memory (the device in one spelling)."""

    source: str  # a directory's resolved path, a hub id or a test model
    revision: str | None
    device: str
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", device_key(self.device))

    @property
    def label(self) -> str:
        """The memory part's key (see :meth:`vision_server.captioner.MemoryAware.memory_parts`)."""
        return f"base:{self.source}@{self.revision or 'main'}:{self.device}:{self.dtype}"


@dataclass
class _Attached:
    name: str
    users: set[object] = field(default_factory=set)


class SharedBase:
    """A loaded base model, the adapters attached to it, and who is using it."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model  # the transformers model; PEFT injects its layers into it in place
        self.processor = processor
        self.device = device
        self.lock = threading.RLock()
        self.users: set[object] = set()
        self.on_host = False  # parked in host memory by the warm tier
        self._peft: Any = None  # the PeftModel wrapper, while any adapter is attached
        self._adapters: dict[Path, _Attached] = {}
        self._names = itertools.count(1)

    def attach(self, adapter_dir: Path, user: object) -> str:
        """Attach the adapter in ``adapter_dir`` unmerged (once per directory); its name."""
        with self.lock:
            attached = self._adapters.get(adapter_dir)
            if attached is None:
                attached = _Attached(f"adapter{next(self._names)}")
                self._load_adapter(adapter_dir, attached.name)
                self._adapters[adapter_dir] = attached
            attached.users.add(user)
            return attached.name

    def _load_adapter(self, adapter_dir: Path, name: str) -> None:
        from peft import PeftModel

        device = str(self.device)
        with warnings.catch_warnings():  # peft reads an attribute transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.model, str(adapter_dir), adapter_name=name, torch_device=device
                )
            else:
                self._peft.load_adapter(str(adapter_dir), adapter_name=name, torch_device=device)
        self._peft.eval()

    def detach(self, adapter_dir: Path, user: object) -> None:
        """Drop ``user``'s hold on an adapter; the last one out removes its weights."""
        with self.lock:
            attached = self._adapters.get(adapter_dir)
            if attached is None:
                return
            attached.users.discard(user)
            if attached.users:
                return
            del self._adapters[adapter_dir]
            if self._adapters:
                with warnings.catch_warnings():  # "the active adapter was deleted": we set one per batch
                    warnings.simplefilter("ignore", UserWarning)
                    self._peft.delete_adapter(attached.name)
            else:  # no adapter left: put the base's own layers back, drop the wrapper
                self._peft.unload()
                self._peft = None

    def adapter_bytes(self, name: str) -> int:
        """Bytes of one attached adapter's weights."""
        from vision_server.weights import module_bytes

        with self.lock:
            if self._peft is None:
                return 0
            return module_bytes(self._peft, skip=lambda qualified: not is_adapter_tensor(qualified, name))

    @contextlib.contextmanager
    def using(self, adapter: str | None) -> Iterator[Any]:
        """The model to run, with ``adapter`` active (None: the base alone), for one batch."""
        with self.lock:
            if self._peft is None:
                yield self.model
            elif adapter is None:
                with self._peft.disable_adapter():
                    yield self.model
            else:
                self._peft.set_adapter(adapter, inference_mode=True)
                yield self.model

    def to_host(self, mover: DeviceMover) -> None:
        with self.lock:
            if not self.on_host:
                mover.to_host(self.model)
                self.on_host = True

    def to_device(self, mover: DeviceMover) -> None:
        with self.lock:
            if self.on_host:
                mover.to_device(self.model, self.device)
                self.on_host = False


def is_adapter_tensor(name: str, adapter: str | None = None) -> bool:
    """Whether a parameter name is a LoRA weight (of ``adapter``, when given)."""
    parts = name.split(".")
    for index, part in enumerate(parts[:-1]):
        if part.startswith("lora_") and (adapter is None or parts[index + 1] == adapter):
            return True
    return False


class SharedBases:
    """The server's pool of shared base models (one per server, given to every Florence captioner)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # quick bookkeeping only: memory_parts reads it on the event loop
        self._loading = threading.Lock()  # held while a base loads (seconds)
        self._members: dict[BaseKey, weakref.WeakSet[object]] = {}
        self._loaded: dict[BaseKey, SharedBase] = {}
        self._sizes: dict[BaseKey, int] = {}

    def register(self, key: BaseKey, member: object) -> None:
        """Count ``member`` among the captioners of ``key`` (for as long as it exists)."""
        with self._lock:
            self._members.setdefault(key, weakref.WeakSet()).add(member)

    def sharers(self, key: BaseKey) -> int:
        """How many registered captioners use this base."""
        with self._lock:
            members = self._members.get(key)
            return len(members) if members is not None else 0

    def acquire(self, key: BaseKey, user: object, load: Callable[[], SharedBase]) -> SharedBase:
        """The loaded base for ``key`` (``load`` runs only if nobody holds it), held by ``user``.

        A base parked in host memory by a sharer's warm tier comes back to its device first.
        """
        with self._loading:
            with self._lock:
                base = self._loaded.get(key)
            if base is None:
                base = load()
                log.debug("loaded shared base %s", key.label)  # the model's own line says it loaded
            with self._lock:
                self._loaded[key] = base
                base.users.add(user)
            return base

    def release(self, key: BaseKey, user: object) -> bool:
        """Drop ``user``'s hold; True when that was the last one and the base was let go."""
        with self._lock:
            base = self._loaded.get(key)
            if base is None:
                return False
            base.users.discard(user)
            if base.users:
                return False
            del self._loaded[key]
            log.debug("released shared base %s", key.label)
            return True

    def loaded(self, key: BaseKey) -> SharedBase | None:
        with self._lock:
            return self._loaded.get(key)

    def remember_size(self, key: BaseKey, size: int) -> None:
        self._sizes[key] = size

    def size(self, key: BaseKey) -> int | None:
        """The base's measured bytes, once any sharer has loaded it (kept after unloads)."""
        return self._sizes.get(key)
