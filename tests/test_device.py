"""Device preparation: denormal floats are flushed to zero on the CPU (arithmetic on them is orders of magnitude
slower); devices the float64 schedule cannot live on (Apple MPS) are refused with the fix."""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.diffusion import create_diffusion
from diffusion_pl.errors import UserInputError
from diffusion_pl.models import UNetModel
from diffusion_pl.sampling import SampleEngine
from diffusion_pl.utils import device as device_utils


def test_flush_denormals_turns_them_into_zero():
    torch.set_flush_denormal(False)
    try:
        tiny = torch.tensor([1e-39], dtype=torch.float32)
        assert (tiny * 1.0).item() != 0.0  # a denormal survives by default
        assert device_utils.flush_denormals("cpu") is True
        assert (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0
        assert (torch.tensor([1e-30], dtype=torch.float32) * 1.0).item() > 0  # small normal numbers are kept
        assert device_utils.flush_denormals("meta") is False
    finally:
        torch.set_flush_denormal(True)


def test_sampling_engine_on_cpu_flushes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: calls.append(mode) or True)
    net = UNetModel(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1,),
                    attention_resolutions=(), num_head_channels=32)  # fmt: skip
    SampleEngine(net, create_diffusion(diffusion_steps=10, var_type="fixed_small", loss_type="simple"), (1, 8, 8))
    assert calls == [True]


def test_mps_is_refused_with_the_fix():
    """The schedule is float64 (as in the reference); MPS has no float64, so it is refused up front, with the fix."""
    message = r"Apple MPS devices are not supported: .*float64.*--trainer.accelerator=cpu"
    with pytest.raises(UserInputError, match=message):
        device_utils.prepare_device(torch.device("mps"))
    for device in ("cpu", "cuda", torch.device("cuda", 1)):
        device_utils.check_device_supported(device)  # no error (a CUDA device is only named here, not used)
