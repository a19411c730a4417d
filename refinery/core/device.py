"""Pick the torch device a role runs on (params: ``device: auto | cpu | cuda | mps``) and say which one was used."""

from __future__ import annotations

from typing import Any, Literal

from refinery.core.errors import RefineryError

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]


def _available(torch: Any) -> dict[str, bool]:
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    return {"cuda": bool(torch.cuda.is_available()), "mps": bool(mps is not None and mps.is_available())}


def resolve_device(choice: str, where: str, torch: Any = None) -> str:
    """Return the torch device string for a params choice.

    ``auto`` takes CUDA when torch sees a CUDA device, else Apple's MPS, else the CPU; ``cuda`` and ``mps`` must
    be present.

    Args:
        choice: auto | cpu | cuda | mps (``cuda:1`` names one CUDA device).
        where: the params key, for the error (``train.device``).
        torch: the torch module (tests pass a stand-in); None imports it.

    Raises:
        RefineryError: one line naming ``where`` when the device asked for is absent or unknown.
    """
    if torch is None:
        import torch
    kind = choice.split(":", 1)[0]
    found = _available(torch)
    if kind == "auto":
        return "cuda" if found["cuda"] else "mps" if found["mps"] else "cpu"
    if kind == "cpu":
        return "cpu"
    if kind in found:
        if not found[kind]:
            build = getattr(getattr(torch, "version", None), "cuda", None)
            detail = f"torch {getattr(torch, '__version__', '?')}" + (" (a CPU build)" if kind == "cuda" and not build
                                                                      else "")
            raise RefineryError(f"{where}: '{choice}' asked for, but {detail} sees no {kind.upper()} device "
                                f"(set {where}: auto or cpu)")
        return choice
    raise RefineryError(f"{where}: unknown device '{choice}' (use auto, cpu, cuda or mps)")


def device_of(model: Any) -> str:
    """Return the device a model's parameters actually live on (what provenance records)."""
    try:
        return str(next(model.parameters()).device)
    except (StopIteration, AttributeError):
        return "cpu"
