"""Stamp rows with the code and params that wrote them."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from refinery import __version__


def code_version(stage: ModuleType | str) -> str:
    """Return ``<refinery version>+<hash of the stage's code>``: the combined AST hash of its import closure.

    Comments, docstrings and formatting change nothing; any change to the code the stage can import does
    (:mod:`refinery.core.codehash`). The hash is the one ``refinery fingerprint`` writes for the stage.

    Args:
        stage: the stage module (``sys.modules[__name__]``, also when run as ``python -m`` or as a script), or
            its dotted module name.
    """
    from refinery.core.codehash import code_modules, combined_hash, module_name, project_root

    if isinstance(stage, ModuleType):
        stage = module_name(Path(stage.__file__), project_root())
    return f"{__version__}+{combined_hash(code_modules(stage))[:10]}"
