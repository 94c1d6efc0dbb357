"""Load a script of the repository (bench/, deploy/) that is not a package module, as tests need it."""
from __future__ import annotations

import importlib.util
import os
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str, name: str | None = None) -> types.ModuleType:
    """The module of the file at ROOT/relative_path (e.g. "bench/fuzz_decode.py"), executed afresh;
    `name`: its module name (default: the file's stem)."""
    path = os.path.join(ROOT, relative_path)
    spec = importlib.util.spec_from_file_location(name or os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
