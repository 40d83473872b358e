"""Tests of the DenseNet family: exact sizes, torchvision layout, loading, modes and numerics."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from densenet.errors import ConfigError, WeightsError
from densenet.models import DenseNet, count_parameters, densenet121_cifar
from densenet.registry import (
    create_model,
    describe_models,
    list_models,
    model_from_config,
    register_arch,
    register_model,
)
from densenet.weights import load_state_dict_compat

# name -> exact parameter count (published/torchvision figures); the project's own models are checked
# against the composition formula in test_cifar_models_match_the_composition_formula
PARAM_COUNTS = {
    "densenet121-cifar": 6_956_298,
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet264": 33_337_704,
    "densenet-bc-100-12": 769_162,
    "densenet-bc-250-24": 15_324_406,
    "densenet-bc-190-40": 25_624_430,
    "densenet-40-12": 1_019_722,
}


def meta_model(name: str, **kwargs) -> nn.Module:
    """Build on the meta device: exact structure and sizes without allocating or initialising weights."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.mark.parametrize("name,expected", sorted(PARAM_COUNTS.items()))
def test_exact_parameter_counts(name, expected):
    assert count_parameters(meta_model(name)) == expected


def test_paper_basic_models_match_published_sizes():
    # Huang et al. Table 2: DenseNet (L=100, k=12) 7.0M, (L=100, k=24) 27.2M
    assert round(count_parameters(meta_model("densenet-100-12")) / 1e6, 1) == 7.0
    assert round(count_parameters(meta_model("densenet-100-24")) / 1e6, 1) == 27.2


def test_real_build_matches_meta_build():
    model = create_model("densenet121-cifar")
    assert count_parameters(model) == 6_956_298
    assert model.config["num_classes"] == 10


def test_registry_lists_and_describes_models():
    names = list_models()
    for name in PARAM_COUNTS:
        assert name in names
    rows = {r["name"]: r for r in describe_models()}
    assert rows["densenet121"]["params"] == 7_978_856
    assert rows["densenet121"]["num_classes"] == 1000 and rows["densenet121"]["stem"] == "imagenet"
    assert rows["densenet-bc-mini"]["params"] == cifar_parameter_count(24, 12, [6, 12, 8], 4, 0.5) and rows["densenet-bc-mini"]["stem"] == "cifar"
    assert all(r["description"] for r in rows.values())


def test_generic_names_follow_the_paper_rules():
    bc = meta_model("densenet-bc-160-12")
    assert bc.config["block_config"] == [26, 26, 26]
    assert bc.config["num_init_features"] == 24 and bc.config["bn_size"] == 4
    assert bc.config["compression"] == 0.5 and bc.config["stem"] == "cifar"
    assert bc.config["name"] == "densenet-bc-160-12"
    basic = meta_model("densenet-40-12")
    assert basic.config["block_config"] == [12, 12, 12]
    assert basic.config["num_init_features"] == 16 and basic.config["bn_size"] == 0
    assert basic.config["compression"] == 1.0
    # the generic name builds exactly what the registry's paper model builds
    assert count_parameters(meta_model("densenet-bc-40-12")) == count_parameters(
        DenseNet(12, (6, 6, 6), 24, 4, 0.5, num_classes=10, stem="cifar").to("meta"))


def cifar_parameter_count(stem: int, k: int, blocks: list[int], bottleneck: int, theta: float, classes: int = 10) -> int:
    """Parameters of a CIFAR-stem DenseNet from the paper's composition: a 3x3 stem conv; per layer
    BN(c) + [conv1x1 c->b*k + BN(b*k) + conv3x3 b*k->k] or conv3x3 c->k; per transition BN(c) +
    conv1x1 c->floor(theta*c); BN; linear."""
    c, total = stem, 27 * stem
    for i, n in enumerate(blocks):
        for _ in range(n):
            total += 2 * c + (c * bottleneck * k + 2 * bottleneck * k + 9 * bottleneck * k * k if bottleneck
                              else 9 * c * k)
            c += k
        if i < len(blocks) - 1:
            out = int(theta * c)
            total += 2 * c + c * out
            c = out
    return total + 2 * c + c * classes + classes


