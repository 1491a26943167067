"""The diffusion process of a released OpenAI checkpoint: the --arch preset's, each option overriding it."""

from diffusion_pl.commands.common import openai_process
from diffusion_pl.commands.options import ModelSource
from diffusion_pl.models import RELEASED_CONFIGS, RELEASED_PROCESS


def test_a_preset_brings_its_process():
    assert openai_process(ModelSource(openai_ckpt="x.pt", arch="iddpm_cifar10")) == (4000, "cosine", True)
    assert openai_process(ModelSource(openai_ckpt="x.pt", arch="adm_imagenet256")) == (1000, "linear", False)
    assert openai_process(ModelSource(openai_ckpt="x.pt", arch="iddpm_imagenet64_cond")) == (4000, "cosine", False)


def test_each_option_overrides_the_preset_alone():
    source = ModelSource(openai_ckpt="x.pt", arch="iddpm_cifar10", diffusion_steps=1000)
    assert openai_process(source) == (1000, "cosine", True)
    source = ModelSource(openai_ckpt="x.pt", arch="iddpm_cifar10", rescale_timesteps=False, noise_schedule="linear")
    assert openai_process(source) == (4000, "linear", False)


def test_a_yaml_arch_gets_the_adm_64_process():
    assert openai_process(ModelSource(openai_ckpt="x.pt", arch="my_unet.yaml")) == (1000, "cosine", False)


def test_every_released_diffusion_network_has_its_process():
    diffusion_presets = {name for name, (cls, _, _) in RELEASED_CONFIGS.items() if cls.__name__ == "UNetModel"}
    assert set(RELEASED_PROCESS) == diffusion_presets
