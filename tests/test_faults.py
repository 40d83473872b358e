"""Fault injection: a training run survives being killed, a full disk, damaged files and running out of memory.

Kills: ``densenet train --resume auto`` runs in a child process (this file run as a script) that
SIGKILLs itself at a seeded place -- mid-epoch after an optimizer step, after an epoch's last step,
part-way through writing a file (a checkpoint, the metrics, the plot, config.json, the final
weights), before its fsync, just before or just after the rename that puts it in place. After every
kill the last checkpoint must load and never go backwards; the next ``--resume auto`` must say it
continues from that checkpoint; and the finished run's weights, EMA, optimizer state and metrics
must equal an uninterrupted run's exactly (``torch.equal``), with no temporary files left. Another
test kills the child from outside at random times.

Also: a disk that fills while any of the run's files is written (ENOSPC part-way through the write),
checkpoints and weights that are truncated or have a flipped bit, outputs that cannot be written,
and a real out-of-memory (the child's address space capped with ``RLIMIT_AS``): each is a one-line
error naming the file (or the batch size), and the previous checkpoint stays intact.

``DENSENET_FAULT_KILLS`` sets the number of seeded kills (default 10: one chain, each kind of place
once and two drawn; every 10 more start another chain), ``DENSENET_FAULT_SEED`` their
seed, ``DENSENET_FAULT_TIMED_KILLS`` the kills at random times (default 3). With
``DENSENET_RELIABILITY_JSON`` set, counts of the faults injected and survived are added to that file.
Runs on the real CIFAR-10 copy (a 48-image subset) when ``$DENSENET_DATA`` is set, else on a tiny
synthetic image folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from helpers import add_to_reliability_summary, coloured_image_folder

FAULT_ENV = "DENSENET_TEST_FAULT"
MEMORY_LIMIT_ENV = "DENSENET_TEST_MEMORY_LIMIT_MB"
KILLS = int(os.environ.get("DENSENET_FAULT_KILLS") or 10)
SEED = int(os.environ.get("DENSENET_FAULT_SEED") or 0)
EPOCHS, BATCH = 4, 16
STATS: dict[str, Counter] = defaultdict(Counter)
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc/self and SIGKILL")


# --- the child process: install one fault, then run the command line ---------------------------


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class DyingFile:
    """A file object that SIGKILLs the process once ``limit`` bytes are written, or at its first flush."""

    def __init__(self, f, limit: int):
        self._f, self._left = f, limit

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) >= self._left:
            self._f.write(data[: self._left])
            self._f.flush()
            _die()
        self._left -= len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()
        _die()  # every byte is written, nothing is synced or renamed yet

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def install_fault(spec: dict) -> None:
    """Arrange for this process to SIGKILL itself at the ``spec["n"]``-th event of ``spec["kind"]``.

    Events: ``step`` (after an optimizer step), and for the file named ``spec["file"]``: ``write``
    (after ``spec["bytes"]`` bytes of it, or at its flush), ``fsync`` (before it), ``replace``
    (before the rename that puts it in place) and ``replaced`` (just after that rename).
    """
    kind, n, file = spec["kind"], spec["n"], spec.get("file")
    seen = [0]

    def nth(name: str | None = None) -> bool:
        if file is not None and name != file:
            return False
        seen[0] += 1
        return seen[0] == n

    def target(path) -> str:  # ".checkpoint-last.pt.x1y2z3ab.tmp" -> "checkpoint-last.pt"
        base = os.path.basename(path)
        return base[1:].rsplit(".", 2)[0] if base.startswith(".") and base.endswith(".tmp") else base

    def fd_target(fd: int) -> str:
        return target(os.readlink(f"/proc/self/fd/{fd}"))

    if kind == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda *args: _die() if nth() else None)
    elif kind == "write":
        real_fdopen = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real_fdopen(fd, mode, *args, **kwargs)
            return DyingFile(f, spec["bytes"]) if "w" in mode and nth(fd_target(fd)) else f

        os.fdopen = fdopen
    elif kind == "fsync":
        real_fsync = os.fsync
        os.fsync = lambda fd: _die() if nth(fd_target(fd)) else real_fsync(fd)
    elif kind in ("replace", "replaced"):
        real_replace = os.replace

        def replace(src, dst, **kwargs):
            if kind == "replace" and nth(target(src)):
                _die()
            real_replace(src, dst, **kwargs)
            if kind == "replaced" and nth(target(dst)):
                _die()

        os.replace = replace
    else:
        raise ValueError(f"unknown fault {kind!r}")


def child_main() -> int:
    spec = os.environ.get(FAULT_ENV)
    if spec:
        install_fault(json.loads(spec))
    from densenet import cli, data, evaluate, models, train, weights  # noqa: F401  (imported before the limit)

    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:  # address space: what this process has mapped now, plus the allowance
        import resource

        status = Path("/proc/self/status").read_text()
        mapped = int(status.split("VmSize:")[1].split()[0]) * 1024
        allowed = mapped + int(limit) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (allowed, allowed))
    return cli.main(sys.argv[1:])


# --- helpers of the tests ----------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    add_to_reliability_summary("faults", {k: dict(v) for k, v in STATS.items()})


def make_image_folder(root: Path, per_class=(16, 4), seed=0) -> Path:
    return coloured_image_folder(root, per_class, seed)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(data directory, extra train flags, environment) shared by the tests of this module."""
    base = tmp_path_factory.mktemp("faults")
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    env.pop(MEMORY_LIMIT_ENV, None)
    env.pop("DENSENET_SIGTERM_AFTER_STEP", None)
    if os.environ.get("DENSENET_DATA"):
        data, extra = os.environ["DENSENET_DATA"], ["--subset", "48", "--test-subset", "16"]
    else:
        data, extra = str(make_image_folder(base / "data")), []
        env["DENSENET_CACHE"] = str(base / "cache")
    # decode once so that no child process writes the cache (and every child sees the same images)
    subprocess.run([sys.executable, "-c", f"from densenet.data import load_splits; load_splits({data!r})"],
                   env=env, check=True, timeout=900)
    return data, extra, env