def test_cifar_models_match_the_composition_formula():
    # the formula reproduces the published sizes, then gives the project's own CPU models
    assert cifar_parameter_count(16, 12, [12, 12, 12], 0, 1.0) == PARAM_COUNTS["densenet-40-12"]
    assert cifar_parameter_count(24, 12, [16, 16, 16], 4, 0.5) == PARAM_COUNTS["densenet-bc-100-12"]
    assert count_parameters(meta_model("densenet-bc-mini")) == cifar_parameter_count(24, 12, [6, 12, 8], 4, 0.5)
    assert count_parameters(meta_model("densenet-cpu-s")) == cifar_parameter_count(54, 64, [2, 3, 2], 0, 0.5)
    assert count_parameters(meta_model("densenet-cpu-xs")) == cifar_parameter_count(54, 48, [2, 3, 2], 0, 0.5)
    assert count_parameters(meta_model("densenet-cpu-m")) == cifar_parameter_count(54, 64, [2, 3, 2], 0, 1.0)
    assert count_parameters(meta_model("densenet-cpu-l")) == cifar_parameter_count(54, 96, [2, 3, 2], 0, 1.0)
    assert count_parameters(meta_model("densenet-cpu-k96")) == cifar_parameter_count(54, 96, [1, 2, 2], 0, 0.5)
    assert count_parameters(meta_model("densenet-cpu-m4")) == cifar_parameter_count(54, 64, [1, 2, 3, 2], 0, 1.0)


@pytest.mark.parametrize("name", ["densenet-bc-101-12", "densenet-bc-4-12", "densenet-41-12"])
def test_invalid_generic_depth_is_a_config_error(name):
    with pytest.raises(ConfigError, match="depth"):
        create_model(name)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError) as info:
        create_model("densenet12-cifar")
    message = str(info.value)
    assert "unknown model 'densenet12-cifar'" in message and "densenet121-cifar" in message
    assert "\n" not in message


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="no_such_option"):
        create_model("densenet-bc-mini", no_such_option=1)
    with pytest.raises(ConfigError, match="compression"):
        DenseNet(compression=1.5)
    with pytest.raises(ConfigError, match="stem"):
        DenseNet(stem="resnet")
    with pytest.raises(ConfigError, match="stem_pool"):
        DenseNet(stem="imagenet", stem_pool=True)
    with pytest.raises(ConfigError, match="transition_pool"):
        DenseNet(transition_pool="min")
    with pytest.raises(ConfigError, match="transition_order"):
        DenseNet(transition_order="conv-norm-pool")
    with pytest.raises(ConfigError, match="activation"):
        DenseNet(activation="tanh")
    with pytest.raises(ConfigError, match="block_config"):
        DenseNet(block_config=())


def test_num_classes_and_overrides():
    model = meta_model("densenet121-cifar", num_classes=100, drop_rate=0.2, memory_efficient=True)
    assert model.classifier.out_features == 100
    assert model.config["drop_rate"] == 0.2 and model.config["memory_efficient"] is True
    assert model.config["name"] == "densenet121-cifar"


# --------------------------------------------------------------------------------------------
# architecture composition


def stage_shapes(model: nn.Module, size: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, tuple(out.shape[1:])))
             for n, m in model.features.named_children()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def test_densenet121_cifar_stage_shapes():
    shapes = stage_shapes(create_model("densenet121-cifar"), 32)
    assert shapes["conv0"] == (64, 32, 32)
    assert shapes["denseblock1"] == (256, 32, 32)
    assert shapes["transition1"] == (128, 16, 16)
    assert shapes["denseblock2"] == (512, 16, 16)
    assert shapes["transition2"] == (256, 8, 8)
    assert shapes["denseblock3"] == (1024, 8, 8)
    assert shapes["transition3"] == (512, 4, 4)
    assert shapes["denseblock4"] == (1024, 4, 4)
    assert shapes["norm5"] == (1024, 4, 4)


def test_imagenet_stem_and_mini_stem_shapes():
    shapes = stage_shapes(create_model("densenet121"), 224)
    assert shapes["pool0"] == (64, 56, 56) and shapes["denseblock4"] == (1024, 7, 7)
    shapes = stage_shapes(create_model("densenet-bc-mini"), 32)
    assert shapes["conv0"] == (24, 16, 16)
    assert shapes["denseblock1"] == (96, 16, 16) and shapes["transition1"] == (48, 8, 8)
    assert shapes["denseblock3"] == (192, 4, 4)
    shapes = stage_shapes(create_model("densenet-cpu-s", stem_stride=1, stem_pool=True), 32)
    assert shapes["conv0"] == (54, 32, 32) and shapes["pool0"] == (54, 16, 16)
    assert shapes["denseblock1"] == (182, 16, 16) and shapes["denseblock3"] == (269, 4, 4)


