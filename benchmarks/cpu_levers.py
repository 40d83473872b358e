"""What each lever of the CPU recipes gave on this machine: training-step speed, and accuracy per run.

Its parts, each run on a quiet machine (nothing else of yours beside it):

    # images/s of a training step (synthetic batch, glibc retain policy as in `densenet train`):
    # fp32 vs bf16 autocast, channels_last vs NCHW, eager vs torch.compile, for candidate models
    .venv/bin/python benchmarks/cpu_levers.py speed --models densenet-bc-mini,densenet-cpu-s --batch 128

    # accuracy of short real trainings (densenet.trainer.train, the `quick` recipe with overrides);
    # two variants can run side by side with --threads 1 each (they slow each other alike)
    .venv/bin/python benchmarks/cpu_levers.py accuracy --data-dir ../shared/data/cifar10-jpeg \\
        --set '{"model": "densenet-cpu-s", "whiten": true}' --subset 25000 --epochs 2

    # densenet-cpu-s's stem: 3x3/1 whitening + 2x2 max-pool vs 3x3/2 whitening (frozen, as --whiten
    # leaves it), timed in alternating rounds of the same process
    .venv/bin/python benchmarks/cpu_levers.py stem --batch 128

    # the same interleaved timing for any constructor options of one model (the first the reference)
    .venv/bin/python benchmarks/cpu_levers.py variants --model densenet-cpu-m --amp bf16 \\
        --variants '{"relu": {}, "gelu": {"activation": "gelu"}, "relu-max": {"transition_pool": "max"}}'

    # where a training step's time goes (torch.profiler, self CPU time by operator, summed over
    # steps): convolutions, BatchNorm, ReLU or GELU, pooling, concatenation, the rest
    .venv/bin/python benchmarks/cpu_levers.py profile --model densenet-cpu-s --batch 128
    .venv/bin/python benchmarks/cpu_levers.py profile --model densenet-cpu-m4 --amp bf16 \\
        --model-kwargs '{"activation": "gelu", "transition_pool": "max"}'

    # multi-view test-time augmentation of trained weights: the mirror and 1- or 2-pixel shifts
    # (reflection padding) of every test image, alone and averaged in the usual combinations
    .venv/bin/python benchmarks/cpu_levers.py tta --weights densenet-cpu-s-90m --data-dir ../shared/data/cifar10-jpeg

    # ensembles of trained models (shipped names or weights paths): each model's 6-view top-1 (as
    # `densenet evaluate --tta-translate` computes it), then that of every 2..--max-members of them
    # with their 6-view logits averaged
    .venv/bin/python benchmarks/cpu_levers.py ensemble --data-dir ../shared/data/cifar10-jpeg \\
        --weights densenet-cpu-m4-30m,densenet-cpu-m-30m,densenet-cpu-m4-90m,densenet-cpu-l-90m

Each part prints one JSON line per variant; docs/TRAINING.md ("What each lever gave") lists the
figures and the commands that produced them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from densenet.errors import DenseNetError
from densenet.registry import create_model
from densenet.runtime import set_malloc_policy


def step_speed(model_name: str, batch: int, amp: str, channels_last: bool, compile_: bool,
               warmup: int = 3, steps: int = 8) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    return {"model": model_name, "batch": batch, "amp": amp, "channels_last": channels_last,
            "compile": compile_, "images_per_second": round(batch / seconds, 1),
            "warmup_seconds": round(first, 1), "threads": torch.get_num_threads()}


def variants_speed(model_name: str, variants: dict[str, dict], batch: int, amp: str = "none",
                   rounds: int = 5, steps: int = 10, compile_: bool = False) -> list[dict]:
    """Seconds per training step of ``model_name`` built with each variant's constructor overrides,
    timed in alternating rounds of the same process (so a change of the machine's speed hits all
    alike). The stem convolution is frozen, as ``--whiten`` leaves it; channels_last; with
    ``compile_``, each variant runs through ``torch.compile(dynamic=False)`` as the trainer's
    ``--compile`` does (compiled in its warm-up steps, before the timed rounds)."""
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    steppers, times = {}, {name: [] for name in variants}
    for name, kwargs in variants.items():
        torch.manual_seed(0)
        model = create_model(model_name, **kwargs).to(memory_format=torch.channels_last)
        model.features.conv0.weight.requires_grad_(False)
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=0.1, momentum=0.9)
        run = torch.compile(model, dynamic=False) if compile_ else model

        def step(run=run, opt=opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = F.cross_entropy(run(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        steppers[name] = step
    for _ in range(rounds):
        for name, step in steppers.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t) / steps)
    reference = statistics.median(times[next(iter(variants))])
    return [{"model": model_name, "variant": name, "overrides": variants[name], "batch": batch, "amp": amp,
             "compile": compile_, "seconds_per_step": [round(v, 3) for v in times[name]],
             "median_images_per_second": round(batch / statistics.median(times[name]), 1),
             "median_time_ratio_to_first": round(statistics.median(times[name]) / reference, 3),
             "threads": torch.get_num_threads()} for name in variants]


# densenet-cpu-s's stem: 3x3/1 whitening + 2x2 max-pool against 3x3/2 whitening
STEM_VARIANTS = {"3x3/1 + 2x2 max-pool": {"stem_stride": 1, "stem_pool": True}, "3x3/2": {}}


# operator families of a training step, by the name torch.profiler gives the aten operator
STEP_FAMILIES = {
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution"),
    "batchnorm": ("aten::native_batch_norm", "aten::native_batch_norm_backward"),
    "relu": ("aten::relu_", "aten::clamp_min_", "aten::clamp_min", "aten::threshold_backward", "aten::relu"),
    "gelu": ("aten::gelu", "aten::gelu_backward"),
    "pooling": ("aten::max_pool2d_with_indices", "aten::max_pool2d_with_indices_backward", "aten::avg_pool2d",
                "aten::avg_pool2d_backward"),
    "concatenation": ("aten::cat",),
}


def step_profile(model_name: str, batch: int, amp: str = "none", overrides: dict | None = None,
                 warmup: int = 4, steps: int = 8) -> list[dict]:
    """Self CPU time per operator family of a channels_last training step (label smoothing as the
    recipes), the model built with the constructor ``overrides``, in bf16 autocast with ``amp="bf16"``."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = create_model(model_name, **(overrides or {})).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    seconds = (time.perf_counter() - t) / steps
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    family_of = {op: family for family, ops in STEP_FAMILIES.items() for op in ops}
    shares: dict[str, float] = {}
    for op, us in self_us.items():
        family = family_of.get(op, "other")
        shares[family] = shares.get(family, 0.0) + us
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:8]
    return [{"model": model_name, "overrides": overrides or {}, "batch": batch, "amp": amp,
             "seconds_per_step_profiled": round(seconds, 3),
             "threads": torch.get_num_threads(),
             "share": {k: round(v / total, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
             "top_operators": {k: round(v / total, 3) for k, v in top}}]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved by (dy, dx) pixels, the uncovered border filled by reflection."""
    p = max(abs(dy), abs(dx))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    return padded[:, :, p + dy : p + dy + x.shape[2], p + dx : p + dx + x.shape[3]]


def tta_views(weights: str, data_dir: str) -> list[dict]:
    """Test top-1 of single views and of averaged view sets (flip; flip x diagonal shifts of 1 and 2)."""
    from densenet.augment import Augmenter
    from densenet.data import load_dataset
    from densenet.inference import fast_inference_model
    from densenet.weights import load_model

    model, meta = load_model(weights)
    test = load_dataset(data_dir, split="test")
    normalise = Augmenter(meta["mean"], meta["std"], channels_last=True)
    runner = fast_inference_model(model, "cpu", "none")
    shifts = [(0, 0), (-1, -1), (1, 1), (-2, -2), (2, 2)]
    logits: dict[tuple, list] = {(s, f): [] for s in shifts for f in (False, True)}
    with torch.no_grad():
        for start in range(0, len(test), 500):
            x = normalise(test.images[start : start + 500], train=False)
            for shift, flip in logits:
                view = shifted(x, *shift) if shift != (0, 0) else x
                view = view.flip(3) if flip else view
                logits[shift, flip].append(runner(view.contiguous(memory_format=torch.channels_last)).float())
    views = {key: torch.cat(parts) for key, parts in logits.items()}

    def top1(z: torch.Tensor) -> float:
        return round(100 * (z.argmax(1) == test.labels).float().mean().item(), 2)

    def pair(shift: tuple) -> torch.Tensor:
        return views[shift, False] + views[shift, True]

    rows = [{"views": f"shift {s}{' mirrored' if f else ''}", "top1": top1(z)} for (s, f), z in views.items()]
    rows.append({"views": "flip (2 views)", "top1": top1(pair((0, 0)))})
    for d in (1, 2):
        shifted_pairs = pair((-d, -d)) + pair((d, d))
        rows.append({"views": f"flip x shifts of {d} (6 views, equal weights)", "top1": top1(pair((0, 0)) + shifted_pairs)})
        rows.append({"views": f"flip x shifts of {d} (6 views, unshifted pair weighted 1/2)",
                     "top1": top1(pair((0, 0)) / 2 + shifted_pairs / 4)})
    return [dict(row, weights=weights) for row in rows]


def ensembles(weights: list[str], data_dir: str, max_members: int = 3) -> list[dict]:
    """Test top-1 of each model's 6-view logits, then of their mean over every combination of 2 to
    ``max_members`` models."""
    import itertools

    from densenet.augment import Augmenter
    from densenet.data import load_dataset
    from densenet.inference import align_classes, fast_inference_model, tta_logits
    from densenet.weights import load_model

    logits, labels = {}, None
    for name in weights:
        model, meta = load_model(name)
        test = align_classes(load_dataset(data_dir, split="test", image_size=int(meta.get("input_size", 32))),
                             meta["classes"])
        if labels is not None and not torch.equal(labels, test.labels):
            raise SystemExit(f"cpu_levers.py: error: {name} was not trained on the first model's classes")
        labels = test.labels
        normalise = Augmenter(meta["mean"], meta["std"], channels_last=True)
        runner = fast_inference_model(model, "cpu", "none")
        with torch.no_grad():
            logits[name] = torch.cat([tta_logits(runner, normalise(test.images[start : start + 500], train=False), True)
                                      for start in range(0, len(test), 500)])

    def top1(z: torch.Tensor) -> float:
        return round(100 * (z.argmax(1) == labels).float().mean().item(), 2)

    rows = [{"members": [name], "top1": top1(z)} for name, z in logits.items()]
    for size in range(2, min(max_members, len(weights)) + 1):
        rows += [{"members": list(members), "top1": top1(sum(logits[m] for m in members) / size)}
                 for members in itertools.combinations(weights, size)]
    return rows


def _json_object(text: str, flag: str) -> dict:
    """The JSON object that ``flag`` was given, or a one-line exit naming the flag."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"cpu_levers.py: error: {flag} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"cpu_levers.py: error: {flag} must be a JSON object")
    return value


def _variants(text: str) -> dict[str, dict]:
    """--variants: a non-empty JSON object of name -> object of constructor overrides."""
    variants = _json_object(text, "--variants")
    if not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise SystemExit('cpu_levers.py: error: --variants must be a JSON object {"name": {overrides}, ...}')
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--models", default="densenet-bc-mini,densenet-cpu-s")
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--compile", action="store_true", help="also time torch.compile (slow to warm up)")
    s.add_argument("--threads", type=int, default=None)
    st = sub.add_parser("stem")
    st.add_argument("--batch", type=int, default=128)
    st.add_argument("--threads", type=int, default=None)
    va = sub.add_parser("variants")
    va.add_argument("--model", default="densenet-cpu-m")
    va.add_argument("--variants", required=True, help='JSON {"name": {constructor overrides}, ...}; the first '
                    "is the reference of the ratios")
    va.add_argument("--amp", choices=("none", "bf16"), default="none")
    va.add_argument("--batch", type=int, default=128)
    va.add_argument("--compile", action="store_true", help="time each variant compiled (torch.compile, "
                    "dynamic=False, as train --compile)")
    va.add_argument("--threads", type=int, default=None)
    a = sub.add_parser("accuracy")
    a.add_argument("--data-dir", required=True)
    a.add_argument("--set", default="{}", help="JSON of training settings over the quick recipe")
    a.add_argument("--subset", type=int, default=25000)
    a.add_argument("--epochs", type=int, default=2)
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--out-dir", default=None)
    pr = sub.add_parser("profile")
    pr.add_argument("--model", default="densenet-cpu-s")
    pr.add_argument("--model-kwargs", default="{}", help="JSON of constructor overrides")
    pr.add_argument("--amp", choices=("none", "bf16"), default="none")
    pr.add_argument("--batch", type=int, default=128)
    pr.add_argument("--threads", type=int, default=None)
    v = sub.add_parser("tta")
    v.add_argument("--weights", required=True, help="weights path or shipped model name")
    v.add_argument("--data-dir", required=True)
    v.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("ensemble")
    e.add_argument("--weights", required=True, help="comma-separated weights paths or shipped model names")
    e.add_argument("--data-dir", required=True)
    e.add_argument("--max-members", type=int, default=3)
    e.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    set_malloc_policy("retain")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.part == "speed":
        for name in args.models.split(","):
            for amp, cl, comp in [("none", True, False), ("none", False, False), ("bf16", True, False)] + (
                    [("none", True, True), ("bf16", True, True)] if args.compile else []):
                print(json.dumps(step_speed(name, args.batch, amp, cl, comp)), flush=True)
        return

    if args.part in ("stem", "variants"):
        model, variants, amp = ("densenet-cpu-s", STEM_VARIANTS, "none") if args.part == "stem" else (
            args.model, _variants(args.variants), args.amp)
        for row in variants_speed(model, variants, args.batch, amp, rounds=4 if args.part == "stem" else 5,
                                  compile_=args.part == "variants" and args.compile):
            print(json.dumps(row), flush=True)
        return

    if args.part == "profile":
        for row in step_profile(args.model, args.batch, args.amp, _json_object(args.model_kwargs, "--model-kwargs")):
            print(json.dumps(row), flush=True)
        return

    if args.part == "tta":
        for row in tta_views(args.weights, args.data_dir):
            print(json.dumps(row), flush=True)
        return

    if args.part == "ensemble":
        for row in ensembles(args.weights.split(","), args.data_dir, args.max_members):
            print(json.dumps(row), flush=True)
        return

    from densenet.trainer import train

    settings = dict(recipe="quick", data_dir=args.data_dir, subset=args.subset, epochs=args.epochs,
                    warmup_epochs=0.25 * args.epochs, max_minutes=None, fit_epochs=False, weights_dir=None,
                    progress="lines",
                    threads=args.threads, out_dir=args.out_dir or f"runs/levers-{int(time.time())}")
    settings.update(json.loads(args.set))
    t = time.time()
    result = train(**settings)
    print(json.dumps({"settings": json.loads(args.set), "subset": args.subset, "epochs": args.epochs,
                      "test_acc": result.final_test_acc, "images_per_second": round(result.images_per_second, 1),
                      "wall_seconds": round(time.time() - t, 1)}), flush=True)


if __name__ == "__main__":
    try:
        main()
    except DenseNetError as e:  # bad model name, setting, data or weights: one line, not a traceback
        raise SystemExit(f"cpu_levers.py: error: {e}") from None
