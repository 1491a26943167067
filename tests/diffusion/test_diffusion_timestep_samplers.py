import threading

import numpy as np
import pytest
import torch
from guided_diffusion import resample

from diffusion_pl.diffusion import LossSecondMomentSampler, UniformSampler, create_timestep_sampler


class _FakeDiffusion:
    def __init__(self, num_timesteps):
        self.num_timesteps = num_timesteps


def _fill(sampler, T, rounds=12, seed=0):
    rng = np.random.default_rng(seed)
    ts, losses = [], []
    for _ in range(rounds):
        for t in range(T):
            ts.append(t)
            losses.append(float(rng.uniform(0.1, 2.0) * (t + 1)))
    sampler.update_with_all_losses(ts, losses)
    return ts, losses


def test_uniform_sampler():
    sampler = UniformSampler(10)
    t, w = sampler.sample(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and w.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 9 and len(set(t.tolist())) == 10
    assert torch.equal(w, torch.ones(1000))


def test_loss_second_moment_uniform_until_warm(monkeypatch):
    sampler = LossSecondMomentSampler(5)
    sampler.update_with_all_losses([0, 1, 2, 3] * 10, [1.0] * 40)  # t = 4 has no history yet
    assert not sampler.warmed_up()
    torch.testing.assert_close(sampler.probabilities(), torch.full((5,), 0.2, dtype=torch.float64))
    sampler.update_with_all_losses([4] * 9, [1.0] * 9)
    assert not sampler.warmed_up()
    sampler.update_with_all_losses([4], [5.0])
    assert sampler.warmed_up()


def test_loss_second_moment_matches_reference(monkeypatch):
    monkeypatch.setattr(np, "int", int, raising=False)
    T = 8
    ours = LossSecondMomentSampler(T)
    ref = resample.LossSecondMomentResampler(_FakeDiffusion(T))
    ts, losses = _fill(ours, T, rounds=13)
    ref.update_with_all_losses(ts, losses)
    np.testing.assert_allclose(ours.probabilities().numpy(), ref.weights(), rtol=1e-12)
    np.testing.assert_allclose(ours.loss_history.numpy(), ref._loss_history, rtol=0)
    # Closed form: p ∝ sqrt(mean of the last 10 squared losses), mixed with 0.001 uniform.
    history = torch.tensor(losses, dtype=torch.float64).view(13, T).T[:, -10:]
    p = history.pow(2).mean(1).sqrt()
    p = p / p.sum() * 0.999 + 0.001 / T
    torch.testing.assert_close(ours.probabilities(), p)


def test_importance_weights_make_the_estimator_unbiased():
    T = 6
    sampler = LossSecondMomentSampler(T)
    _fill(sampler, T)
    p = sampler.probabilities()
    t, w = sampler.sample(500, "cpu", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w, (1.0 / (T * p[t])).float())
    # E_p[w_t L_t] = sum_t p_t w_t L_t = mean_t L_t, exactly.
    weights_all = 1.0 / (T * p)
    L = torch.arange(1.0, T + 1, dtype=torch.float64) ** 2
    torch.testing.assert_close((p * weights_all * L).sum(), L.mean())
    # High-loss steps are sampled more often.
    counts = torch.bincount(t, minlength=T)
    assert counts[-1] > counts[0]


def test_state_dict_round_trip_gives_same_draws(tmp_path):
    T = 7
    a = LossSecondMomentSampler(T)
    _fill(a, T, rounds=11, seed=3)
    path = tmp_path / "sampler.pt"
    torch.save(a.state_dict(), path)
    b = LossSecondMomentSampler(T)
    b.load_state_dict(torch.load(path, weights_only=True))
    assert b.warmed_up()
    ta, wa = a.sample(64, "cpu", generator=torch.Generator().manual_seed(9))
    tb, wb = b.sample(64, "cpu", generator=torch.Generator().manual_seed(9))
    assert torch.equal(ta, tb) and torch.equal(wa, wb)
    # The history keeps evolving identically after the reload.
    a.update_with_all_losses([0, 1], [100.0, 3.0])
    b.update_with_all_losses([0, 1], [100.0, 3.0])
    torch.testing.assert_close(a.probabilities(), b.probabilities(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="for 7 steps"):
        LossSecondMomentSampler(8).load_state_dict(a.state_dict())


class _ThreadAllGather:
    """A real collective between threads: every rank contributes, every rank receives the concatenation."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size
        self.shapes = []

    def for_rank(self, rank):
        def all_gather(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            if rank == 0:
                self.shapes.append([tuple(s.shape) for s in self.slots])
            out = torch.cat(self.slots)
            self.barrier.wait()
            return out

        return all_gather


def test_uneven_all_gather_updates_every_rank_identically():
    T = 5
    local = {0: (torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])),
             1: (torch.tensor([4, 3, 2, 1, 0]), torch.tensor([5.0, 4.0, 3.5, 2.5, 1.5]))}
    samplers = {r: LossSecondMomentSampler(T) for r in local}
    gather = _ThreadAllGather(2)
    threads = [threading.Thread(target=samplers[r].update_with_local_losses,
                                args=(*local[r], gather.for_rank(r))) for r in local]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=20)
    # Every gathered tensor had the same (padded) size on both ranks.
    assert all(len(set(shapes)) == 1 for shapes in gather.shapes)
    single = LossSecondMomentSampler(T)
    single.update_with_all_losses([0, 1, 2, 4, 3, 2, 1, 0], [1.0, 2.0, 3.0, 5.0, 4.0, 3.5, 2.5, 1.5])
    for r in local:
        assert torch.equal(samplers[r].loss_history, single.loss_history)
        assert torch.equal(samplers[r].loss_counts, single.loss_counts)
    # Without all_gather: local losses only.
    alone = LossSecondMomentSampler(T)
    alone.update_with_local_losses(*local[0])
    assert alone.loss_counts.tolist() == [1, 1, 1, 0, 0]


def test_create_timestep_sampler():
    assert isinstance(create_timestep_sampler("uniform", 10), UniformSampler)
    assert isinstance(create_timestep_sampler("loss-second-moment", 10), LossSecondMomentSampler)
    with pytest.raises(ValueError, match="uniform, loss-second-moment"):
        create_timestep_sampler("importance", 10)


@pytest.mark.parametrize("rounds", [0, 5, 10, 11, 25])
def test_probabilities_and_importance_weights_match_reference_histories(monkeypatch, rounds):
    """Identical loss histories (cold, partly warm, just warm, shifted) -> the reference's p and weights 1/(T p_t)."""
    monkeypatch.setattr(np, "int", int, raising=False)
    T = 9
    ours = LossSecondMomentSampler(T)
    ref = resample.LossSecondMomentResampler(_FakeDiffusion(T))
    rng = np.random.default_rng(rounds)
    for _ in range(rounds):
        ts = rng.permutation(T).tolist()[: T - 1 if rounds == 10 else T]  # rounds=10: one step stays cold
        losses = (rng.uniform(0.05, 3.0, len(ts)) * (np.asarray(ts) + 1)).tolist()
        ours.update_with_local_losses(torch.tensor(ts), torch.tensor(losses, dtype=torch.float64))
        ref.update_with_all_losses(ts, losses)
    assert ours.warmed_up() == ref._warmed_up()
    ref_p = ref.weights() / np.sum(ref.weights())
    np.testing.assert_allclose(ours.probabilities().numpy(), ref_p, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(ours.loss_counts.numpy(), ref._loss_counts)
    np.testing.assert_allclose(ours.loss_history.numpy(), ref._loss_history, rtol=0, atol=0)
    t, w = ours.sample(64, "cpu", generator=torch.Generator().manual_seed(rounds))
    # the reference's ScheduleSampler.sample: weights_np = 1 / (len(p) * p[indices_np]), returned as float32
    np.testing.assert_allclose(w.numpy(), (1.0 / (T * ref_p[t.numpy()])).astype(np.float32), rtol=1e-6)
    if ours.warmed_up():
        assert w.std() > 0.01
