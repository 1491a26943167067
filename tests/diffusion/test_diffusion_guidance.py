import pytest
import torch
from diffusion_test_utils import ToyModel

from diffusion_pl.diffusion import classifier_cond_fn, classifier_free_model, create_diffusion, p_sample


class LinearClassifier:
    """logits = W flatten(x) + c * t: log p(y|x) has the closed-form gradient W_y - sum_k p_k W_k."""

    def __init__(self, num_classes=3, dim=18):
        g = torch.Generator().manual_seed(4)
        self.weight = torch.randn(num_classes, dim, generator=g)
        self.seen_t = []

    def __call__(self, x, t):
        self.seen_t.append(t.clone())
        return x.flatten(1) @ self.weight.T + 0.01 * t.float()[:, None]


def test_classifier_cond_fn_is_scaled_log_softmax_gradient():
    clf = LinearClassifier()
    x = torch.randn(4, 2, 3, 3)
    t = torch.tensor([3, 5, 7, 9])
    y = torch.tensor([0, 2, 1, 2])
    scale = 3.0
    with torch.no_grad():  # the cond_fn enables grad itself
        grad = classifier_cond_fn(clf, scale)(x, t, y=y, unused_kwarg=1)
    p = torch.softmax(clf(x, t), dim=-1)
    expected = (clf.weight[y] - p @ clf.weight).view_as(x) * scale
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert not x.requires_grad
    with pytest.raises(ValueError, match="model_kwargs=\\{'y'"):
        classifier_cond_fn(clf, 1.0)(x, t)


def test_classifier_receives_original_timesteps_when_respaced():
    process = create_diffusion(diffusion_steps=40, timestep_respacing="ddim4", rescale_timesteps=False)
    clf = LinearClassifier()
    x = torch.randn(2, 2, 3, 3)
    p_sample(process, ToyModel(2, learn_sigma=True), x, torch.tensor([3, 1]),
             model_kwargs={"y": torch.tensor([0, 1])}, cond_fn=classifier_cond_fn(clf, 1.0))
    assert clf.seen_t[0].tolist() == [30, 10]


class CountingConditionalModel:
    def __init__(self, learn_sigma=True):
        self.inner = ToyModel(2, learn_sigma=learn_sigma)
        self.calls = 0
        self.batch_sizes = []

    def __call__(self, x, t, y=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        return self.inner(x, t, y=y)


def test_cfg_with_zero_scale_equals_conditional_model_in_one_call():
    model = CountingConditionalModel()
    x = torch.randn(3, 2, 3, 3)
    t = torch.tensor([1, 2, 3])
    y = torch.tensor([0, 4, 2])
    out = classifier_free_model(model, 0.0, null_class=10)(x, t, y=y)
    assert model.calls == 1 and model.batch_sizes == [6]
    # Exactly the conditional branch of the batched forward ...
    batched = model.inner(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, 10)]))
    torch.testing.assert_close(out, batched[:3], rtol=0, atol=0)
    # ... which is the conditional model up to float32 batching round-off.
    torch.testing.assert_close(out, model.inner(x, t, y=y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_combines_eps_and_keeps_conditional_variance(learn_sigma):
    model = CountingConditionalModel(learn_sigma)
    x = torch.randn(3, 2, 3, 3)
    t = torch.tensor([1, 2, 3])
    y = torch.tensor([0, 4, 2])
    w = 2.0
    out = classifier_free_model(model, w, null_class=10)(x, t, y=y)
    cond = model.inner(x, t, y=y)
    uncond = model.inner(x, t, y=torch.full_like(y, 10))
    torch.testing.assert_close(out[:, :2], (1 + w) * cond[:, :2] - w * uncond[:, :2], rtol=1e-6, atol=1e-6)
    if learn_sigma:
        torch.testing.assert_close(out[:, 2:], cond[:, 2:], rtol=1e-6, atol=1e-7)
    assert out.shape == cond.shape and model.calls == 1


def test_cfg_model_works_inside_a_process():
    process = create_diffusion(diffusion_steps=10)
    model = classifier_free_model(CountingConditionalModel(), 1.0, null_class=3)
    x, t = torch.randn(2, 2, 3, 3), torch.tensor([5, 0])
    out = p_sample(process, model, x, t, model_kwargs={"y": torch.tensor([0, 1])})
    assert out["sample"].shape == (2, 2, 3, 3)
    with pytest.raises(ValueError, match="class labels"):
        model(torch.randn(2, 2, 3, 3), torch.tensor([1, 1]))
