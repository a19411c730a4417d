"""Stamp rows with the code and params that wrote them."""

from __future__ import annotations

import hashlib
import inspect
from types import ModuleType

from refinery import __version__


def code_version(*modules: ModuleType) -> str:
    """Return ``<refinery version>+<hash of the given modules' source>``.

    Deterministic across machines and clones: it hashes source text, not a commit or a clock.
    """
    h = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        h.update(module.__name__.encode())
        h.update(inspect.getsource(module).encode("utf-8"))
    return f"{__version__}+{h.hexdigest()[:10]}"