def test_layer_composition_and_channel_growth():
    model = create_model("densenet-bc-100-12")
    block = model.features.denseblock2
    first = model.features.transition1.conv.out_channels
    assert first == (24 + 16 * 12) // 2
    for i, layer in enumerate(block.values()):
        assert layer.norm1.num_features == first + i * 12
        assert layer.conv1.kernel_size == (1, 1) and layer.conv1.out_channels == 48
        assert layer.conv2.kernel_size == (3, 3) and layer.conv2.out_channels == 12
    # a layer returns only its k new channels; the block returns all of them
    x = torch.randn(2, first, 16, 16)
    with torch.no_grad():
        assert block.denselayer1([x]).shape == (2, 12, 16, 16)
        assert block(x).shape == (2, first + 16 * 12, 16, 16)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_transition_uses_floor_of_compression():
    model = DenseNet(growth_rate=12, block_config=(3, 3), num_init_features=16, compression=0.3,
                     num_classes=10, stem="cifar")
    assert model.features.transition1.conv.out_channels == math.floor(0.3 * (16 + 36)) == 15
    assert isinstance(model.features.transition1.pool, nn.AvgPool2d)
    assert not hasattr(model.features, "transition2")


def test_basic_layers_have_one_3x3_convolution():
    model = create_model("densenet-40-12")
    layer = model.features.denseblock1.denselayer3
    assert layer.conv1.weight.shape == (12, 16 + 2 * 12, 3, 3)
    assert not hasattr(layer, "norm2") and not hasattr(layer, "conv2")
    keys = [k for k in model.state_dict() if k.startswith("features.denseblock1.denselayer3.")]
    assert sorted({k.split(".")[3] for k in keys}) == ["conv1", "norm1"]


def test_initialisation():
    torch.manual_seed(0)
    model = create_model("densenet121-cifar")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.classifier.bias == 0)
    w = model.features.denseblock3.denselayer24.conv2.weight  # 128 * 9 fan-in, Kaiming std sqrt(2/fan_in)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.03)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = create_model("densenet-bc-mini", drop_rate=0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------------------------
# torchvision layout and loading


def test_torchvision_key_names():
    sd = create_model("densenet121").state_dict()
    assert len(sd) == 727
    for key in [
        "features.conv0.weight", "features.norm0.weight", "features.norm0.running_var",
        "features.norm0.num_batches_tracked",
        "features.denseblock1.denselayer1.norm1.weight", "features.denseblock1.denselayer1.conv1.weight",
        "features.denseblock1.denselayer1.norm2.running_mean", "features.denseblock1.denselayer1.conv2.weight",
        "features.denseblock3.denselayer24.conv2.weight", "features.denseblock4.denselayer16.norm2.bias",
        "features.transition1.norm.weight", "features.transition1.conv.weight",
        "features.transition3.conv.weight", "features.norm5.weight", "features.norm5.running_mean",
        "classifier.weight", "classifier.bias",
    ]:
        assert key in sd, key
    assert "features.transition4.conv.weight" not in sd and "features.denseblock5.denselayer1.norm1.weight" not in sd
    assert sd["features.conv0.weight"].shape == (64, 3, 7, 7)
    assert sd["features.denseblock1.denselayer1.conv1.weight"].shape == (128, 64, 1, 1)
    assert sd["features.transition1.conv.weight"].shape == (128, 256, 1, 1)
    assert sd["classifier.weight"].shape == (1000, 1024)


def test_cifar_stem_has_no_norm0():
    sd = create_model("densenet121-cifar").state_dict()
    assert sd["features.conv0.weight"].shape == (64, 3, 3, 3)
    assert not any(k.startswith("features.norm0") for k in sd)


def legacy_key(key: str) -> str:
    """The pre-2018 torchvision spelling: denselayer1.norm1.weight -> denselayer1.norm.1.weight."""
    for part in ("norm1", "norm2", "conv1", "conv2"):
        key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
    return key


def test_loads_legacy_and_module_prefixed_state_dicts():
    torch.manual_seed(1)
    source = create_model("densenet-bc-mini")
    with torch.no_grad():  # non-trivial buffers so that their loading is checked too
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = source.state_dict()
    renamed = {"module." + legacy_key(k): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert "module.features.denseblock1.denselayer1.norm.1.weight" in renamed
    assert "module.features.denseblock1.denselayer1.conv.2.weight" in renamed
    target = create_model("densenet-bc-mini")
    assert load_state_dict_compat(target, renamed) is target
    for key, value in target.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, sd[key]), key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))
    # nested wrappers (DDP around torch.compile) load too
    load_state_dict_compat(create_model("densenet-bc-mini"), {"module._orig_mod." + k: v for k, v in sd.items()})


