"""The fast paths compute what the plain eager model computes.

optimize_for_inference (folded/fused/preallocated, chunked), the selective-recompute memory-efficient
mode, channels_last, bf16 autocast and torch.compile are each checked against the plain float32
model; the textbook reference of benchmarks/reference.py against ours. No timings here.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densenet import inference
from densenet.inference import InferenceDenseNet, optimize_for_inference
from densenet.models import DenseNet
from densenet.registry import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reference  # noqa: E402

TINY = {  # small members of the family, so that the tests stay fast on two cores
    "tiny-bc": dict(growth_rate=6, block_config=(3, 4), num_init_features=12, bn_size=4, compression=0.5,
                    num_classes=10, stem="cifar"),
    "tiny-basic": dict(growth_rate=6, block_config=(3, 3), num_init_features=8, bn_size=0, compression=1.0,
                       num_classes=10, stem="cifar"),
    "tiny-imagenet": dict(growth_rate=6, block_config=(2, 2, 2), num_init_features=12, num_classes=7,
                          stem="imagenet"),
    "tiny-pooled": dict(growth_rate=6, block_config=(2, 2), num_init_features=10, bn_size=0, compression=0.5,
                        num_classes=10, stem="cifar", stem_pool=True),
    "tiny-maxpool": dict(growth_rate=6, block_config=(2, 2, 2), num_init_features=10, bn_size=0, compression=1.0,
                         num_classes=10, stem="cifar", transition_pool="max"),
    "tiny-pool-first": dict(growth_rate=6, block_config=(2, 2, 2), num_init_features=10, bn_size=0,
                            compression=1.0, num_classes=10, stem="cifar", transition_pool="max",
                            transition_order="norm-pool-conv"),
    "tiny-raw-pool": dict(growth_rate=6, block_config=(2, 2), num_init_features=10, bn_size=2, compression=0.5,
                          num_classes=10, stem="cifar", transition_pool="max", transition_order="pool-norm-conv",
                          activation="gelu"),
    "tiny-avg-raw-pool": dict(growth_rate=6, block_config=(2, 2), num_init_features=10, bn_size=0,
                              compression=0.5, num_classes=10, stem="cifar", transition_order="pool-norm-conv"),
    "tiny-gelu": dict(growth_rate=6, block_config=(2, 2), num_init_features=12, bn_size=2, compression=0.5,
                      num_classes=10, stem="cifar", activation="gelu"),
    "tiny-imagenet-gelu": dict(growth_rate=6, block_config=(2, 2), num_init_features=12, num_classes=7,
                               stem="imagenet", activation="gelu"),
}


def build(name: str, **kwargs) -> nn.Module:
    return DenseNet(**{**TINY[name], **kwargs}) if name in TINY else create_model(name, **kwargs)


def calibrated(name: str, seed: int = 0, size: int = 32, **kwargs) -> nn.Module:
    """A model with non-trivial BN statistics and affine parameters (some negative scales)."""
    torch.manual_seed(seed)
    model = build(name, **kwargs)
    with torch.no_grad():
        model.train()
        model(torch.randn(8, 3, size, size))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.0, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.classifier.bias.uniform_(-0.1, 0.1)
    return model.eval()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name,size", [("tiny-bc", 16), ("tiny-basic", 16), ("tiny-imagenet", 40),
                                       ("tiny-pooled", 16), ("tiny-maxpool", 16), ("tiny-gelu", 16),
                                       ("tiny-pool-first", 16), ("tiny-raw-pool", 16), ("tiny-avg-raw-pool", 16),
                                       ("tiny-imagenet-gelu", 40), ("densenet-bc-mini", 32)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_optimize_for_inference_matches_eval_model(name, size, channels_last):
    model = calibrated(name, size=size)
    fast = optimize_for_inference(model, channels_last=channels_last)
    assert isinstance(fast, InferenceDenseNet) and not fast.training
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    got = fast(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert max_error(got, expected) <= 1e-5 * max(1.0, expected.abs().max().item())
    assert not got.requires_grad


def test_optimize_for_inference_densenet121_cifar_and_copies_weights():
    model = calibrated("densenet121-cifar")
    fast = optimize_for_inference(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert max_error(fast(x), expected) <= 1e-5 * max(1.0, expected.abs().max().item())
        # a copy: changing the source afterwards does not change the optimised model
        model.classifier.bias.add_(1.0)
        assert max_error(fast(x), expected) <= 1e-5 * max(1.0, expected.abs().max().item())
    assert fast.config == model.config
    assert all(not p.requires_grad for p in fast.parameters())


def test_chunked_cpu_batches_equal_one_batch(monkeypatch):
    model = calibrated("densenet-bc-mini")
    fast = optimize_for_inference(model)
    x = torch.randn(10, 3, 32, 32)
    whole = fast(x)
    # densenet-bc-mini's widest map: block 1, 96 channels at 16x16 (98,304 bytes per image); 3 per chunk
    assert fast._largest_map_elements(32, 32) == max(96 * 16 * 16, 192 * 8 * 8, 192 * 4 * 4)
    monkeypatch.setattr(inference, "CHUNK_BYTES", 3 * 96 * 16 * 16 * 4)
    calls = []
    original = InferenceDenseNet._forward
    monkeypatch.setattr(InferenceDenseNet, "_forward", lambda self, part: calls.append(len(part)) or original(self, part))
    chunked = fast(x)
    assert calls == [3, 3, 3, 1]
    assert max_error(chunked, whole) <= 1e-6 * max(1.0, whole.abs().max().item())


def test_transition_pools_before_its_convolution_exactly():
    model = calibrated("tiny-bc", size=16)
    fast = optimize_for_inference(model)
    t = model.features.transition1
    x = torch.randn(2, t.norm.num_features, 16, 16)
    with torch.no_grad():
        expected = t(x)
    assert max_error(fast.stages[1](x), expected) <= 1e-5


def test_other_models_pass_through_and_bf16_weights_keep_their_dtype():
    other = nn.Linear(3, 2)
    assert optimize_for_inference(other) is other
    model = calibrated("tiny-bc", size=16).to(torch.bfloat16)
    fast = optimize_for_inference(model)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = calibrated("tiny-bc", size=16)(x)
    got = fast(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert max_error(got, expected) <= 0.1 * max(1.0, expected.abs().max().item())


def train_step_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny-bc", "tiny-basic"])
def test_memory_efficient_selective_recompute_is_exact(name):
    torch.manual_seed(1)
    standard = build(name).train()
    efficient = copy.deepcopy(standard).set_memory_efficient(True)
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 3, 5, 9])
    out_s, grads_s = train_step_grads(standard, x, y)
    out_e, grads_e = train_step_grads(efficient, x, y)
    assert max_error(out_s, out_e) <= 1e-6
    for key, g in grads_s.items():
        assert max_error(g, grads_e[key]) <= 1e-5 * max(1.0, g.abs().max().item()), key
    for (key, a), b in zip(standard.named_buffers(), efficient.buffers()):
        assert torch.equal(a, b), key  # the recomputation does not count the batch twice


def test_memory_efficient_recomputes_no_convolution():
    """Convolution outputs are kept by the selective checkpoint: backward runs no forward convolution."""
    torch.manual_seed(2)
    model = build("tiny-bc", memory_efficient=True).train()
    x = torch.randn(2, 3, 16, 16)
    loss = model(x).sum()
    counts: dict[str, int] = {}

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func)] = counts.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    with Count():
        loss.backward()
    assert counts.get("aten.native_batch_norm.default", 0) > 0  # BN maps are recomputed ...
    assert counts.get("aten.convolution.default", 0) == 0  # ... convolutions are not
    assert counts.get("aten.mkldnn_convolution.default", 0) == 0


def test_memory_efficient_keeps_less_and_dropout_still_works():
    torch.manual_seed(3)
    model = build("tiny-bc", drop_rate=0.2).train()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    a = model(x)
    model.set_memory_efficient(True)
    torch.manual_seed(5)
    b = model(x)
    assert max_error(a, b) <= 1e-6  # dropout (outside the recomputed part) draws the same masks
    b.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reference_is_the_same_function_as_densenet121_cifar():
    torch.manual_seed(0)
    ours = create_model("densenet121-cifar").eval()
    ref = reference.load_from_densenet(reference.reference_densenet121_cifar(), ours).eval()
    assert sum(p.numel() for p in ref.parameters()) == 6_956_298
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_error(ref(x), ours(x)) <= 1e-5
    with pytest.raises(ValueError):
        reference.load_from_densenet(reference.reference_densenet121_cifar(), create_model("densenet-bc-mini"))


def test_channels_last_training_step_matches_nchw():
    torch.manual_seed(4)
    nchw = build("tiny-bc").train()
    last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([1, 2, 3, 4])
    out_a, grads_a = train_step_grads(nchw, x, y)
    out_b, grads_b = train_step_grads(last, x.contiguous(memory_format=torch.channels_last), y)
    assert max_error(out_a, out_b) <= 1e-5
    for key, g in grads_a.items():
        assert max_error(g, grads_b[key]) <= 1e-4 * max(1.0, g.abs().max().item()), key


def test_bf16_autocast_inference_on_the_fast_path_is_close():
    model = calibrated("tiny-bc", size=16)
    fast = optimize_for_inference(model)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(x)
    assert max_error(got, expected) <= 0.05 * max(1.0, expected.abs().max().item())


def test_compiled_inference_path_matches_eager():
    torch._dynamo.reset()
    model = calibrated("tiny-bc", size=16)
    fast = optimize_for_inference(model)
    compiled = torch.compile(fast)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert max_error(compiled(x), expected) <= 1e-4 * max(1.0, expected.abs().max().item())
