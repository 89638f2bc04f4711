"""The settings ``vision-server train`` shares with ``serve`` and ``caption``: the base model, its
hub revision, the device and the cache dir, read from the same sources as theirs (flag >
``VISION_SERVER_*`` variable > config file > default), so a run trains the model the server
serves, from the same cache, on the same device.

The rest of the server's settings do not apply: ``dtype`` is the dtype captions are generated in,
not a training precision (``--precision`` is train's own: the LoRA trains in fp32 under bf16 or
fp16 autocast, and serve's float16 default on CUDA would be a worse choice than bf16 there);
an ``adapter`` (or ``SOURCE+ADAPTER_DIR``) serves on top of the model, and the run trains a new
one on the model alone; ``backend`` is Florence-2 here always; the rest is about serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision_server.model_specs import ModelSpec, parse_model_spec
from vision_server.settings import SettingsError, flag_name, load_settings

SHARED = ("model", "revision", "device", "cache_dir")


@dataclass(frozen=True)
class SharedSettings:
    model: str
    revision: str | None
    device: str
    cache_dir: Path
    # Where each was set when that was not the default ("model in /etc/vision-server/config.toml").
    sources: dict[str, str] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """As :class:`~vision_server.train.options.TrainOptions` takes them."""
        return {name: getattr(self, name) for name in SHARED}

    def set_elsewhere(self) -> str:
        """``model set by VISION_SERVER_MODEL, ...`` for those not set on the command line: a
        model that cannot be loaded is found faster when the message says where it came from."""
        return ", ".join(
            f"{name} set by {source}"
            for name, source in self.sources.items()
            if name in SHARED and not source.startswith("--")
        )


def shared_settings(
    flags: Mapping[str, Any], *, environ: Mapping[str, str], config_path: Path | None
) -> SharedSettings:
    """The shared settings from ``flags`` (None: not given), the environment and the config
    file (``config_path``, ``VISION_SERVER_CONFIG`` or the default one when present). Raises
    :class:`~vision_server.settings.SettingsError` naming the setting and where it was set, as
    ``serve`` does: a bad value anywhere in the file stops train as it would stop the server."""
    given = {name: flags[name] for name in ("model", "device", "cache_dir") if flags.get(name) is not None}
    if "model" in given:
        spec = _spec(given["model"])
        if spec.adapter is not None:
            raise SettingsError(
                f"model {given['model']}: train makes a new adapter for a base model; "
                f"give the model alone ({spec.source}), without +{spec.adapter}",
                setting="model",
                source=flag_name("model"),
            )
        given["model"] = (given["model"],)  # one model, even with a comma in its path
    settings = load_settings(given, environ=environ, config_path=config_path)
    model = settings.default_model_spec
    revision = flags.get("revision") or model.revision  # the flag wins over a NAME:REVISION entry
    sources = dict(settings.sources)
    if flags.get("revision"):
        sources["revision"] = flag_name("revision")
    elif model.revision is None:
        sources.pop("revision", None)
    elif f"revision:{model.name}" in sources:  # the model's own NAME:REVISION entry
        sources["revision"] = sources[f"revision:{model.name}"]
    return SharedSettings(model.source, revision, settings.device, settings.cache_dir, sources)


def _spec(text: str) -> ModelSpec:
    try:
        return parse_model_spec(text)
    except ValueError as exc:
        raise SettingsError(str(exc), setting="model", source=flag_name("model")) from None