def test_wrong_shape_is_one_clear_line():
    weights = create_model("densenet-bc-100-12").state_dict()
    with pytest.raises(WeightsError) as info:
        load_state_dict_compat(create_model("densenet-bc-100-12", num_classes=100), weights)
    message = str(info.value)
    assert "'classifier.weight'" in message and "10x342" in message and "100x342" in message
    assert "\n" not in message


def test_missing_and_unexpected_keys_are_named():
    model = create_model("densenet-bc-mini")
    sd = model.state_dict()
    del sd["features.norm5.running_var"]
    with pytest.raises(WeightsError, match=r"missing key 'features\.norm5\.running_var' \(model expects shape 192\)"):
        load_state_dict_compat(model, sd)
    sd = model.state_dict()
    sd["features.norm0.weight"] = torch.ones(24)
    with pytest.raises(WeightsError, match=r"unexpected key 'features\.norm0\.weight' with shape 24"):
        load_state_dict_compat(model, sd)
    with pytest.raises(WeightsError, match="not a tensor"):
        load_state_dict_compat(model, {"classifier.weight": [1.0]})
    # an ImageNet-stem checkpoint does not fit a CIFAR-stem model
    with pytest.raises(WeightsError, match="features.conv0.weight"):
        load_state_dict_compat(create_model("densenet121-cifar"), create_model("densenet121").state_dict())


# --------------------------------------------------------------------------------------------
# config round trip


