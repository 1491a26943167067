"""NoisyClassifierModule: trains ADM's noisy classifier p(y | x_t, t) for classifier guidance.

x_t ~ q(x_t | x_0) with t uniform in [t_min, t_max) (default: all T steps) of the SAME process the guided diffusion
model uses: ``diffusion_steps`` (T), ``noise_schedule`` and ``rescale_timesteps`` are hyperparameters stored in the
checkpoint so a sampler can refuse an incompatible classifier. Every constructor argument is a plain-typed config key:
``NoisyClassifierModule.load_from_checkpoint(path)`` needs nothing else.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from diffusion_pl.data.resumable import sync_sampler_epoch
from diffusion_pl.diffusion import create_diffusion
from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning.checkpoints import apply_optimizer_settings, check_checkpoint_fits, load_kwargs
from diffusion_pl.lightning.common import (
    base_seed,
    derive_seed,
    lr_factor,
    network_from_hparams,
    quartile_means,
    reseed_for_epoch,
    reseed_for_step,
)
from diffusion_pl.lightning.init_weights import init_network_from, setup_for_data
from diffusion_pl.models import EncoderUNetModel
from diffusion_pl.utils.device import prepare_device

SEED_KEY = "diffusion_pl_seed"


class NoisyClassifierModule(L.LightningModule):
    """ADM noisy classifier (EncoderUNetModel) trained with cross-entropy on noised images.

    Network: the EncoderUNetModel arguments (out_channels = number of classes). Process: diffusion_steps (T),
    noise_schedule and rescale_timesteps must match the diffusion model to be guided. t ~ Uniform{t_min, ...,
    t_max - 1} (t_max None = T). Optimiser: AdamW(lr, betas, weight_decay), linear warm-up, optional linear decay
    to 0 at trainer.max_steps (anneal_lr, as ADM's classifier recipe). Validation noises with fixed per-batch noise.
    init_from: a NoisyClassifierModule checkpoint or a released OpenAI classifier .pt whose weights initialise the
    network (weights only; another class count re-initialises the output layer, see lightning/init_weights.py).
    Resuming (``--ckpt_path``) may change the RESUME_CHANGEABLE_HPARAMS (training settings; a changed lr, betas or
    weight_decay is applied to the restored optimizer); the other arguments must equal the checkpoint's.
    """

    RESUME_CHANGEABLE_HPARAMS = frozenset({
        "fused_norm",
        "dropout", "use_checkpoint", "t_min", "t_max", "lr", "weight_decay", "betas", "warmup_steps", "anneal_lr",
        "init_from",
    })  # fmt: skip

    def __init__(
        self,
        # --- network (EncoderUNetModel) ---
        image_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = 1000,
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        dropout: float = 0.0,
        channel_mult: tuple[int, ...] | None = None,
        conv_resample: bool = True,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
        fused_norm: bool | None = None,
        pool: Literal["attention", "adaptive"] = "attention",
        # --- the diffusion process it guides ---
        diffusion_steps: int = 1000,
        noise_schedule: Literal["linear", "cosine"] = "cosine",
        rescale_timesteps: bool = False,
        t_min: int = 0,
        t_max: int | None = None,
        # --- optimiser ---
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        anneal_lr: bool = False,
        # --- starting point ---
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        upper = diffusion_steps if t_max is None else t_max
        if not 0 <= t_min < upper <= diffusion_steps:
            raise UserInputError(
                f"model.init_args.t_min = {t_min}, t_max = {t_max}: need 0 <= t_min < t_max <= diffusion_steps = "
                f"{diffusion_steps}"
            )
        with torch.device("cpu"):
            # Only q(x_t | x_0) is used; mean/var/loss types do not matter for noising.
            self.diffusion = create_diffusion(
                diffusion_steps=diffusion_steps, noise_schedule=noise_schedule, var_type="fixed_small",
                loss_type="simple", rescale_timesteps=rescale_timesteps,
            )  # fmt: skip
        self.classifier = network_from_hparams(EncoderUNetModel, self.hparams)
        self._init_class_rows = None  # the init_from checkpoint's class rows, matched to the data's names in setup
        if init_from is not None and not self.classifier.input_conv.weight.is_meta:
            self._init_class_rows = init_network_from(self.classifier, init_from, "NoisyClassifierModule", self.hparams)
        self.t_min, self.t_max = t_min, upper
        self.seed = base_seed()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> NoisyClassifierModule:
        """Lightning's load_from_checkpoint without reading ``init_from`` again (the checkpoint has the weights); a
        checkpoint with hyperparameters under an old name (``steps``) loads as with the current one."""
        return super().load_from_checkpoint(checkpoint_path, *args, **load_kwargs(checkpoint_path, kwargs))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, out_channels] of x_t at timesteps t as the diffusion model sees them (rescaled if set).

        This is the callable classifier guidance takes (diffusion_pl.diffusion.classifier_cond_fn).
        """
        return self.classifier(x, t).float()

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input the diffusion model (and so this classifier) sees: t, or t * 1000 / T if rescaled."""
        return t.float() * (1000.0 / self.hparams.diffusion_steps) if self.hparams.rescale_timesteps else t

    def setup(self, stage: str) -> None:
        prepare_device(self.trainer.strategy.root_device)  # setup runs before the model is moved there
        hp = self.hparams
        expected = {
            "image_size": (hp.image_size, "image_size"),
            "in_channels": (hp.in_channels, "in_channels"),
            "num_classes": (hp.out_channels, "out_channels"),
        }
        setup_for_data(self, self.classifier, expected, "NoisyClassifierModule", stage)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        anneal_steps = None
        if hp.anneal_lr:
            if not self.trainer.max_steps or self.trainer.max_steps <= 0:
                raise UserInputError("model.init_args.anneal_lr: true decays the lr to 0 at trainer.max_steps: set it")
            anneal_steps = int(self.trainer.max_steps)
        warmup = hp.warmup_steps
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, warmup, anneal_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _noised(self, x: torch.Tensor, generator: torch.Generator | None = None):
        n = x.shape[0]
        t = torch.randint(self.t_min, self.t_max, (n,), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_t = self.diffusion.q_sample(x, t, noise=noise)
        return x_t, t

    def _step(self, batch, prefix: str, generator: torch.Generator | None = None) -> torch.Tensor:
        x, y = batch
        x_t, t = self._noised(x, generator)
        logits = self(x_t, self.model_timesteps(t))
        losses = F.cross_entropy(logits, y, reduction="none")
        correct = (logits.argmax(dim=-1) == y).float()
        n = x.shape[0]
        sync = prefix != "train"
        self.log(f"{prefix}/loss", losses.mean(), prog_bar=True, sync_dist=sync, batch_size=n)
        self.log(f"{prefix}/acc", correct.mean(), prog_bar=True, sync_dist=sync, batch_size=n)
        if prefix == "train":  # per-quartile values are absent from some batches: never synced across ranks
            for name, values in (("loss", losses), ("acc", correct)):
                for q, value in quartile_means(values, t, self.diffusion.num_timesteps).items():
                    self.log(f"{prefix}/{name}_q{q}", value, batch_size=n)
            self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return losses.mean()

    def on_train_epoch_start(self) -> None:
        reseed_for_epoch(self.seed, self.current_epoch, self.global_rank)
        sync_sampler_epoch(self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        reseed_for_step(self.seed, self.global_step, self.global_rank)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(0, batch_idx, self.global_rank))
        self._step(batch, "val", generator)

    def test_step(self, batch, batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(0, batch_idx, self.global_rank))
        self._step(batch, "test", generator)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, norm_type=2.0), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SEED_KEY] = self.seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, self.RESUME_CHANGEABLE_HPARAMS)
        apply_optimizer_settings(self, checkpoint)
        if SEED_KEY in checkpoint:
            self.seed = int(checkpoint[SEED_KEY])
