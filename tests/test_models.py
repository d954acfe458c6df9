import numpy as np
import torch

from unfused_dist.audio.frontend import FrontendConfig, LogMel, centre_crop, random_crop
from unfused_dist.audio.augment import LogMixupExp, random_resize_crop
from unfused_dist.models.encoder import AudioNTT, count_parameters


def test_parameter_counts_match_the_paper_architecture():
    assert count_parameters(AudioNTT(n_fc=2)) == 5_321_856
    assert count_parameters(AudioNTT(n_fc=3)) == 9_518_208


def test_095_seconds_gives_64_by_96_logmel():
    cfg = FrontendConfig()
    wave = torch.randn(2, cfg.crop_samples)
    assert cfg.crop_samples == 15_200
    assert LogMel(cfg)(wave).shape == (2, 1, 64, 96)


def test_encoder_outputs_and_block_widths():
    enc = AudioNTT(n_fc=2).eval()
    out = enc(torch.randn(3, 1, 64, 96))
    assert out.frames.shape == (3, 12, 2048)
    assert out.embedding.shape == (3, 2048)
    assert [b.shape[1] for b in out.blocks] == enc.block_dims == [2048, 1024, 512]
    assert torch.allclose(out.embedding, out.frames.mean(1) + out.frames.amax(1))


def test_crops_pad_symmetrically_and_stay_in_range():
    rng = np.random.default_rng(0)
    short = np.ones(10, dtype=np.float32)
    padded = centre_crop(short, 14)
    assert padded.tolist() == [0, 0] + [1] * 10 + [0, 0]
    long = np.arange(100, dtype=np.float32)
    for _ in range(20):
        c = random_crop(long, 30, rng)
        assert len(c) == 30 and c[-1] - c[0] == 29


def test_augmentations_keep_shape_and_change_the_input():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 64, 96)
    y = random_resize_crop(x, generator=gen)
    assert y.shape == x.shape and not torch.allclose(x, y)
    mix = LogMixupExp(0.4, generator=gen)
    first = mix(x)
    assert torch.equal(first, x)  # empty memory bank: nothing to mix with yet
    second = mix(x + 1)
    assert second.shape == x.shape and not torch.allclose(second, x + 1)