def test_config_is_json_and_rebuilds_the_model():
    model = create_model("densenet-bc-mini", num_classes=7)
    config = json.loads(json.dumps(model.config))
    assert config["arch"] == "densenet" and config["name"] == "densenet-bc-mini"
    assert config["block_config"] == [6, 12, 8] and config["stem_stride"] == 2
    rebuilt = model_from_config(config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    plain = DenseNet(growth_rate=8, block_config=[2, 2], num_init_features=16, num_classes=3, stem="cifar")
    assert plain.config["name"] is None
    assert model_from_config(plain.config).config == plain.config


def test_gelu_activation_replaces_every_relu_and_keeps_the_keys():
    torch.manual_seed(0)
    relu = create_model("densenet-cpu-m")
    gelu = create_model("densenet-cpu-m", activation="gelu")
    gelu.load_state_dict(relu.state_dict())  # strict: the same keys and shapes
    count = sum(isinstance(m, nn.ReLU) for m in relu.modules())
    assert count == 2 + 3 + 2 + 2 and sum(isinstance(m, nn.GELU) for m in gelu.modules()) == count
    assert not any(isinstance(m, nn.ReLU) for m in gelu.modules())
    rebuilt = model_from_config(json.loads(json.dumps(gelu.config)))
    assert rebuilt.config["activation"] == "gelu" and isinstance(rebuilt.features.transition1.relu, nn.GELU)
    old = {k: v for k, v in relu.config.items() if k != "activation"}  # a config from before the option
    assert model_from_config(old).config["activation"] == "relu"
    relu.eval(), gelu.eval()
    x = torch.randn(2, 3, 32, 32)
    expected = gelu.classifier(torch.nn.functional.gelu(gelu.forward_features(x)).mean((2, 3)))
    assert torch.allclose(gelu(x), expected, atol=1e-5)
    assert not torch.allclose(gelu(x), relu(x), atol=1e-3)


def test_model_from_config_errors():
    with pytest.raises(ConfigError, match="arch"):
        model_from_config({"growth_rate": 12})
    with pytest.raises(ConfigError, match="unknown model arch 'vgg'"):
        model_from_config({"arch": "vgg"})
    with pytest.raises(ConfigError, match="does not fit"):
        model_from_config({**densenet121_cifar().config, "depth": 3})


def test_other_architectures_can_register():
    class Tiny(nn.Module):
        def __init__(self, num_classes=10, width=4):
            super().__init__()
            self.fc = nn.Linear(width, num_classes)
            self.config = {"arch": "tiny-test", "name": None, "num_classes": num_classes, "width": width}

    register_arch("tiny-test", Tiny)
    register_model("tiny-test-4", Tiny, "test-only model")
    model = create_model("tiny-test-4", num_classes=3)
    assert model.config["name"] == "tiny-test-4" and model.fc.out_features == 3
    assert isinstance(model_from_config(model.config), Tiny)


# --------------------------------------------------------------------------------------------
# memory-efficient mode


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for backward during one forward (storage counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def test_memory_efficient_matches_standard_outputs_grads_and_stats():
    torch.manual_seed(0)
    standard = create_model("densenet-bc-100-12").train()
    efficient = copy.deepcopy(standard).set_memory_efficient(True)
    assert efficient.config["memory_efficient"] is True
    x = torch.randn(4, 3, 32, 32)
    outputs = []
    for model in (standard, efficient):
        out = model(x)
        (out.square().sum() + out.sum()).backward()
        outputs.append(out.detach())
    assert (outputs[0] - outputs[1]).abs().max().item() <= 1e-5
    for (name, p), q in zip(standard.named_parameters(), efficient.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5, name
    # the recomputation in backward must not count the batch twice in BN running statistics
    for (name, a), b in zip(standard.named_buffers(), efficient.named_buffers()):
        assert torch.equal(a, b[1]), name


def test_memory_efficient_saves_memory_and_switches_off():
    torch.manual_seed(0)
    model = create_model("densenet-bc-100-12").train()
    x = torch.randn(2, 3, 32, 32)
    standard = saved_tensor_bytes(model, x)
    efficient = saved_tensor_bytes(model.set_memory_efficient(True), x)
    assert efficient < 0.5 * standard
    assert saved_tensor_bytes(model.set_memory_efficient(False), x) == standard
    assert model.config["memory_efficient"] is False
    # without gradients nothing is checkpointed (and nothing saved)
    model.set_memory_efficient(True)
    with torch.no_grad():
        assert saved_tensor_bytes(model, x) == 0


# --------------------------------------------------------------------------------------------
# channels_last and bf16 autocast on the CPU


def calibrated_mini() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("densenet-bc-mini")
    with torch.no_grad():  # give BN running statistics realistic values
        model.train()
        for _ in range(2):
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


def test_channels_last_and_bf16_autocast_agree_with_fp32():
    model = calibrated_mini()
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        assert model.features(xc).is_contiguous(memory_format=torch.channels_last)
        last = model(xc)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(xc)
    scale = reference.abs().max().item()
    assert (last - reference).abs().max().item() <= 1e-5 * max(scale, 1.0)
    assert half.dtype == torch.bfloat16
    error = (half.float() - reference).abs().max().item()
    assert error <= 0.03 * scale
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * error  # predictions bf16 rounding cannot flip
    assert clear.sum() >= 16
    assert torch.equal(half.argmax(1)[clear], reference.argmax(1)[clear])


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_transition_orders_compute_what_they_name(pool):
    """Each transition order is the composition its name spells, in training mode, forward and
    backward; with average pooling, pooling before the convolution is the paper's function."""
    torch.manual_seed(0)
    x = torch.randn(4, 24, 8, 8)
    spelled = {
        "norm-conv-pool": lambda t, z: t.pool(t.conv(t.relu(t.norm(z)))),
        "norm-pool-conv": lambda t, z: t.conv(t.pool(t.relu(t.norm(z)))),
        "pool-norm-conv": lambda t, z: t.conv(t.relu(t.norm(t.pool(z)))),
    }
    counts, outputs = set(), {}
    for order, compose in spelled.items():
        torch.manual_seed(1)
        model = DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8, bn_size=0, compression=0.5,
                         num_classes=10, stem="cifar", transition_pool=pool, activation="gelu",
                         transition_order=order)
        counts.add(count_parameters(model))
        assert model.config["transition_order"] == order
        t = model.features.transition1.train()
        with torch.no_grad():
            t.norm.weight.uniform_(0.5, 1.5)
            t.norm.bias.uniform_(-0.5, 0.5)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, expected = t(a), compose(t, b)
        assert got.shape == (4, 12, 4, 4)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        got.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
        outputs[order] = (got.detach(), a.grad)
    assert len(counts) == 1  # the order moves no parameter (each model draws the same weights)
    paper, pooled_first = outputs["norm-conv-pool"], outputs["norm-pool-conv"]
    if pool == "avg":
        torch.testing.assert_close(pooled_first, paper, rtol=1e-4, atol=1e-5)
    else:
        assert not torch.allclose(pooled_first[0], paper[0], atol=1e-3)
