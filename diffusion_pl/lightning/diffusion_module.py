"""DiffusionModule: trains an ADM UNetModel with the Improved DDPM / ADM objective.

Every constructor argument is a config key (``model.init_args.<name>`` in the YAML) and a plain type, so
``DiffusionModule.load_from_checkpoint(path)`` rebuilds the network from the checkpoint alone (weights_only loading).
The network settings are the UNetModel arguments with the same names; ``learn_sigma`` and ``out_channels`` follow
from ``var_type``, so they cannot disagree with the diffusion process.

A checkpoint written while lightning's EMAWeightAveraging callback is active holds the EMA weights in ``state_dict``
(what ``load_from_checkpoint`` loads) and the raw weights in ``current_model_state`` (used to resume training).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from diffusion_pl.data.resumable import sync_sampler_epoch
from diffusion_pl.diffusion import LossSecondMomentSampler, check_schedule, create_diffusion, create_timestep_sampler
from diffusion_pl.errors import UserInputError
from diffusion_pl.lightning.checkpoints import apply_optimizer_settings, check_checkpoint_fits, load_kwargs
from diffusion_pl.lightning.common import (
    base_seed,
    derive_seed,
    lr_factor,
    make_all_gather,
    network_from_hparams,
    quartile_means,
    reseed_for_epoch,
    reseed_for_step,
)
from diffusion_pl.lightning.init_weights import init_network_from, setup_for_data
from diffusion_pl.models import UNetModel
from diffusion_pl.utils.device import prepare_device

SAMPLER_STATE_KEY = "diffusion_pl_timestep_sampler"
SEED_KEY = "diffusion_pl_seed"


class DiffusionModule(L.LightningModule):
    """ADM / Improved DDPM diffusion model.

    Network (UNetModel arguments): image_size .. norm_groups; attention_resolutions are image resolutions;
    channel_mult None = the paper default for image_size; norm_groups 32 as every released model (fewer for narrow
    networks: with one channel per group the network cannot represent an image's mean brightness).
    Conditioning: class_cond with num_classes labels; null_class adds the extra label index num_classes used by
    classifier-free guidance, and p_uncond replaces a training label by it with that probability.
    Diffusion: diffusion_steps (T), noise_schedule, mean_type, var_type, loss_type, rescale_learned_sigmas (hybrid vb
    weight T/1000), rescale_timesteps, timestep_sampler ("uniform" or Improved DDPM's "loss-second-moment").
    Optimiser: AdamW(lr, betas, weight_decay) on all parameters; linear warm-up over warmup_steps; with anneal_lr
    the lr decays linearly to 0 at trainer.max_steps.
    Validation: the loss on the validation split with fixed noise and timesteps per batch (EMA weights when
    EMAWeightAveraging is a callback); with val_bpd_batches > 0, also bits/dim on that many batches with the
    full process (val_bpd_respacing "") or a respaced one (e.g. "100", faster, a looser bound).
    Starting point: init_from, a DiffusionModule checkpoint or a released OpenAI U-Net .pt whose weights initialise
    the network (weights only: optimizer, schedule and step count start fresh; lightning/init_weights.py lists the
    class-embedding adaptations: null class added, other class count, conditional -> unconditional). The file is read
    when the module is built, so EMAWeightAveraging's average (copied at setup) holds these weights until its first
    update; load_from_checkpoint does not read it.
    Resuming (``--ckpt_path``) may change the RESUME_CHANGEABLE_HPARAMS (training settings; a changed lr, betas or
    weight_decay is applied to the restored optimizer); the other arguments must equal the checkpoint's.
    """

    RESUME_CHANGEABLE_HPARAMS = frozenset({
        "fused_norm",
        "dropout", "use_checkpoint", "p_uncond", "loss_type", "rescale_learned_sigmas", "lr", "weight_decay", "betas",
        "warmup_steps", "anneal_lr", "val_bpd_batches", "val_bpd_respacing", "val_clip_denoised", "init_from",
    })  # fmt: skip

    def __init__(
        self,
        # --- network (UNetModel) ---
        image_size: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        num_res_blocks: int = 2,
        attention_resolutions: tuple[int, ...] = (16, 8),
        dropout: float = 0.0,
        channel_mult: tuple[int, ...] | None = None,
        conv_resample: bool = True,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
        norm_groups: int = 32,
        fused_norm: bool | None = None,
        # --- conditioning ---
        class_cond: bool = False,
        num_classes: int = 1000,
        null_class: bool = False,
        p_uncond: float = 0.0,
        # --- diffusion ---
        diffusion_steps: int = 1000,
        noise_schedule: Literal["linear", "cosine"] = "cosine",
        mean_type: Literal["epsilon", "start_x", "previous_x"] = "epsilon",
        var_type: Literal["fixed_small", "fixed_large", "learned", "learned_range"] = "learned_range",
        loss_type: Literal["simple", "hybrid", "kl"] = "hybrid",
        rescale_learned_sigmas: bool = False,
        rescale_timesteps: bool = False,
        timestep_sampler: Literal["uniform", "loss-second-moment"] = "uniform",
        # --- optimiser ---
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        anneal_lr: bool = False,
        # --- validation ---
        val_bpd_batches: int = 0,
        val_bpd_respacing: str = "",
        val_clip_denoised: bool = True,
        # --- starting point ---
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= p_uncond < 1.0:
            raise UserInputError(f"model.init_args.p_uncond must be in [0, 1), got {p_uncond}")
        if p_uncond > 0 and not (class_cond and null_class):
            raise UserInputError(
                f"model.init_args.p_uncond = {p_uncond} drops labels to the null class, which needs "
                f"class_cond: true and null_class: true (got class_cond={class_cond}, null_class={null_class})"
            )
        if null_class and not class_cond:
            raise UserInputError("model.init_args.null_class: true needs class_cond: true")
        # The process lives on the CPU in float64 even when the module is built under torch.device("meta").
        with torch.device("cpu"):
            self.diffusion = create_diffusion(
                diffusion_steps=diffusion_steps,
                noise_schedule=noise_schedule,
                mean_type=mean_type,
                var_type=var_type,
                loss_type=loss_type,
                rescale_learned_sigmas=rescale_learned_sigmas,
                rescale_timesteps=rescale_timesteps,
            )
            self.timestep_sampler = create_timestep_sampler(timestep_sampler, diffusion_steps)
        if val_bpd_batches < 0:
            raise UserInputError(f"model.init_args.val_bpd_batches must be >= 0, got {val_bpd_batches}")
        check_schedule(self.diffusion, val_bpd_respacing, option="model.init_args.val_bpd_respacing")
        self.unet = network_from_hparams(
            UNetModel, self.hparams, out_channels=in_channels, num_classes=num_classes if class_cond else None,
            learn_sigma=self.diffusion.learns_variance,
        )  # fmt: skip
        self._init_class_rows = None  # the init_from checkpoint's class rows, matched to the data's names in setup
        if init_from is not None and not self.unet.input_conv.weight.is_meta:
            self._init_class_rows = init_network_from(self.unet, init_from, "DiffusionModule", self.hparams)
        self.seed = base_seed()
        self._last_batch_start: float | None = None
        self._final_raw_state: dict[str, torch.Tensor] | None = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> DiffusionModule:
        """Lightning's load_from_checkpoint without reading ``init_from`` again (the checkpoint has the weights); a
        checkpoint with hyperparameters under an old name (``steps``) loads as with the current one."""
        return super().load_from_checkpoint(checkpoint_path, *args, **load_kwargs(checkpoint_path, kwargs))

    # ------------------------------------------------------------------------------------------------ model
    @property
    def null_label(self) -> int | None:
        """The label index of the null class (classifier-free guidance), or None."""
        return self.hparams.num_classes if self.hparams.null_class else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network's output in float32 (also under autocast): [N, C or 2C, H, W]."""
        return self.unet(x, t, y=y).float()

    def _model_kwargs(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": y} if self.hparams.class_cond else {}

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        prepare_device(self.trainer.strategy.root_device)  # setup runs before the model is moved there
        hp = self.hparams
        expected = {"image_size": (hp.image_size, "image_size"), "in_channels": (hp.in_channels, "in_channels")}
        if hp.class_cond:
            expected["num_classes"] = (hp.num_classes, "num_classes")
        setup_for_data(self, self.unet, expected, "DiffusionModule", stage)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        anneal_steps = self._anneal_steps() if hp.anneal_lr else None
        warmup = hp.warmup_steps
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, warmup, anneal_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _anneal_steps(self) -> int:
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            raise UserInputError(
                "model.init_args.anneal_lr: true decays the lr to 0 at trainer.max_steps: set trainer.max_steps"
            )
        return int(max_steps)

    # ------------------------------------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        reseed_for_epoch(self.seed, self.current_epoch, self.global_rank)
        sync_sampler_epoch(self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        reseed_for_step(self.seed, self.global_step, self.global_rank)
        now = time.perf_counter()
        if self._last_batch_start is not None:
            images = batch[0].shape[0] * self.trainer.world_size
            self.log("train/images_per_sec", images / max(now - self._last_batch_start, 1e-9), batch_size=1)
        self._last_batch_start = now

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        n = x.shape[0]
        t, weights = self.timestep_sampler.sample(n, device=x.device)
        if self.hparams.class_cond and self.hparams.p_uncond > 0:
            drop = torch.rand(n, device=x.device) < self.hparams.p_uncond
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        losses = self.diffusion.training_losses(self, x, t, model_kwargs=self._model_kwargs(y))
        loss = (losses["loss"] * weights).mean()

        if isinstance(self.timestep_sampler, LossSecondMomentSampler):
            self.timestep_sampler.update_with_local_losses(t, losses["loss"].detach(), all_gather=make_all_gather(self))

        # ADM's log_loss_dict: importance-weighted terms, overall and per timestep quartile.
        for key in ("loss", "mse", "vb"):
            weighted = losses[key].detach() * weights
            self.log(f"train/{key}", weighted.mean(), prog_bar=key == "loss", batch_size=n)
            for q, value in quartile_means(weighted, t, self.diffusion.num_timesteps).items():
                self.log(f"train/{key}_q{q}", value, batch_size=n)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return loss

    def on_train_epoch_end(self) -> None:
        # Lightning's WeightAveraging copies the EMA weights into the module in on_train_end, and ModelCheckpoint
        # (save_last) may write its final last.ckpt after that: keep the raw weights of the last step so that file's
        # "current_model_state" (what resuming continues from) stays the raw weights, not the EMA ones.
        if self._training_ends():
            self._final_raw_state = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def _training_ends(self) -> bool:
        trainer = self.trainer
        if trainer.should_stop:
            return True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            return True
        max_epochs = trainer.max_epochs
        return max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1

    def on_train_start(self) -> None:
        self._final_raw_state = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called after backward and gradient unscaling, before gradient clipping.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, norm_type=2.0), batch_size=1)

    # ------------------------------------------------------------------------------------------------ validation
    def _eval_generator(self, batch_idx: int) -> torch.Generator:
        # Fixed per batch (and rank), so validation losses are comparable across epochs.
        return torch.Generator(device=self.device).manual_seed(derive_seed(0, batch_idx, self.global_rank))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _bpd_process(self):
        spec = self.hparams.val_bpd_respacing
        if not spec:
            return self.diffusion
        if getattr(self, "_respaced_bpd", (None, None))[0] != spec:
            self._respaced_bpd = (spec, self.diffusion.respaced(spec))
        return self._respaced_bpd[1]

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, prefix: str) -> None:
        x, y = batch
        n = x.shape[0]
        generator = self._eval_generator(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator, device=self.device)
        noise = torch.randn(x.shape, generator=generator, device=self.device, dtype=x.dtype)
        kwargs = self._model_kwargs(y)
        losses = self.diffusion.training_losses(self, x, t, noise=noise, model_kwargs=kwargs)
        for key in ("loss", "mse", "vb"):
            self.log(f"{prefix}/{key}", losses[key].mean(), prog_bar=key == "loss", sync_dist=True, batch_size=n)
        if batch_idx < self.hparams.val_bpd_batches:
            out = self._bpd_process().calc_bpd_loop(
                self, x, clip_denoised=self.hparams.val_clip_denoised, model_kwargs=kwargs, generator=generator
            )
            self.log(f"{prefix}/bpd", out["total_bpd"].mean(), prog_bar=True, sync_dist=True, batch_size=n)
            self.log(f"{prefix}/prior_bpd", out["prior_bpd"].mean(), sync_dist=True, batch_size=n)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[SAMPLER_STATE_KEY] = self.timestep_sampler.state_dict()
        checkpoint[SEED_KEY] = self.seed
        if self._final_raw_state is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._final_raw_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(self, checkpoint, self.RESUME_CHANGEABLE_HPARAMS)
        apply_optimizer_settings(self, checkpoint)
        if SAMPLER_STATE_KEY in checkpoint:
            self.timestep_sampler.load_state_dict(checkpoint[SAMPLER_STATE_KEY])
        if SEED_KEY in checkpoint:
            self.seed = int(checkpoint[SEED_KEY])
