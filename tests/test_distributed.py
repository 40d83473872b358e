"""Distributed training: torchrun + DistributedDataParallel on the CPU (gloo), 2 processes.

The launches train a tiny DenseNet-BC (depth 10, k=4) on a tiny synthetic image folder (99 training
images, so the epoch's remainder is dropped; 21 test images, so the evaluation shards differ in
size). Each process logs its pid, its epoch indices and its final weights' hash through the
``DENSENET_DIST_DEBUG`` hook; a wrapper records the files each process writes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import densenet.train as T
from densenet import cli
from densenet import config as C
from densenet import distributed as D
from densenet import trainer as TR
from densenet.augment import epoch_batches
from densenet.errors import ConfigError
from densenet.weights import load_checkpoint
from helpers import coloured_image_folder

CLASSES = ("blue", "green", "red")
TRAIN_PER_CLASS, TEST_PER_CLASS = 33, 7
BATCH = 8  # per process
PYTHON = sys.executable

# runs densenet's command line after recording every file this process opens for writing or
# renames into place (atomic writes), one path per line in $DENSENET_DIST_DEBUG/writes-rank<R>.txt
WRITE_RECORDER = r'''
import builtins, os, sys
from pathlib import Path
real_open, real_replace, real_rename = builtins.open, os.replace, os.rename
log = Path(os.environ["DENSENET_DIST_DEBUG"]) / f"writes-rank{os.environ['RANK']}.txt"
log.parent.mkdir(parents=True, exist_ok=True)
def note(path):
    with real_open(log, "a") as f:
        f.write(os.path.abspath(os.fspath(path)) + "\n")
def recording_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
        note(file)
    return real_open(file, mode, *args, **kwargs)
def recording_replace(src, dst, *args, **kwargs):
    note(dst)
    return real_replace(src, dst, *args, **kwargs)
def recording_rename(src, dst, *args, **kwargs):
    note(dst)
    return real_rename(src, dst, *args, **kwargs)
builtins.open, os.replace, os.rename = recording_open, recording_replace, recording_rename
from densenet.cli import main
sys.exit(main(sys.argv[1:]))
'''


def make_image_folder(root: Path, seed=0) -> Path:
    return coloured_image_folder(root, (TRAIN_PER_CLASS, TEST_PER_CLASS), seed)


def train_args(data: Path, out: Path, *extra: str, epochs: int = 2) -> list[str]:
    return ["--model", "densenet-bc-10-4", "--data-dir", str(data), "--epochs", str(epochs),
            "--batch-size", str(BATCH), "--lr", "0.05", "--schedule", "cosine", "--out-dir", str(out),
            "--device", "cpu", "--progress", "lines", "--threads", "1", *extra]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def launch(command: list[str], env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def environment(tmp: Path, debug: Path | None, own_cache: bool = True, **extra) -> dict:
    env = dict(os.environ)
    for key in (*D.ENV_VARS, "MASTER_ADDR", "MASTER_PORT", TR.SIGTERM_AFTER_STEP_ENV, D.DEBUG_ENV):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if own_cache:
        env["DENSENET_CACHE"] = str(tmp / "cache")
    if debug is not None:
        env[D.DEBUG_ENV] = str(debug)
    env.update(extra)
    return env


def events(debug: Path, rank: int, kind: str) -> list[dict]:
    path = debug / f"rank{rank}.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["event"] == kind]


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "data")


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """One uninterrupted 2-process run of 2 epochs, through the write-recording wrapper."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "worker.py").write_text(WRITE_RECORDER)
    debug, out, weights = tmp / "debug", tmp / "run", tmp / "weights"
    command = torchrun(str(tmp / "worker.py"), "train",
                       *train_args(tiny_data, out, "--weights-dir", str(weights)))
    proc = launch(command, environment(tmp, debug), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "debug": debug, "out": out, "weights": weights, "proc": proc}


# --- a 2-process run --------------------------------------------------------------------------