def train_argv(data: str, extra: list[str], out: Path, weights: Path) -> list[str]:
    return ["train", "--model", "densenet-bc-10-4", "--data-dir", data, *extra, "--epochs", str(EPOCHS),
            "--batch-size", str(BATCH), "--lr", "0.05", "--schedule", "cosine", "--dropout", "0.1",
            "--ema", "0.8", "--out-dir", str(out), "--weights-dir", str(weights), "--device", "cpu",
            "--threads", "1", "--progress", "lines", "--resume", "auto"]


def run_child(argv: list[str], env: dict, fault: dict | None = None, kill_after: float | None = None,
              memory_mb: int | None = None):
    """Run the command line in a child process; returns (exit status, stdout, stderr)."""
    env = dict(env)
    if fault:
        env[FAULT_ENV] = json.dumps(fault)
    if memory_mb:
        env[MEMORY_LIMIT_ENV] = str(memory_mb)
    cmd = [sys.executable, __file__, *argv]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=kill_after if kill_after is not None else 600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def checkpoint_state(out: Path):
    """The loaded checkpoint-last.pt of a run, or None when there is none yet."""
    from densenet.weights import load_checkpoint

    path = out / "checkpoint-last.pt"
    return load_checkpoint(path) if path.exists() else None


def final_state(out: Path, weights: Path) -> dict:
    from safetensors.torch import load_file

    ckpt = checkpoint_state(out)
    history = [{k: row[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")}
               for row in ckpt["history"]]
    return {"model": ckpt["model"], "ema": ckpt["ema"], "momentum": ckpt["optimizer"]["state"],
            "history": history, "weights": load_file(weights / "model.safetensors"),
            "run_weights": load_file(out / "model.safetensors")}


def assert_same_training(a: dict, b: dict) -> None:
    for part in ("model", "ema", "weights", "run_weights"):
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for index, entry in a["momentum"].items():
        assert torch.equal(entry["momentum_buffer"], b["momentum"][index]["momentum_buffer"]), index
    assert a["history"] == b["history"]


def temp_files(*folders: Path) -> list[str]:
    return sorted(str(p) for folder in folders if folder.exists() for p in folder.iterdir() if p.name.endswith(".tmp"))


REFERENCE_SECONDS: list[float] = []


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    data, extra, env = dataset
    base = tmp_path_factory.mktemp("reference")
    t0 = time.monotonic()
    code, out, err = run_child(train_argv(data, extra, base / "run", base / "w"), env)
    assert code == 0, err
    REFERENCE_SECONDS.append(time.monotonic() - t0)  # how long the whole run takes on this machine
    return final_state(base / "run", base / "w")


# --- SIGKILL at seeded points ------------------------------------------------------------------


STEPS_PER_EPOCH = 3  # 48 training images, batches of 16
EPOCH_FILES = ["checkpoint-last.pt", "metrics.jsonl", "metrics.csv", "curves.png"]  # in the order written
FINAL_FILES = ["model.safetensors", "model.json"]  # written to the run folder, then to the weights folder
FILE_EVENTS = ["write", "fsync", "replace", "replaced"]  # in the order they happen to one file
PLACES = ["mid-epoch", "checkpoint", "epoch end", "epoch file", "checkpoint", "final weights", "mid-epoch",
          "start"]


def kill_points(rng: random.Random, count: int) -> list[dict]:
    """``count`` different places to kill one run, in the order the run reaches them.

    A place is an optimizer step (mid-epoch, or an epoch's last step before its checkpoint) or an
    event of one file: part-way through writing it, before its fsync, before or after its rename --
    for a file of epoch ``epoch``, for the final weights, or for config.json (at the start of
    whichever process resumes next).
    """
    points: dict[tuple, dict] = {}
    starts = []
    for i in range(count):  # the kinds of place in turn, the details drawn from the seed
        where = PLACES[(rng.randrange(len(PLACES)) if i >= len(PLACES) else i)]
        if where in ("mid-epoch", "epoch end"):
            epoch = rng.randint(1, EPOCHS)
            g = (epoch - 1) * STEPS_PER_EPOCH + (rng.randint(1, STEPS_PER_EPOCH - 1) if where == "mid-epoch"
                                                  else STEPS_PER_EPOCH)
            points[(g - 1) // STEPS_PER_EPOCH, 0, g] = {"kind": "step", "step": g}
            continue
        kind = rng.choice(FILE_EVENTS)
        file = {"checkpoint": "checkpoint-last.pt", "epoch file": rng.choice(EPOCH_FILES[1:]),
                "final weights": rng.choice(FINAL_FILES), "start": "config.json"}[where]
        point = {"kind": kind, "file": file}
        if kind == "write":
            point["bytes"] = rng.choice([0, 1, 64, 700, 5000, 10**9])
        if file == "config.json":
            starts.append(point)
        elif file in EPOCH_FILES:
            point["epoch"] = rng.randint(1, EPOCHS)
            points[point["epoch"] - 1, 1, EPOCH_FILES.index(file), FILE_EVENTS.index(kind)] = point
        else:
            point["occurrence"] = rng.randint(1, 2)
            points[EPOCHS, 2, point["occurrence"], FINAL_FILES.index(file), FILE_EVENTS.index(kind)] = point
    ordered = [points[key] for key in sorted(points)]
    for point in starts:
        ordered.insert(rng.randint(0, len(ordered)), point)
    return ordered


def fault_for(point: dict, ckpt) -> dict | None:
    """The fault that kills a process resuming from ``ckpt`` at ``point`` (None: the run is past it)."""
    done_epochs = int(ckpt["epoch"]) if ckpt is not None else 0
    if point["kind"] == "step":
        n = point["step"] - done_epochs * STEPS_PER_EPOCH
    elif point["file"] == "config.json":
        n = 1
    elif point["file"] in EPOCH_FILES:
        n = point["epoch"] - done_epochs
    else:
        n = point["occurrence"]
    return dict(point, n=n) if n >= 1 else None


def describe(point: dict) -> str:
    """Where a kill lands, in words, for the summary."""
    if point["kind"] == "step":
        g = point["step"]
        if g % STEPS_PER_EPOCH:
            return "mid-epoch, after an optimizer step"
        return "after an epoch's last step, before its checkpoint"
    file = point["file"]
    if point["kind"] == "write":
        amount = "every byte, before its flush" if point["bytes"] >= 10**9 else "cut part-way"
        return f"writing {file} ({amount})"
    return {"fsync": f"{file} written, before its fsync", "replace": f"{file} synced, before its rename",
            "replaced": f"just after the rename of {file}"}[point["kind"]]


def resumed_from(stdout: str) -> str:
    """What the run says it started from: "epoch E, step S", "scratch", or "" (killed too early to say)."""
    for line in stdout.splitlines():
        if line.startswith("training "):
            return line.split(" from ", 1)[1].split(";")[0] if " from epoch" in line else "scratch"
    return ""


def test_sigkill_at_seeded_points_then_resume_gives_the_uninterrupted_weights(dataset, reference, tmp_path):
    from densenet.errors import WeightsError
    from densenet.weights import load_model

    data, extra, env = dataset
    rng = random.Random(SEED)
    stats = STATS["sigkill at seeded points"]
    kills, chain = 0, 0
    while kills < KILLS:
        chain += 1
        out, weights = tmp_path / f"run{chain}", tmp_path / f"w{chain}"
        argv = train_argv(data, extra, out, weights)
        previous_step = -1
        for point in kill_points(rng, min(10, KILLS - kills)) + [None]:
            ckpt = checkpoint_state(out)  # loads: intact after every kill
            if ckpt is not None:
                assert ckpt["global_step"] >= previous_step, "a checkpoint went backwards"
                assert ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == ckpt["epoch"] * STEPS_PER_EPOCH
                previous_step = ckpt["global_step"]
            fault = fault_for(point, ckpt) if point is not None else None
            if point is not None and fault is None:
                stats["points already passed (a kill just after a checkpoint's rename)"] += 1
                continue
            leftovers = set(temp_files(out, weights))
            code, stdout, stderr = run_child(argv, env, fault)
            started = resumed_from(stdout)
            expected = "scratch" if ckpt is None else f"epoch {ckpt['epoch'] + 1}, step 0"
            assert started in ("", expected), (fault, started, expected)
            if fault is None:
                assert code == 0, stderr
                break
            assert code == -signal.SIGKILL, (fault, code, stderr)  # every planned kill happens
            kills += 1
            stats[f"killed: {describe(fault)}"] += 1
            stats["temporary files left by kills"] += len(set(temp_files(out, weights)) - leftovers)
            if (weights / "model.safetensors").exists():  # a pair cut between its renames is refused
                try:
                    load_model(weights)
                except WeightsError as exc:
                    assert "SHA-256 differs" in str(exc) or "differs from the description" in str(exc), exc
                    stats["weights folder refused after a kill (mismatched pair), rewritten on resume"] += 1
        assert_same_training(final_state(out, weights), reference)
        stats["finished runs equal to the uninterrupted one"] += 1
        assert temp_files(out, weights) == [], "temporary files of killed writes were left behind"
    stats["kills"] = kills


def test_sigkill_at_random_times_from_outside(dataset, reference, tmp_path):
    """Real external kills at seeded random delays, scaled to the measured length of the whole run.

    Each delay is 10-25% of the uninterrupted run's wall time, and a kill loses everything after the
    last checkpoint, so even the last of the kills lands before the run could finish (at most 75% of
    it is done by then): every attempt must be killed, and the run then resumes to the reference.
    """
    data, extra, env = dataset
    rng = random.Random(SEED + 1)
    argv = train_argv(data, extra, tmp_path / "run", tmp_path / "w")
    kills = int(os.environ.get("DENSENET_FAULT_TIMED_KILLS") or 3)
    assert 1 <= kills <= 3, "more kills need smaller delays to stay before the end of the run"
    (whole,) = REFERENCE_SECONDS
    stats = STATS["sigkill at random times"]
    for attempt in range(kills):
        t0 = time.monotonic()
        delay = rng.uniform(0.10, 0.25) * whole
        code, stdout, _ = run_child(argv, env, kill_after=delay)
        assert code == -signal.SIGKILL, f"attempt {attempt + 1} was not killed at {delay:.1f} s of {whole:.1f} s"
        stats["killed"] += 1
        checkpoint_state(tmp_path / "run")  # loads (or is absent)
        stats["seconds"] += round(time.monotonic() - t0)
    code, _, err = run_child(argv, env)
    assert code == 0, err
    assert_same_training(final_state(tmp_path / "run", tmp_path / "w"), reference)
    assert temp_files(tmp_path / "run", tmp_path / "w") == []


# --- disk full ---------------------------------------------------------------------------------


class FullDisk:
    """Patches ``os.fdopen`` so that the next write of the file named ``target`` fails with ENOSPC part-way."""

    def __init__(self, monkeypatch, target: str, after_bytes: int = 100):
        self.target, self.after, self.fired = target, after_bytes, 0
        real = os.fdopen

        def fdopen(fd, mode="r", *args, **kwargs):
            f = real(fd, mode, *args, **kwargs)
            name = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]
            return self._wrap(f) if "w" in mode and not self.fired and name.startswith(f".{target}.") else f

        monkeypatch.setattr(os, "fdopen", fdopen)

    def _wrap(self, f):
        disk = self

        class Filling:
            def write(self, data):
                data = bytes(data)
                if len(data) > disk.after:
                    f.write(data[: disk.after])
                    disk.fired += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.after -= len(data)
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()
                return False

        return Filling()


def tiny_train_argv(data: str, extra: list[str], out: Path, weights: Path, epochs: int) -> list[str]:
    argv = train_argv(data, extra, out, weights)
    argv[argv.index("--epochs") + 1] = str(epochs)
    argv[argv.index("--progress") + 1] = "none"
    return argv


@pytest.fixture(autouse=True)
def in_process(dataset, monkeypatch):
    """Commands run in this process read the same decoded-image cache as the children."""
    data, extra, env = dataset
    if "DENSENET_CACHE" in env:
        monkeypatch.setenv("DENSENET_CACHE", env["DENSENET_CACHE"])
    return data, extra


@pytest.mark.parametrize("target", ["config.json", "checkpoint-last.pt", "checkpoint-best.pt", "metrics.jsonl",
                                    "metrics.csv", "curves.png", "model.safetensors", "model.json"])
def test_disk_full_while_saving_is_a_clear_error_and_the_run_resumes(in_process, reference, tmp_path,
                                                                     monkeypatch, capsys, target):
    from densenet import cli
    from densenet.weights import load_checkpoint

    data, extra = in_process
    out, weights = tmp_path / "run", tmp_path / "w"
    monkeypatch.setenv("DENSENET_SIGTERM_AFTER_STEP", "3")  # stop cleanly after epoch 1 of the same run
    assert cli.main(tiny_train_argv(data, extra, out, weights, epochs=EPOCHS)) == 143
    monkeypatch.delenv("DENSENET_SIGTERM_AFTER_STEP")
    if target == "checkpoint-best.pt":  # so that epoch 2 is a new best whatever its accuracy
        ckpt = load_checkpoint(out / "checkpoint-last.pt")
        torch.save(dict(ckpt, best={"acc": -1.0, "epoch": 1}), out / "checkpoint-last.pt")
    before = (out / "checkpoint-last.pt").read_bytes()
    capsys.readouterr()

    disk = FullDisk(monkeypatch, target)
    code = cli.main(tiny_train_argv(data, extra, out, weights, epochs=EPOCHS))  # resumes at epoch 2
    err = capsys.readouterr().err.strip()
    assert disk.fired == 1 and code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{target}: No space left on device" in err and "is intact" in err, err
    assert f"densenet train --resume {out}" in err, err
    ckpt = load_checkpoint(out / "checkpoint-last.pt")  # the previous (or the new, complete) checkpoint
    assert ckpt["epoch"] >= 1
    if target == "checkpoint-last.pt":
        assert (out / "checkpoint-last.pt").read_bytes() == before
    assert temp_files(out, weights) == []
    STATS["disk full while saving"][f"ENOSPC writing {target}: clear error, checkpoint intact"] += 1

    # space freed (the disk fills only once): the same command finishes the run as if nothing had happened
    assert cli.main(tiny_train_argv(data, extra, out, weights, epochs=EPOCHS)) == 0
    assert_same_training(final_state(out, weights), reference)


# --- damaged files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    data, extra, env = dataset
    base = tmp_path_factory.mktemp("finished")
    code, _, err = run_child(tiny_train_argv(data, extra, base / "run", base / "w", epochs=1), env)
    assert code == 0, err
    return base


def _damage(raw: bytes, how: str) -> bytes:
    if how == "empty":
        return b""
    if how.startswith("truncated"):
        return raw[: int(len(raw) * float(how.split()[1]))]
    position = {"start": 1, "middle": len(raw) // 2, "end": len(raw) - 30}[how.split()[1]]
    if how == "bitflip middle" and raw.startswith(b"PK"):  # a zip: the middle of its largest tensor's bytes
        import struct
        import zipfile

        entry = max(zipfile.ZipFile(io.BytesIO(raw)).infolist(), key=lambda i: i.file_size)
        name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])
        position = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    return raw[:position] + bytes([raw[position] ^ 0x10]) + raw[position + 1 :]


# bit flips where every byte matters: the zip signature / the header length / JSON syntax at the start, tensor
# data (of a checkpoint: of its largest entry, not the padding between entries) or model.json values in the
# middle, the zip directory / tensor data / JSON near the end
DAMAGE = ["empty", "truncated 0.01", "truncated 0.5", "truncated 0.999", "bitflip start", "bitflip middle",
          "bitflip end"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_refused_naming_the_file(finished_run, dataset, tmp_path, capsys, how):
    import shutil

    from densenet import cli

    data, extra, _ = dataset
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    path = run / "checkpoint-last.pt"
    path.write_bytes(_damage(path.read_bytes(), how))
    for argv in (tiny_train_argv(data, extra, run, tmp_path / "w", epochs=2),  # --resume auto
                 ["evaluate", "--weights", str(path), "--data-dir", data, "--device", "cpu"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"{path} " in err or f"{path}:" in err, err
        assert any(w in err for w in ("not a readable checkpoint", "is corrupt", "checkpoint dictionary")), err
    STATS["damaged files"][f"checkpoint {how}: refused naming the file"] += 1


@pytest.mark.parametrize("file", ["model.safetensors", "model.json"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_weights_are_refused_naming_the_file(finished_run, tmp_path, capsys, file, how):
    import shutil

    from densenet import cli

    weights = tmp_path / "w"
    shutil.copytree(finished_run / "w", weights)
    path = weights / file
    path.write_bytes(_damage(path.read_bytes(), how))
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    assert cli.main(["predict", "--weights", str(weights), str(image), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(path) in err, err
    STATS["damaged files"][f"{file} {how}: refused naming the file"] += 1


def test_outputs_that_cannot_be_written_are_one_line_errors(finished_run, dataset, tmp_path, capsys):
    """Every command that writes files, pointed under a regular file (so that no folder can be made)."""
    from densenet import cli

    data, extra, _ = dataset
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    under = blocker / "sub"
    weights, run = finished_run / "w", finished_run / "run"
    train = tiny_train_argv(data, extra, tmp_path / "run", tmp_path / "w", epochs=1)
    commands = {
        "train --out-dir": tiny_train_argv(data, extra, under, tmp_path / "w", epochs=1),
        "train --weights-dir": train[: train.index("--weights-dir") + 1] + [str(under)] + train[
            train.index("--weights-dir") + 2 :],
        "evaluate --out": ["evaluate", "--weights", str(weights), "--data-dir", data, "--out", str(under)],
        "export --out": ["export", "--weights", str(weights), "--data-dir", data, "--out", str(under / "m.onnx"),
                         "--check-images", "4"],
        "analyze --feature-reuse --out": ["analyze", "--weights", str(weights), "--feature-reuse", "--out",
                                          str(under)],
        "report --out": ["report", str(run), "--no-evaluate", "--out", str(under / "r.html")],
    }
    for name, argv in commands.items():
        code = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 1, (name, code, err)  # the machine refused: exit 1 (errors.py)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert str(blocker) in err, (name, err)
        STATS["unwritable outputs"][f"{name}: one-line error"] += 1


# --- out of memory -----------------------------------------------------------------------------


def test_out_of_memory_is_a_clear_error_and_the_checkpoint_survives(dataset, tmp_path):
    """A real allocation failure: the child's address space is capped just above what resuming needs."""
    from densenet.weights import load_checkpoint

    data, extra, env = dataset
    out = tmp_path / "run"
    argv = train_argv(data, extra, out, tmp_path / "w")
    argv[argv.index("densenet-bc-10-4")] = "densenet-bc-100-12"  # ~2 GB of activations at batch 48
    argv[argv.index("--batch-size") + 1] = "48"
    argv[argv.index("--epochs") + 1] = "1"
    code, _, err = run_child(argv, env)
    assert code == 0, err
    before = (out / "checkpoint-last.pt").read_bytes()
    argv[argv.index("--epochs") + 1] = "2"
    code, stdout, err = run_child(argv, env, memory_mb=600)
    err = err.strip()
    assert code == 1, (stdout, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "out of memory" in err and "--batch-size" in err and "--memory-efficient" in err, err
    assert str(out / "checkpoint-last.pt") in err and "is intact" in err, err
    assert (out / "checkpoint-last.pt").read_bytes() == before
    assert load_checkpoint(out / "checkpoint-last.pt")["epoch"] == 1
    assert temp_files(out) == []
    STATS["out of memory"]["training step under RLIMIT_AS: clear error, checkpoint intact"] += 1


if __name__ == "__main__":
    sys.exit(child_main())
