"""Batched augmentation against naive per-image references; epoch orders and sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densenet.augment import (
    Augmenter,
    color_jitter,
    crop_flip,
    cutout,
    epoch_batches,
    epoch_seed,
    gather_crop_flip,
    progressive_side,
    resize_batch,
)
from densenet.errors import ConfigError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _images(n=16, h=32, w=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def _naive_crop_flip(img: np.ndarray, dy: int, dx: int, flip: bool, pad: int, mode: str) -> np.ndarray:
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode={"zeros": "constant", "reflect": "reflect"}[mode])
    crop = padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
    return crop[:, :, ::-1] if flip else crop


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
@pytest.mark.parametrize("pad, h, w", [(4, 32, 32), (2, 5, 7), (0, 8, 8)])
def test_crop_flip_matches_a_per_image_reference(mode, pad, h, w):
    x = _images(40, h, w, seed=pad)
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 2 * pad + 1, (40, 2), generator=g)
    offsets[0] = torch.tensor([0, 0])  # the extremes
    offsets[1] = torch.tensor([2 * pad, 2 * pad])
    offsets[2] = torch.tensor([0, 2 * pad])
    flips = torch.rand(40, generator=g) < 0.5
    flips[:3] = torch.tensor([True, False, True])
    out = crop_flip(x, offsets, flips, pad, mode)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert out.is_contiguous()
    for b in range(40):
        ref = _naive_crop_flip(x[b].numpy(), int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b]), pad, mode)
        assert np.array_equal(out[b].numpy(), ref), b
    # without a flip mask nothing is flipped; centred offsets give the image back
    centred = torch.full((40, 2), pad)
    assert torch.equal(crop_flip(x, centred, None, pad, mode), x)


def test_crop_flip_works_on_float_images():
    x = _images(3).float()
    off = torch.tensor([[0, 8], [4, 4], [8, 1]])
    out = crop_flip(x, off, torch.tensor([False, True, False]), 4)
    ref = crop_flip(x.to(torch.uint8), off, torch.tensor([False, True, False]), 4)
    assert torch.equal(out, ref.float())


def test_cutout_matches_a_per_image_reference():
    x = torch.randn(20, 3, 10, 12)
    g = torch.Generator().manual_seed(3)
    centres = torch.stack([torch.randint(0, 10, (20,), generator=g), torch.randint(0, 12, (20,), generator=g)], 1)
    centres[0] = torch.tensor([0, 0])
    centres[1] = torch.tensor([9, 11])
    for size in (1, 4, 5):
        out = cutout(x, centres, size)
        for b in range(20):
            ref = x[b].clone()
            cy, cx = int(centres[b, 0]), int(centres[b, 1])
            y0, x0 = cy - size // 2, cx - size // 2
            ref[:, max(0, y0) : max(0, y0 + size), max(0, x0) : max(0, x0 + size)] = 0
            assert torch.equal(out[b], ref), (size, b)
    assert (cutout(x, centres, 3) == 0).sum() > 0


def test_color_jitter_matches_a_per_image_reference():
    x = torch.rand(6, 3, 5, 4, dtype=torch.float64)
    factors = torch.tensor([[1.0, 1.0, 1.0], [1.3, 0.7, 1.2], [0.6, 1.4, 0.0], [1.0, 0.0, 1.0],
                            [0.9, 1.1, 0.5], [1.5, 1.5, 1.5]], dtype=torch.float64)
    out = color_jitter(x, factors)
    w = np.array([0.299, 0.587, 0.114])
    for b in range(6):
        img = x[b].numpy().copy()
        fb, fc, fs = factors[b].tolist()
        img = np.clip(img * fb, 0, 1)
        m = np.tensordot(w, img, axes=1).mean()
        img = np.clip((img - m) * fc + m, 0, 1)
        gray = np.tensordot(w, img, axes=1)
        img = np.clip((img - gray) * fs + gray, 0, 1)
        assert np.allclose(out[b].numpy(), img, rtol=0, atol=1e-12), b
    assert torch.allclose(out[0], x[0])  # factors 1 change nothing
    assert torch.allclose(out[2][0], out[2][1]) and torch.allclose(out[2][1], out[2][2])  # saturation 0: grey


def test_eval_only_normalises():
    x = _images(8)
    aug = Augmenter(MEAN, STD, cutout=8, color_jitter=0.4)
    out = aug(x, train=False)
    ref = (x.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)
    last = Augmenter(MEAN, STD, channels_last=True)(x, train=False)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)
    plain = Augmenter(MEAN, STD, channels_last=False, dtype=torch.bfloat16)(x, train=False)
    assert plain.dtype == torch.bfloat16 and plain.is_contiguous()
    assert torch.allclose(plain.double(), ref, rtol=1e-2, atol=1e-2)


def test_train_batches_are_reproducible_from_the_generator_seed():
    x = _images(64)
    aug = Augmenter(MEAN, STD, cutout=6, color_jitter=0.3, padding_mode="reflect")
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and torch.isfinite(a).all()


def test_train_pipeline_equals_crop_flip_then_normalise():
    x = _images(64)
    aug = Augmenter(MEAN, STD)
    out = aug(x, torch.Generator().manual_seed(9))
    # replay the same draws: offsets, then flips
    g = torch.Generator().manual_seed(9)
    offsets = torch.randint(0, 9, (64, 2), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert 10 < int(flips.sum()) < 54
    assert torch.equal(out, aug.normalize(crop_flip(x, offsets, flips, 4)))
    # every output is a crop of the image zero-padded by 4 pixels, mirrored or not
    ref = [_naive_crop_flip(x[b].numpy(), int(offsets[b, 0]), int(offsets[b, 1]), bool(flips[b]), 4, "zeros")
           for b in range(64)]
    assert torch.equal(out, aug.normalize(torch.from_numpy(np.stack(ref))))


@pytest.mark.parametrize("padding", [0, 1, 4])
@pytest.mark.parametrize("with_flip", [False, True])
@pytest.mark.parametrize("shape", [(32, 32), (7, 12)])
def test_row_copy_crop_equals_the_gather_crop(padding, with_flip, shape):
    g = torch.Generator().manual_seed(padding * 10 + with_flip)
    data = torch.randint(0, 256, (40, 3, *shape), dtype=torch.uint8, generator=g)
    index = torch.randperm(40, generator=g)[:25]
    offsets = torch.randint(0, 2 * padding + 1, (25, 2), generator=g)
    flips = torch.rand(25, generator=g) < 0.5 if with_flip else None
    out = gather_crop_flip(data, index, offsets, flips, padding)
    assert out.is_contiguous() and torch.equal(out, crop_flip(data[index], offsets, flips, padding))
    assert torch.equal(gather_crop_flip(data[index], None, offsets, flips, padding), out)
    # the extreme offsets: every row/column of the padding is reached
    corners = torch.tensor([[0, 0], [2 * padding, 2 * padding], [0, 2 * padding], [2 * padding, 0]] * 6 + [[0, 0]])
    assert torch.equal(gather_crop_flip(data, index, corners, flips, padding),
                       crop_flip(data[index], corners, flips, padding))


@pytest.mark.parametrize("options", [{}, {"padding_mode": "reflect"}, {"cutout": 6, "color_jitter": 0.2}])
def test_batch_picked_by_index_equals_the_indexed_batch(options):
    data = _images(48)
    index = torch.randperm(48, generator=torch.Generator().manual_seed(1))[:20]
    aug = Augmenter(MEAN, STD, **options)
    a = aug(data, torch.Generator().manual_seed(3), index=index)
    b = aug(data[index], torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (20, 3, 32, 32)
    assert torch.equal(aug(data, train=False, index=index), aug(data[index], train=False))


def test_cutout_in_the_pipeline_equals_cutout_of_the_normalised_batch():
    x = _images(32)
    aug = Augmenter(MEAN, STD, crop_padding=0, flip=False, cutout=5, channels_last=False)
    out = aug(x, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # replay: cutout centres are the only draws here
    centres = torch.stack([torch.randint(0, 32, (32,), generator=g), torch.randint(0, 32, (32,), generator=g)], 1)
    assert torch.equal(out, cutout(aug.normalize(x), centres, 5))
    assert ((out == 0).flatten(1).sum(1) >= 3 * 9).all()  # at least a 3x3 corner of each square survives clipping


def test_options_switched_off_leave_images_alone():
    x = _images(8)
    aug = Augmenter(MEAN, STD, crop_padding=0, flip=False)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), aug(x, train=False))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_weak_batches_are_the_flips_only_augmenter_s(mode):
    # strong=False (--augment-from before its fraction): no crops, jitter or cutout, the same flips
    x, index = _images(24), torch.randperm(24, generator=torch.Generator().manual_seed(2))[:16]
    full = Augmenter(MEAN, STD, crop_padding=4, padding_mode=mode, alternate_flip=True, cutout=8, color_jitter=0.4)
    flips_only = Augmenter(MEAN, STD, crop_padding=0, padding_mode=mode, alternate_flip=True)
    for epoch in (0, 1):
        weak = full(x, torch.Generator().manual_seed(5), index=index, epoch=epoch, strong=False)
        assert torch.equal(weak, flips_only(x, torch.Generator().manual_seed(5), index=index, epoch=epoch))
    strong = full(x, torch.Generator().manual_seed(5), index=index, epoch=0)
    assert not torch.equal(strong, flips_only(x, torch.Generator().manual_seed(5), index=index, epoch=0))


def test_alternating_flip_shows_every_image_both_ways_in_two_epochs():
    x = _images(64)
    aug = Augmenter(MEAN, STD, crop_padding=0, alternate_flip=True)
    plain = aug(x, train=False)
    index = torch.randperm(64, generator=torch.Generator().manual_seed(3))  # batches hold any images

    def flipped(epoch: int, seed: int) -> list[bool]:
        out = aug(x, torch.Generator().manual_seed(seed), index=index, epoch=epoch)
        assert all(torch.equal(o, p) or torch.equal(o, p.flip(-1)) for o, p in zip(out, plain[index]))
        return [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain[index])]

    even, odd = flipped(0, seed=0), flipped(1, seed=1)
    assert [not f for f in even] == odd  # each image one way in epoch 0, the other way in epoch 1
    assert 20 <= sum(even) <= 44  # about half of them each epoch
    assert flipped(2, seed=7) == even  # the generator does not matter, the epoch's parity does
    with pytest.raises(ConfigError, match="alternate_flip needs flip"):
        Augmenter(MEAN, STD, flip=False, alternate_flip=True)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError):
        Augmenter(MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ConfigError):
        Augmenter(MEAN, STD, padding_mode="circular")
    with pytest.raises(ConfigError):
        Augmenter(MEAN, STD, dtype=torch.int8)
    with pytest.raises(ConfigError, match="uint8 images"):
        Augmenter(MEAN, STD)(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="reflect padding 8"):
        crop_flip(_images(2, 8, 8), torch.zeros(2, 2, dtype=torch.long), None, 8, "reflect")


def test_epoch_batches_order_and_sizes():
    a = epoch_batches(103, 10, epoch=3, seed=1)
    b = epoch_batches(103, 10, epoch=3, seed=1)
    assert len(a) == 10 and all(len(t) == 10 and t.dtype == torch.int64 for t in a)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert torch.cat(a).unique().numel() == 100
    assert not torch.equal(torch.cat(a), torch.cat(epoch_batches(103, 10, epoch=4, seed=1)))
    assert not torch.equal(torch.cat(a), torch.cat(epoch_batches(103, 10, epoch=3, seed=2)))
    # the documented seed: a resumed run (or another process) can rebuild the order
    perm = torch.randperm(103, generator=torch.Generator().manual_seed(epoch_seed(1, 3)))
    assert torch.equal(torch.cat(a), perm[:100])
    ev = epoch_batches(103, 10, epoch=0, seed=0, shuffle=False, drop_last=False)
    assert [len(t) for t in ev] == [10] * 10 + [3] and torch.equal(torch.cat(ev), torch.arange(103))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_get_disjoint_shares_that_cover_the_epoch(world_size):
    n, bs = 101, 8
    full = [epoch_batches(n, bs, epoch=2, seed=7, drop_last=False, rank=r, world_size=world_size)
            for r in range(world_size)]
    idx = [torch.cat(batches) for batches in full]
    together = torch.cat(idx)
    assert together.numel() == n and torch.equal(together.sort().values, torch.arange(n))  # disjoint, complete
    dropped = [epoch_batches(n, bs, epoch=2, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(batches) for batches in dropped}) == 1  # same number of batches on every rank
    assert all(len(t) == bs for batches in dropped for t in batches)
    used = torch.cat([torch.cat(batches) for batches in dropped])
    assert used.unique().numel() == used.numel() and n - used.numel() < world_size * bs
    # without sharding the same epoch is one permutation of which the ranks take their shares
    whole = torch.cat(epoch_batches(n, n, epoch=2, seed=7, drop_last=False))
    assert torch.equal(idx[1], whole[1::world_size])


def test_epoch_batches_bad_arguments():
    with pytest.raises(ConfigError):
        epoch_batches(10, 0, epoch=0, seed=0)
    with pytest.raises(ConfigError):
        epoch_batches(10, 2, epoch=0, seed=0, rank=2, world_size=2)


def test_progressive_side_holds_then_grows_in_steps_to_the_full_side():
    sides = [progressive_side(p, 24, 32, (0.5, 0.75)) for p in (0, 0.49, 0.5, 0.62, 0.625, 0.74, 0.75, 1)]
    assert sides == [24, 24, 24, 24, 28, 28, 32, 32]
    grid = progressive_side(np.linspace(0, 1, 11), 16, 32, (0.2, 0.8))
    assert grid.tolist() == [16, 16, 16, 16, 20, 24, 24, 28, 32, 32, 32]
    assert progressive_side(0.3, 20, 32, (0.3, 0.3)) == 32  # no ramp: full size from its point on
    assert progressive_side(0.29, 20, 32, (0.3, 0.3)) == 20


def test_resize_batch_scales_and_keeps_full_size_batches():
    x = torch.randn(4, 3, 32, 32)
    assert resize_batch(x, 32) is x
    small = resize_batch(x, 24)
    assert small.shape == (4, 3, 24, 24) and small.is_contiguous()
    flat = torch.full((2, 3, 32, 32), 0.7)
    assert torch.allclose(resize_batch(flat, 16), torch.full((2, 3, 16, 16), 0.7))
    # halving with the antialiasing (triangle) filter keeps a linear ramp inside the image: output pixel i
    # sits at the centre of input pixels 2i and 2i + 1
    ramp = torch.arange(32.0).repeat(32, 1).expand(1, 1, 32, 32)
    assert torch.allclose(resize_batch(ramp, 16)[0, 0, 0, 1:-1], torch.arange(1, 15.0) * 2 + 0.5)
