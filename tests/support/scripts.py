"""Import a repository file that is not part of a package (a benchmark script, the ComfyUI node)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_file(path: Path, name: str, *, package: bool = False) -> ModuleType:
    """Run ``path`` as the module ``name``, registered in ``sys.modules`` first.

    Registering first matters: dataclasses (and a package's relative imports) look their module
    up there while it runs. ``package`` imports ``path`` (an ``__init__.py``) as a package whose
    submodules sit beside it, the way ComfyUI loads a custom node folder.
    """
    folder = [str(path.parent)] if package else None
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=folder)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
