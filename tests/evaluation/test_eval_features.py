"""InceptionFeatures: weights errors, input handling, batching, progress bar on rank 0 only."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from eval_helpers import smooth_images

from diffusion_pl.evaluation import INCEPTION_WEIGHTS_FILENAME, InceptionFeatures, InceptionWeightsUnavailableError


def test_missing_weights_file_error_says_how_to_provide_weights(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(InceptionWeightsUnavailableError) as e:
        InceptionFeatures(missing, device="cpu")
    msg = str(e.value)
    assert missing in msg and "feature_extractor_weights_path=" in msg
    assert INCEPTION_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"
    assert INCEPTION_WEIGHTS_FILENAME in msg and "pre-download" in msg


def test_offline_without_weights_names_the_file_torch_fidelity_expects(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(url, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    with pytest.raises(InceptionWeightsUnavailableError) as e:
        InceptionFeatures(None, device="cpu")
    msg = str(e.value)
    expected_cache = str(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILENAME)
    assert "URLError" in msg and expected_cache in msg and "github.com/toshas/torch-fidelity" in msg
    # allow_download=False never reaches the network
    monkeypatch.setattr(
        "torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
        lambda *a, **k: pytest.fail("download attempted"),
    )
    with pytest.raises(InceptionWeightsUnavailableError, match="download .* disabled"):
        InceptionFeatures(None, device="cpu", allow_download=False)


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a state dict")
    with pytest.raises(InceptionWeightsUnavailableError, match=f"loading {bad} failed"):
        InceptionFeatures(str(bad), device="cpu")


def test_outputs_and_grayscale_images(inception):
    gray = smooth_images(1, size=16, seed=11)[:, :1]
    # an iterable of batches (here of different channel counts); 1-channel images are repeated to 3 channels
    out = inception(iter([gray, gray.repeat(1, 3, 1, 1)]))
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["pool"].dtype == torch.float32 and out["pool"].std() > 1e-3
    torch.testing.assert_close(out["pool"][0], out["pool"][1])
    torch.testing.assert_close(out["logits"][0], out["logits"][1])


def test_bad_inputs_are_rejected_before_the_network(inception):
    with pytest.raises(TypeError, match="expected uint8 images"):
        inception(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(2, 8, 8, 3\).*nhwc_to_nchw"):
        inception(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))


def test_progress_bar_only_when_asked(inception, capsys):
    """The caller decides (rank 0 passes progress=True, the other ranks False)."""
    img = smooth_images(1, size=8, seed=12)
    progress = InceptionFeatures.__new__(InceptionFeatures)
    progress.__dict__.update(inception.__dict__, progress=True)
    # the bar does not depend on the network: a stand-in keeps this test cheap
    progress.model = lambda x: (torch.zeros(len(x), 2048), torch.zeros(len(x), 1008))
    progress(img)
    assert "Inception features" in capsys.readouterr().err
    progress.progress = False
    progress(img)
    assert "Inception features" not in capsys.readouterr().err
