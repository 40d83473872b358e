"""``densenet bench`` runs and reports well-formed results (tiny model, few steps; no timing assertions)."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys

import pytest
import torch

from densenet import bench, cli, runtime
from densenet.errors import ConfigError


@pytest.fixture(autouse=True)
def keep_thread_count():
    """--threads changes torch's process-wide setting: put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_json(capsys, *argv: str) -> dict:
    assert cli.main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


TINY = ["--model", "densenet-bc-10-4", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]


def test_train_json_with_child_process_memory(capsys):
    r = run_json(capsys, *TINY, "--mode", "train", "--device", "cpu")
    assert r["model"] == "densenet-bc-10-4" and r["mode"] == "train" and r["batch_size"] == 4
    assert r["input"] == "synthetic random" and r["image_size"] == 32
    assert r["amp"] == "none" and r["channels_last"] is True and r["compile"] is False
    assert r["optimized"] is False  # the inference path is for inference only
    assert r["steps"] == 2 and len(r["ms_per_step_all"]) == 2
    assert all(positive(t) for t in r["ms_per_step_all"])
    assert positive(r["ms_per_step"]) and positive(r["images_per_s"])
    assert r["images_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1e3))
    assert r["ms_per_step"] == pytest.approx(sorted(r["ms_per_step_all"])[0] / 2 + sorted(r["ms_per_step_all"])[1] / 2)
    assert positive(r["peak_memory_mb"]) and positive(r["rss_before_mb"])
    assert r["step_memory_mb"] == pytest.approx(r["peak_memory_mb"] - r["rss_before_mb"])
    assert r["peak_memory_mb"] >= r["rss_before_mb"]
    assert "child process" in r["peak_memory_kind"]
    assert r["device"] == "cpu" and r["threads"] == 1 and r["date"]


def test_child_peak_does_not_include_the_parent(capsys):
    """Linux carries a parent's ru_maxrss over into its children; the child's own peak is what counts."""
    ballast = bytearray(1200 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page: the parent is now > 1.2 GiB resident
    r = run_json(capsys, *TINY, "--mode", "infer", "--device", "cpu")
    assert 0 < r["peak_memory_mb"] < 1000
    del ballast


def test_infer_text_report(capsys):
    assert cli.main(["bench", *TINY, "--mode", "infer", "--no-memory", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "densenet-bc-10-4 infer, batch 4" in out and "optimize_for_inference" in out
    assert "synthetic random inputs; 1 warm-up + 2 timed steps" in out
    assert "images/s" in out and "peak memory" not in out


@pytest.mark.parametrize("extra", [
    ["--amp", "bf16", "--memory-efficient", "--allocator", "release"],
    ["--no-channels-last", "--allocator", "retain"],
])
def test_train_options(extra):
    # in a child process: the malloc policy is process-wide and must not leak into other tests
    proc = subprocess.run([sys.executable, "-m", "densenet", "bench", *TINY, "--mode", "train", "--device", "cpu",
                           "--no-memory", "--json", *extra], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert positive(r["images_per_s"])
    assert r["amp"] == ("bf16" if "bf16" in extra else "none")
    assert r["memory_efficient"] is ("--memory-efficient" in extra)
    assert r["channels_last"] is ("--no-channels-last" not in extra)
    assert r["allocator"] == extra[-1]
    assert "peak_memory_mb" not in r


def test_infer_plain_model_and_bf16(capsys):
    r = run_json(capsys, *TINY, "--mode", "infer", "--no-optimized", "--amp", "bf16", "--no-memory")
    assert r["optimized"] is False and r["amp"] == "bf16" and positive(r["images_per_s"])


def test_child_argv_reproduces_the_settings():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "--model", "densenet-bc-mini", "--mode", "infer", "--batch-size", "8",
                              "--no-channels-last", "--no-optimized", "--memory-efficient", "--threads", "1",
                              "--image-size", "40", "--amp", "bf16"])
    again = parser.parse_args(["bench", *bench._child_argv(args)])
    for key in ("model", "mode", "batch_size", "channels_last", "optimized", "memory_efficient", "threads",
                "image_size", "amp", "device", "allocator", "compile"):
        assert getattr(again, key) == getattr(args, key), key


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc policies need glibc")
def test_malloc_policies():
    code = ("from densenet import runtime; print(runtime.set_malloc_policy('release'), "
            "runtime.set_malloc_policy('retain'), runtime.set_malloc_policy('default'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]
    with pytest.raises(ConfigError, match="allocator policy"):
        runtime.set_malloc_policy("jemalloc")


def test_auto_settings_are_chosen_in_one_place():
    cpu = bench.auto_settings(torch.device("cpu"))
    assert cpu == {"amp": "none", "channels_last": True, "optimized": True, "compile": False}


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--threads", "0"], "--threads"),
    (["--model", "densenet-bc-11-4"], "depth"),
    (["--mode", "train", "--amp", "fp16", "--device", "cpu"], "fp16"),
])
def test_bad_settings_are_one_line_errors(capsys, argv, message):
    assert cli.main(["bench", "--model", "densenet-bc-10-4", *argv, "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
