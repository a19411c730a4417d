"""device: auto | cpu | cuda | mps per role: resolved honestly, refused clearly when absent, recorded as used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from refinery.core.device import device_of, resolve_device
from refinery.core.errors import RefineryError


def fake_torch(cuda: bool, mps: bool):
    return SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: cuda), __version__="2.13.0+cpu",
                           version=SimpleNamespace(cuda=None),
                           backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps)))


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, False, "cuda"), (False, True, "mps"),
                                                        (False, False, "cpu"), (True, True, "cuda")])
def test_auto_takes_cuda_then_mps_then_cpu(cuda, mps, expected):
    assert resolve_device("auto", "train.device", fake_torch(cuda, mps)) == expected


def test_an_absent_device_is_refused_naming_the_key():
    with pytest.raises(RefineryError, match=r"train.device: 'cuda' asked for, but torch 2.13.0\+cpu \(a CPU build\) "
                                            r"sees no CUDA device \(set train.device: auto or cpu\)"):
        resolve_device("cuda", "train.device", fake_torch(False, False))
    with pytest.raises(RefineryError, match="evaluate.device: unknown device 'tpu'"):
        resolve_device("tpu", "evaluate.device", fake_torch(False, False))
    assert resolve_device("cuda:1", "train.device", fake_torch(True, False)) == "cuda:1"
    assert resolve_device("cpu", "train.device", fake_torch(True, True)) == "cpu"


def test_the_recorded_device_is_where_the_parameters_are():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(2, 2)
    assert device_of(model) == "cpu"
    assert resolve_device("auto", "train.device") == ("cuda" if torch.cuda.is_available() else
                                                      "mps" if torch.backends.mps.is_available() else "cpu")


def test_params_accept_only_known_devices():
    from pydantic import ValidationError

    from refinery.training.evaluation import EvaluateParams

    base = {"max_new_tokens": 8, "batch_size": 2, "threads": 1, "bertscore_layers": 2, "bertscore_batch_size": 2,
            "factual_min_facts": 1}
    assert EvaluateParams.model_validate({**base, "device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(ValidationError, match="device"):
        EvaluateParams.model_validate({**base, "device": "gpu"})