def test_ranks_end_with_identical_weights_and_rank0_saved_them(ddp_run):
    ends = [events(ddp_run["debug"], r, "end") for r in (0, 1)]
    assert len(ends[0]) == len(ends[1]) == 1
    assert ends[0][0]["stop_reason"] == ends[1][0]["stop_reason"] == "completed"
    assert ends[0][0]["model_sha256"] == ends[1][0]["model_sha256"]
    for directory in (ddp_run["out"], ddp_run["weights"]):
        saved = weights_of(directory)
        assert not any(k.startswith("module.") for k in saved)
        assert D.state_hash(saved) == ends[0][0]["model_sha256"]


def test_only_rank0_prints_and_writes(ddp_run):
    debug, out, weights = ddp_run["debug"], ddp_run["out"], ddp_run["weights"]
    written = {r: set((debug / f"writes-rank{r}.txt").read_text().splitlines()) for r in (0, 1)}
    outputs = {os.path.abspath(out), os.path.abspath(weights)}

    def under_outputs(path: str) -> bool:
        return any(path == o or path.startswith(o + os.sep) for o in outputs)

    # rank 1 writes only its debug log and the decoded-image cache, never run files
    assert not any(under_outputs(p) for p in written[1]), sorted(written[1])
    allowed = (os.path.abspath(debug), os.path.abspath(ddp_run["tmp"] / "cache"))
    assert all(p.startswith(allowed) for p in written[1]), sorted(written[1])
    rank0_files = {Path(p).name for p in written[0] if under_outputs(p)}
    assert {"config.json", "metrics.jsonl", "metrics.csv", "checkpoint-last.pt", "checkpoint-best.pt",
            "model.safetensors", "model.json", "curves.png"} <= rank0_files
    stdout = ddp_run["proc"].stdout
    assert stdout.count("epoch 1/2 ") == 1 and stdout.count("epoch 2/2 ") == 1
    assert "2 processes (gloo), global batch 16 = 8 per process x 2, lr 0.05" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["resolved"]["global_batch_size"] == 16
    assert config["resolved"]["steps_per_epoch"] == 6


def test_each_epoch_is_split_into_disjoint_shares(ddp_run):
    n_train = len(CLASSES) * TRAIN_PER_CLASS  # 99: 98 shared out, 49 per process, 6 batches of 8
    per_epoch = {}
    for rank in (0, 1):
        for e in events(ddp_run["debug"], rank, "epoch"):
            per_epoch.setdefault(e["epoch"], {})[rank] = e
    assert sorted(per_epoch) == [0, 1]
    for records in per_epoch.values():
        shares = [records[r]["indices"] for r in (0, 1)]
        assert [len(s) for s in shares] == [6 * BATCH, 6 * BATCH]
        union = set(shares[0]) | set(shares[1])
        assert len(union) == 12 * BATCH  # no index twice, within or across processes
        assert union <= set(range(n_train))
        expected = epoch_batches(n_train, BATCH, epoch=records[0]["epoch"], seed=0, rank=0, world_size=2)
        assert shares[0] == torch.cat(expected).tolist()
    assert per_epoch[0][0]["indices"] != per_epoch[1][0]["indices"]  # reshuffled every epoch


