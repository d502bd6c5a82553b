"""The real-image feature cache (features.cached_features): a hit returns what the extractor returned, and nothing but
the same images through the same weights can hit."""

import torch
from torch import nn

from collafuse.evaluation.features import cached_features


class MeanColour(nn.Module):
    """A stand-in extractor with a closed form: the per-channel means, counted per call."""

    num_features = 3
    preferred_batch_size = 4

    def __init__(self, identity: str):
        super().__init__()
        self.identity, self.calls = identity, 0

    def forward(self, x):
        self.calls += 1
        return x.mean(dim=(2, 3))


def _images(seed=0, n=6):
    levels = torch.randint(0, 256, (n, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 127.5 - 1  # exact uint8 levels, as real images are


def test_a_second_call_reads_the_cache_and_returns_the_closed_form(tmp_path):
    x, ext = _images(), MeanColour("mean:v1")
    first = cached_features(x, ext, tmp_path)
    calls = ext.calls
    second = cached_features(x, ext, tmp_path)
    assert ext.calls == calls  # no extractor call on a hit
    assert second.dtype == torch.float64 and torch.equal(first, second)
    torch.testing.assert_close(second, x.double().mean(dim=(2, 3)), rtol=0, atol=1e-6)
    assert len(list((tmp_path / "real").glob("*.safetensors"))) == 1


def test_one_changed_pixel_or_other_weights_miss(tmp_path):
    x, ext = _images(), MeanColour("mean:v1")
    cached_features(x, ext, tmp_path)
    y = x.clone()
    y[2, 1, 3, 0] = -y[2, 1, 3, 0] + 2 / 255  # another uint8 level
    calls = ext.calls
    got = cached_features(y, ext, tmp_path)
    assert ext.calls > calls
    torch.testing.assert_close(got, y.double().mean(dim=(2, 3)), rtol=0, atol=1e-6)
    other = MeanColour("mean:v2")
    cached_features(x, other, tmp_path)
    assert other.calls > 0
    assert len(list((tmp_path / "real").glob("*.safetensors"))) == 3


def test_an_untracked_extractor_is_never_cached_and_a_damaged_file_is_rewritten(tmp_path):
    x = _images()
    untracked = MeanColour("lenet:untracked")
    cached_features(x, untracked, tmp_path)
    assert not (tmp_path / "real").exists()
    ext = MeanColour("mean:v1")
    cached_features(x, ext, tmp_path)
    (path,) = (tmp_path / "real").glob("*.safetensors")
    path.write_bytes(b"not a safetensors file")
    got = cached_features(x, ext, tmp_path)
    torch.testing.assert_close(got, x.double().mean(dim=(2, 3)), rtol=0, atol=1e-6)
    assert cached_features(x, MeanColour("mean:v1"), tmp_path).shape == (6, 3)  # the rewritten file reads back
