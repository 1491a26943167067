"""Distributions over training timesteps, with importance weights that keep the loss estimator unbiased.

If t ~ p and each example's loss is weighted by w_t = 1 / (T p_t), then E_p[w_t L_t] = (1/T) sum_t L_t: the same
objective as uniform sampling, with a lower variance when p_t ~ sqrt(E[L_t^2]) (Improved DDPM, section 3.3).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

AllGather = Callable[[torch.Tensor], torch.Tensor]
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


class TimestepSampler(ABC):
    """Base class: subclasses define :meth:`probabilities` (a float64 [T] tensor summing to 1)."""

    def __init__(self, num_timesteps: int) -> None:
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        self.num_timesteps = num_timesteps

    @abstractmethod
    def probabilities(self) -> torch.Tensor:
        """p_t for t = 0..T-1 (float64 [T], sums to 1)."""

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw t ~ p (int64 [batch_size]) and the importance weights 1 / (T p_t) (float32 [batch_size]).

        Draws on the CPU (with ``generator`` if given, which must then be a CPU generator) and moves the results to
        ``device``, so the same generator state gives the same timesteps on every device.
        """
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(dtype=torch.float32, device=device)

    def update_with_local_losses(
        self, t: torch.Tensor, losses: torch.Tensor, all_gather: AllGather | None = None
    ) -> None:
        """Record this rank's per-example losses; with ``all_gather``, every rank records every rank's losses.

        ``all_gather(tensor)`` must concatenate the tensors of all ranks along dim 0 (rank order) and be called by
        every rank. Batch sizes may differ between ranks: the sizes are gathered first, each rank pads to the largest
        batch, the padded tensors are gathered and the padding is dropped.
        """
        t = t.detach().reshape(-1)
        losses = losses.detach().reshape(-1).to(torch.float64)
        if t.numel() != losses.numel():
            raise ValueError(f"got {t.numel()} timesteps but {losses.numel()} losses")
        if all_gather is not None:
            sizes = all_gather(torch.tensor([t.numel()], dtype=torch.int64, device=t.device)).reshape(-1).tolist()
            largest = max(sizes)
            padded_t = torch.zeros(largest, dtype=torch.int64, device=t.device)
            padded_t[: t.numel()] = t
            padded_losses = torch.zeros(largest, dtype=torch.float64, device=losses.device)
            padded_losses[: losses.numel()] = losses
            all_t = all_gather(padded_t).reshape(len(sizes), largest)
            all_losses = all_gather(padded_losses).reshape(len(sizes), largest)
            t = torch.cat([row[:n] for row, n in zip(all_t, sizes, strict=True)])
            losses = torch.cat([row[:n] for row, n in zip(all_losses, sizes, strict=True)])
        self.update_with_all_losses(t.tolist(), losses.tolist())

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Update with the losses of every rank (identical arguments on every rank). No-op for static samplers."""
        return None

    def state_dict(self) -> dict:
        return {"num_timesteps": self.num_timesteps}

    def load_state_dict(self, state_dict: dict) -> None:
        if int(state_dict["num_timesteps"]) != self.num_timesteps:
            raise ValueError(
                f"timestep sampler state is for {int(state_dict['num_timesteps'])} steps, this sampler has "
                f"{self.num_timesteps}"
            )


class UniformSampler(TimestepSampler):
    """t ~ Uniform{0, ..., T-1}; every weight is 1."""

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)


class LossSecondMomentSampler(TimestepSampler):
    """Improved DDPM's importance sampling: p_t ~ sqrt(E[L_t^2]) over the last ``history_per_term`` losses.

    Uniform until every t has ``history_per_term`` recorded losses; afterwards
    p_t = (1 - uniform_prob) * sqrt(mean(L_t^2)) / sum_s sqrt(mean(L_s^2)) + uniform_prob / T.
    The history is part of :meth:`state_dict`, so resuming a run does not restart the warm-up.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = torch.zeros(num_timesteps, self.history_per_term, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up():
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        p = self.loss_history.pow(2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        if len(ts) != len(losses):
            raise ValueError(f"got {len(ts)} timesteps but {len(losses)} losses")
        for t, loss in zip(ts, losses, strict=True):
            t = int(t)
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.num_timesteps})")
            count = int(self.loss_counts[t])
            if count == self.history_per_term:
                # Full: drop the oldest loss, append the newest.
                self.loss_history[t, :-1] = self.loss_history[t, 1:].clone()
                self.loss_history[t, -1] = float(loss)
            else:
                self.loss_history[t, count] = float(loss)
                self.loss_counts[t] = count + 1

    def state_dict(self) -> dict:
        return {
            "num_timesteps": self.num_timesteps,
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "loss_history": self.loss_history.clone(),
            "loss_counts": self.loss_counts.clone(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        history = torch.as_tensor(state_dict["loss_history"], dtype=torch.float64)
        counts = torch.as_tensor(state_dict["loss_counts"], dtype=torch.int64)
        expected = (self.num_timesteps, int(state_dict["history_per_term"]))
        if tuple(history.shape) != expected or tuple(counts.shape) != (self.num_timesteps,):
            raise ValueError(
                f"bad loss-second-moment state: loss_history {tuple(history.shape)} (expected {expected}), "
                f"loss_counts {tuple(counts.shape)} (expected ({self.num_timesteps},))"
            )
        self.history_per_term = expected[1]
        self.uniform_prob = float(state_dict["uniform_prob"])
        self.loss_history = history.clone()
        self.loss_counts = counts.clone()


def create_timestep_sampler(name: str, num_timesteps: int) -> TimestepSampler:
    """"uniform" -> :class:`UniformSampler`; "loss-second-moment" -> :class:`LossSecondMomentSampler`."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; allowed: {', '.join(TIMESTEP_SAMPLERS)}")