def test_metrics_are_sums_over_processes(ddp_run):
    rows = [json.loads(line) for line in (ddp_run["out"] / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        local = [next(e for e in events(ddp_run["debug"], r, "epoch") if e["epoch"] == row["epoch"] - 1)
                 for r in (0, 1)]
        seen = sum(e["seen"] for e in local)
        assert seen == 12 * BATCH
        assert row["train_acc"] == sum(e["correct"] for e in local) / seen
        assert row["train_loss"] == pytest.approx(sum(e["loss_sum"] for e in local) / seen, rel=1e-12)
        assert row["images_per_second"] > 0


def test_reported_accuracy_equals_single_process_evaluate(ddp_run, tmp_path, capsys, monkeypatch, tiny_data):
    monkeypatch.setenv("DENSENET_CACHE", str(ddp_run["tmp"] / "cache"))
    rows = [json.loads(line) for line in (ddp_run["out"] / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((ddp_run["weights"] / "model.json").read_text())
    assert cli.main(["evaluate", "--weights", str(ddp_run["weights"]), "--data-dir", str(tiny_data),
                     "--device", "cpu", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == len(CLASSES) * TEST_PER_CLASS
    assert rows[-1]["test_acc"] == meta["training"]["final_test_acc"] == result["top1"]
    assert rows[-1]["test_loss"] == pytest.approx(result["loss"], rel=1e-6)
    assert meta["training"]["world_size"] == 2 and meta["training"]["global_batch_size"] == 16


@pytest.mark.skipif(not os.environ.get("DENSENET_DATA"), reason="needs $DENSENET_DATA (CIFAR-10)")
def test_real_subset_accuracy_is_over_the_whole_test_set(tmp_path, capsys):
    """2 processes, one epoch on 1,024 CIFAR-10 images; evaluated on all 10,000 test images."""
    data, out, debug = os.path.abspath(os.environ["DENSENET_DATA"]), tmp_path / "run", tmp_path / "debug"
    args = ["--model", "densenet-bc-10-4", "--data-dir", data, "--subset", "1024", "--epochs", "1",
            "--batch-size", "32", "--lr", "0.1", "--schedule", "constant", "--out-dir", str(out),
            "--weights-dir", str(tmp_path / "weights"), "--device", "cpu", "--progress", "lines"]
    proc = launch(torchrun("-m", "densenet", "train", *args), environment(tmp_path, debug, own_cache=False),
                  tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shares = [events(debug, r, "epoch")[0]["indices"] for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 16 * 32 and not set(shares[0]) & set(shares[1])
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert cli.main(["evaluate", "--weights", str(tmp_path / "weights"), "--data-dir", data, "--device", "cpu",
                     "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 10000
    assert row["test_acc"] == result["top1"]
    assert row["test_loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_fit_epochs_agrees_across_processes(tiny_data, tmp_path):
    """--fit-epochs times the steps in both processes and takes their slower speed: one choice for both.

    6 steps per epoch, so the timing window (global steps 6-35) ends in epoch 6; a 30-minute budget
    holds far more than the 8 epochs allowed, so both processes must settle on 8 and finish together.
    """
    out = tmp_path / "run"
    proc = launch(torchrun("-m", "densenet", "train", *train_args(tiny_data, out, "--fit-epochs", "--max-minutes",
                                                                   "30", epochs=8)),
                  environment(tmp_path, None), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("--fit-epochs:") == 1 and "so 8.00 of at most 8 epochs fit" in proc.stdout
    checkpoint = load_checkpoint(out / "checkpoint-last.pt")
    assert checkpoint["fitted_epochs"] == 8 and checkpoint["epoch"] == 8 and checkpoint["world_size"] == 2
    assert json.loads((out / "config.json").read_text())["config"]["epochs"] == 8


# --- resume -----------------------------------------------------------------------------------


def test_resume_of_a_stopped_run_gives_the_same_weights(ddp_run, tiny_data, tmp_path):
    out, debug = tmp_path / "run", tmp_path / "debug"
    # both processes get SIGTERM after global step 9 (epoch 2, step 3 of 6): they stop together
    stopped = launch(torchrun("-m", "densenet", "train", *train_args(tiny_data, out)),
                     environment(tmp_path, debug, **{TR.SIGTERM_AFTER_STEP_ENV: "9"}), tmp_path)
    assert stopped.returncode != 0
    checkpoint = load_checkpoint(out / "checkpoint-last.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"], checkpoint["world_size"]) == (1, 3, 2)
    assert checkpoint["partial"]["seen"] == 3 * BATCH * 2  # both processes' images
    assert not any(k.startswith("module.") for k in checkpoint["model"])
    for rank in (0, 1):
        (stop,) = events(debug, rank, "end")
        assert stop["stop_reason"] == "SIGTERM"
    mid_epoch = tmp_path / "mid-epoch.pt"
    mid_epoch.write_bytes((out / "checkpoint-last.pt").read_bytes())

    # the shortcut: densenet train --nproc 2 launches torchrun with the other arguments
    resumed = launch([PYTHON, "-m", "densenet", "train", "--nproc", "2", "--resume", "auto",
                      *train_args(tiny_data, out)], environment(tmp_path, debug), tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m densenet train" in resumed.stdout
    assert "from epoch 2, step 3" in resumed.stdout
    ends = [events(debug, r, "epoch")[-1] for r in (0, 1)]
    assert [(e["epoch"], e["start_step"], len(e["indices"])) for e in ends] == [(1, 3, 3 * BATCH)] * 2
    expected, got = weights_of(ddp_run["out"]), weights_of(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    # a checkpoint stopped in the middle of a 2-process epoch cannot go on in one process
    args = cli.build_parser().parse_args(["train", "--resume", str(mid_epoch), "--progress", "none"])
    with pytest.raises(ConfigError, match="2 processes"):
        TR.train(T.config_from_args(args))


def test_a_ddp_checkpoint_goes_on_in_one_process_at_an_epoch_boundary(ddp_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DENSENET_CACHE", str(ddp_run["tmp"] / "cache"))
    monkeypatch.delenv(TR.SIGTERM_AFTER_STEP_ENV, raising=False)
    monkeypatch.delenv(D.DEBUG_ENV, raising=False)
    stored = load_checkpoint(ddp_run["out"] / "checkpoint-last.pt")
    config = C.make_config(stored["config"], epochs=3, resume=str(ddp_run["out"]),
                           out_dir=str(tmp_path / "one"), weights_dir=None, progress="none")
    result = TR.train(config)
    assert result.stop_reason == "completed" and len(result.history) == 3
    final = load_checkpoint(tmp_path / "one" / "checkpoint-last.pt")
    # 12 single-process steps per epoch (99 // 8) after 2 epochs: the schedule counts from 2 * 12
    assert final["world_size"] == 1 and final["global_step"] == 36 and final["scheduler"]["last_epoch"] == 36
    # the cosine schedule ends at 0 after 3 x 12 steps (without the rebase it would be at 24 of 36)
    assert result.history[-1]["lr"] == 0.05 * C.lr_factor(36, 12, config) == 0.0


# --- failures ---------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} early:\n{out[-2000:]}\n{err[-2000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the processes to start training"
        time.sleep(0.2)


def test_killing_one_process_stops_the_other_within_60_s(tiny_data, tmp_path, monkeypatch):
    """A single-process checkpoint resumed by 2 processes; then rank 1 is killed."""
    monkeypatch.setenv("DENSENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(TR.SIGTERM_AFTER_STEP_ENV, str(99 // BATCH))  # stop at the end of epoch 1
    monkeypatch.delenv(D.DEBUG_ENV, raising=False)
    out, debug = tmp_path / "run", tmp_path / "debug"
    argv = ["train", *train_args(tiny_data, out, "--progress", "none"), "--epochs", "300"]
    args = cli.build_parser().parse_args(argv)
    result = TR.train(T.config_from_args(args))
    assert result.stop_reason == "SIGTERM" and result.epochs_completed == 1
    before = (out / "checkpoint-last.pt").read_bytes()

    command = torchrun("-m", "densenet", "train", *train_args(tiny_data, out, "--resume", "auto", epochs=300))
    proc = subprocess.Popen(command, env=environment(tmp_path, debug), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: events(debug, 1, "epoch") and events(debug, 0, "start"), 180, proc)
        (start,) = events(debug, 1, "start")
        assert start["start_epoch"] == 1 and start["global_step"] == 6  # rebased to 2-process steps
        os.kill(start["pid"], signal.SIGKILL)
        killed = time.monotonic()
        out_text, err_text = proc.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    (start0,) = events(debug, 0, "start")
    with pytest.raises(ProcessLookupError):
        os.kill(start0["pid"], 0)  # rank 0 is gone too
    # the last checkpoint is complete: the one from before, or one written since
    checkpoint = load_checkpoint(out / "checkpoint-last.pt")
    assert checkpoint["epoch"] >= 1
    assert checkpoint["world_size"] == (1 if (out / "checkpoint-last.pt").read_bytes() == before else 2)


def test_a_hung_process_makes_the_other_fail_after_the_timeout(tiny_data, tmp_path):
    """Without torchrun's agent: two processes started by hand; rank 1 is frozen with SIGSTOP."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    debug = tmp_path / "debug"
    procs = []
    for rank in (0, 1):
        env = environment(tmp_path, debug, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [PYTHON, "-m", "densenet", "train",
                   *train_args(tiny_data, tmp_path / "run", "--dist-timeout", "15", epochs=300)]
        procs.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _wait_for(lambda: events(debug, 1, "epoch"), 180, procs[0])
        os.kill(procs[1].pid, signal.SIGSTOP)
        stalled = time.monotonic()
        out, err = procs[0].communicate(timeout=60)
        assert time.monotonic() - stalled < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 2
    assert "Traceback" not in err
    assert "rank 0 of 2 lost the other processes" in err and "--dist-timeout 15 s" in err


# --- launcher and settings --------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--model", "densenet-bc-10-4", "--epochs", "3", "--lr", "0.1", "--no-flip", "--nesterov"],
    ["--recipe", "quick", "--no-channels-last", "--milestones", "0.5,0.75", "--weight-decay", "1e-05"],
    ["--resume", "auto", "--out-dir", "runs/x y", "--sync-bn", "--dist-timeout", "30"],
    ["--model-kwargs", '{"growth_rate": 8, "block_config": [2, 2, 2]}', "--tensorboard", "--flip"],
])
def test_the_nproc_shortcut_passes_the_other_arguments_on(argv):
    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    args = parser.parse_args([*argv, "--nproc", "4"])
    rebuilt = D.argv_from_args(parser, args, skip={"nproc"})
    assert "--nproc" not in rebuilt
    again = parser.parse_args(rebuilt)
    assert vars(again) == {**vars(args), "nproc": None}
    command = D.launch_command(4, rebuilt)
    assert command[:8] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "4", "-m", "densenet"]
    assert command[8:] == ["train", *rebuilt]


def test_launcher_environment_and_settings_errors(monkeypatch, capsys):
    assert D.env_ranks({}) is None
    assert D.env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ConfigError, match="inconsistent"):
        D.env_ranks({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="integers"):
        D.env_ranks({"RANK": "x", "WORLD_SIZE": "4"})
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--nproc", "2"]) == 2
    assert "under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert cli.main(["train", "--nproc", "0"]) == 2
    assert "--nproc must be" in capsys.readouterr().err
    assert cli.main(["train", "--sync-bn", "--device", "cpu"]) == 2
    assert "--sync-bn" in capsys.readouterr().err
    assert cli.main(["train", "--dist-timeout", "0"]) == 2
    assert "--dist-timeout" in capsys.readouterr().err


@pytest.mark.parametrize("n,world", [(21, 2), (10, 3), (2, 4), (0, 2)])
def test_evaluation_shards_cover_every_item_once(n, world):
    shards = [D.shard_indices(n, r, world).tolist() for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_reduce_evaluation_of_one_process_rebuilds_the_counts():
    result = {"num_samples": 4, "loss": 0.25, "top5": 0.75, "confusion": [[1, 1], [0, 2]]}
    reduced = D.reduce_evaluation(D.Context(), result, ["a", "b"])
    assert reduced["top1"] == 0.75 and reduced["top5"] == 0.75 and reduced["loss"] == 0.25
    assert [c["correct"] for c in reduced["per_class"]] == [1, 2]
    assert [c["total"] for c in reduced["per_class"]] == [2, 2]


def test_state_hash_sees_every_value_and_name():
    a = {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3)}
    assert D.state_hash(a) == D.state_hash({k: v.clone() for k, v in a.items()})
    nudged = a["w"].clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(float("inf")))  # one ulp
    assert D.state_hash(a) != D.state_hash({**a, "w": nudged})
    assert D.state_hash(a) != D.state_hash({"v": a["w"], "n": a["n"]})
