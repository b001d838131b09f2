"""Crashes, full disks, NaN losses and bad input: the run folder survives, errors are one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cnnpress
from cnnpress import atomic
from cnnpress.cli import commands, files
from cnnpress.cli.main import main
from cnnpress.data import Loader, load_dataset
from cnnpress.data.idx import write_idx
from cnnpress.train.checkpoint import load_checkpoint
from cnnpress.train.config import TrainConfig
from cnnpress.train.loop import fit, make_optimizer

SLBF_RECIPE = """\
model: resnet20
model_args: {width: 8}
data: synthetic
data_options: {num_samples: 128}
method: slbf
method_config: {slice_channels: 4, num_filters: 4}
train: {epochs: 6, batch_size: 32, lr: 0.05}
"""
LENET = ["--model", "lenet5", "--data", "synthetic", "--threads", "1", "--batch-size", "16"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The error line: exactly one, the last on stderr (progress lines may come before it)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert [x for x in lines if x.startswith("cnnpress: error")] == lines[-1:], err
    assert lines[-1].startswith("cnnpress: error: ")
    return lines[-1]


def unfinished(lenet_run: Path, dst: Path) -> Path:
    """A copy of the one-epoch run whose config asks for two epochs (one left to train)."""
    run_dir = copy_run(lenet_run, dst)
    cfg = run_dir / "config.yaml"
    cfg.write_text(cfg.read_text().replace("epochs: 1", "epochs: 2"))
    return run_dir


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def no_temp_files(run_dir: Path) -> bool:
    return not list(run_dir.glob(".*.tmp"))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> list[str]:
    """``--recipe`` of a 64-sample synthetic data set (fast runs)."""
    recipe = tmp_path_factory.mktemp("recipe") / "small.yaml"
    recipe.write_text("data_options: {num_samples: 64}\n")
    return ["--recipe", str(recipe)]


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory, small) -> Path:
    """A finished one-epoch lenet5 run (copy it before changing it)."""
    out = tmp_path_factory.mktemp("lenet") / "run"
    assert main(["train", *LENET, *small, "--epochs", "1", "--out", str(out)]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- 1. crash and resume ---------------------------------------------------------------


def test_sigkill_mid_run_then_resume_gives_bit_identical_weights(tmp_path, capsys):
    recipe = tmp_path / "slbf.yaml"
    recipe.write_text(SLBF_RECIPE)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert (
        run(capsys, "compress", "--recipe", str(recipe), "--out", str(ref), "--threads", "1")[0]
        == 0
    )

    cmd = [sys.executable, "-m", "cnnpress", "compress", "--threads", "1", "--out", str(cut)]
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, "--recipe", str(recipe)], stdout=f, stderr=f)
        deadline = time.monotonic() + 900  # generous: this machine may be very busy
        while len(metric_lines(cut)) < 2:  # two epochs done: kill inside a later one
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run did not reach epoch 3"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "model.cnnp").exists(), "killed too late"  # mid-training, not after it
    assert load_file(str(cut / "checkpoint.safetensors"))  # whatever moment: a valid file

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert_bit_identical(ref / "checkpoint.safetensors", cut / "checkpoint.safetensors")
    a, b = cnnpress.load(ref / "model.cnnp"), cnnpress.load(cut / "model.cnnp")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    # training numbers are exact; evaluation may take another inference path (the runtime
    # kernel is chosen per process), so test metrics agree to float rounding
    train_keys = ("epoch", "lr", "train_loss", "train_accuracy")
    for r, c in zip(metric_lines(ref), metric_lines(cut), strict=True):
        assert [r[k] for k in train_keys] == [c[k] for k in train_keys]
        assert c["test_loss"] == pytest.approx(r["test_loss"], rel=1e-5)
    assert no_temp_files(cut)


def small_loaders():
    train = load_dataset("synthetic", "train", num_samples=64)
    test = load_dataset("synthetic", "test", num_samples=32)
    return Loader(train, 16, train=True), Loader(test, 32, train=False)


def lenet():
    torch.manual_seed(0)
    return cnnpress.models.create("lenet5", 1, 4)


class Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing may catch it)."""


def test_crash_between_temp_write_and_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    train, test = small_loaders()
    cfg2 = TrainConfig(epochs=2, lr=0.05)

    def stop_in_epoch_2(model, epoch, epochs):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        fit(lenet(), train, test, cfg2, tmp_path / "run", on_epoch_end=stop_in_epoch_2)
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    original = atomic._write_all

    def write_then_die(f, data, path):
        original(f, data, path)  # the temporary file is complete ...
        if path.name == "checkpoint.safetensors":
            raise Crash  # ... and the process dies before the rename

    monkeypatch.setattr(atomic, "_write_all", write_then_die)
    with pytest.raises(Crash):
        fit(lenet(), train, test, cfg2, tmp_path / "run", resume=True)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before and no_temp_files(tmp_path / "run")
    net = lenet()
    assert load_checkpoint(ckpt, net, make_optimizer(net, cfg2))["epoch"] == 0
    # metrics.jsonl was written before the checkpoint; resume drops the orphan line
    assert [m["epoch"] for m in metric_lines(tmp_path / "run")] == [0, 1]
    (tmp_path / "run" / ".checkpoint.safetensors.x1y2.tmp").write_bytes(b"half a file")
    fit(lenet(), train, test, cfg2, tmp_path / "run", resume=True)
    fit(lenet(), train, test, cfg2, tmp_path / "ref")
    assert_bit_identical(ckpt, tmp_path / "ref" / "checkpoint.safetensors")
    assert [m["epoch"] for m in metric_lines(tmp_path / "run")] == [0, 1]
    assert no_temp_files(tmp_path / "run")  # the killed write's leftover is cleared


def test_resume_before_the_first_checkpoint_starts_the_run_over(tmp_path, capsys, small):
    out = tmp_path / "run"
    argv = [*LENET, *small, "--epochs", "1", "--lr", "1e30", "--out", str(out)]
    code, _, err = run(capsys, "train", *argv)
    assert code == 2 and "nothing was saved" in one_error_line(err)
    code, _, err = run(capsys, "train", "--resume", "--out", str(out), "--lr", "0.05")
    assert code == 0 and "no checkpoint yet" in err
    assert [m["epoch"] for m in metric_lines(out)] == [0]


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("kmeans", "{bits: 3, sparsity: 0.9}"),  # the masks come from the init weights
        ("magnitude_prune", "{sparsity: 0.6, prune_epochs: 2}"),  # masks change in training
        ("filter_prune", "{ratio: 0.3, scope: global}"),  # the kept counts, too
    ],
)
def test_resume_of_a_run_whose_conversion_reads_the_init_weights(
    lenet_run, tmp_path, capsys, method, settings
):
    recipe = tmp_path / "method.yaml"
    recipe.write_text(
        f"data_options: {{num_samples: 64}}\nmethod: {method}\nmethod_config: {settings}\n"
    )
    out = tmp_path / "run"
    argv = ["--recipe", str(recipe), "--init", str(lenet_run), *LENET]
    code, _, err = run(capsys, "compress", *argv, "--epochs", "1", "--out", str(out))
    assert code == 0, err
    first = tensors(out / "checkpoint.safetensors")
    code, _, err = run(capsys, "compress", "--resume", "--out", str(out), "--epochs", "2")
    assert code == 0, err
    assert "resuming" in err and [m["epoch"] for m in metric_lines(out)] == [-1, 0, 1]
    masks = [k for k in first if k.endswith(".mask")]
    resumed = tensors(out / "checkpoint.safetensors")
    # as many kept weights: magnitude_prune's ramp ended with the first run's single epoch
    assert all(resumed[k].sum() == first[k].sum() for k in masks)
    if method == "kmeans":  # its masks are fixed once made from the init weights
        assert masks and all(torch.equal(resumed[k], first[k]) for k in masks)
    assert cnnpress.load(out / "model.cnnp").cnnpress_method["name"] == method


# --- 3. bad input: one line, exit code 2, nothing lost ------------------------------------


def write_fashion_files(folder: Path, truncate: bool) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 8), ("t10k", 4)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28), "u1"))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, "u1"))
    if truncate:
        path = folder / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", *LENET, "--data", "fashion-mnist", "--data-dir", "{tmp}/none"], ["not found"]),
        (["train", *LENET, "--data", "fashion-mnist", "--data-dir", "{tmp}"], ["file not found"]),
        (["train", *LENET, "--data", "fashion-mnist", "--data-dir", "{tmp}/bad"], ["truncated"]),
        (["train", *LENET[2:], "--model", "resnet21", "--data", "synthetic"], ["unknown model"]),
        (["compress", *LENET, "--method", "zip"], ["unknown method 'zip'", "choose one of"]),
        (["compress", *LENET, "--method", "slbf", "--slice-channels", "5"], ["does not divide"]),
        (["compress", *LENET, "--method", "slbf", "--num-filters", "70000"], ["65536"]),
        (["train", *LENET, "--epochs", "-1"], ["epochs must be a positive integer"]),
        (["train", *LENET, "--epochs", "two"], ["invalid int value", "--help"]),
        (["train", "--recipe", "{tmp}"], ["is a folder"]),
        (["train", "--recipe", "{tmp}/binary.yaml"], ["not a text"]),
        (["train", "--recipe", "{tmp}/broken.yaml"], ["not valid YAML"]),
        (["train", "--resume", "--out", "{tmp}"], ["holds no cnnpress run"]),
        (["train", "--resume", "--out", "{tmp}/none"], ["does not exist"]),
        (["train", *LENET, "--out", "{tmp}/binary.yaml"], ["is a file"]),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, needles):
    (tmp_path / "bad").mkdir()
    write_fashion_files(tmp_path / "bad", truncate=True)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "broken.yaml").write_text("model: [lenet5\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv and argv[0] in ("train", "compress"):
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run(capsys, *argv)
    line = one_error_line(err)
    assert code == 2
    for needle in needles:
        assert needle in line


def test_unreadable_recipe(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet5\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(commands, "open", denied, raising=False)
    code, _, err = run(capsys, "train", "--recipe", str(recipe))
    assert code == 2 and "cannot read recipe" in one_error_line(err) and "denied" in err


def test_predict_wrong_size_and_channels(lenet_run, tmp_path, capsys):
    for shape, needle in (((2, 1, 20, 20), "1x16x16"), ((2, 3, 16, 16), "1-channel")):
        np.save(tmp_path / "x.npy", np.zeros(shape, np.uint8))
        code, _, err = run(capsys, "predict", str(lenet_run), str(tmp_path / "x.npy"))
        assert code == 2 and needle in one_error_line(err)


def test_init_from_another_model_or_class_count(lenet_run, tmp_path, capsys):
    base = ["--method", "slbf", "--data", "synthetic", "--init", str(lenet_run), "--threads", "1"]
    code, _, err = run(
        capsys, "compress", *base, "--model", "resnet20", "--out", str(tmp_path / "a")
    )
    assert code == 2 and "holds a lenet5" in one_error_line(err)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data_options: {num_classes: 10}\n")
    argv = ["--model", "lenet5", "--recipe", str(recipe), "--out", str(tmp_path / "b")]
    code, _, err = run(capsys, "compress", *base, *argv)
    assert code == 2 and "num_classes=4" in one_error_line(err) and "num_classes=10" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_resume_of_a_folder_whose_checkpoint_does_not_fit(lenet_run, tmp_path, capsys):
    run_dir = copy_run(lenet_run, tmp_path / "run")
    (run_dir / "config.yaml").write_text(
        (run_dir / "config.yaml").read_text().replace("lenet5", "resnet20")
    )
    files = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--epochs", "2")
    line = one_error_line(err)
    assert code == 2 and "holds a lenet5" in line and "builds a resnet20" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files  # config.yaml too
    before = files["checkpoint.safetensors"]
    (run_dir / "config.yaml").write_text((lenet_run / "config.yaml").read_text())
    (run_dir / "checkpoint.safetensors").write_bytes(before[: len(before) // 2])
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--epochs", "2")
    assert code == 2 and "checkpoint.safetensors" in one_error_line(err)


def test_resume_refuses_flags_that_cannot_change(lenet_run, tmp_path, capsys):
    run_dir = copy_run(lenet_run, tmp_path / "run")
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir), "--batch-size", "8")
    assert code == 2 and "--batch-size 8" in one_error_line(err)


@pytest.mark.parametrize(
    ("err_no", "needle"),
    [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission"), (errno.EROFS, "read-only")],
)
def test_disk_errors_while_saving_lose_nothing(
    lenet_run, tmp_path, capsys, monkeypatch, err_no, needle
):
    run_dir = unfinished(lenet_run, tmp_path / "run")
    files = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def fail(f, data, path):
        f.write(data[: len(data) // 2])  # part of the temporary file, then the error
        raise OSError(err_no, os.strerror(err_no))

    monkeypatch.setattr(atomic, "_write_all", fail)
    code, _, err = run(capsys, "train", "--resume", "--out", str(run_dir))
    line = one_error_line(err)
    assert code == 2 and needle in line and f"--resume --out {run_dir}" in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files  # all intact, no temp
    monkeypatch.undo()
    code, _, _ = run(capsys, "train", "--resume", "--out", str(run_dir))
    assert code == 0 and [m["epoch"] for m in metric_lines(run_dir)] == [0, 1]


def test_programming_errors_keep_their_traceback(monkeypatch, lenet_run):
    def broken(*args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(files, "cmd_summary", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["summary", str(lenet_run)])


# --- 4. NaN guard ---------------------------------------------------------------------


def test_nan_loss_keeps_the_last_good_checkpoint_and_resumes_with_a_lower_lr(
    lenet_run, tmp_path, capsys
):
    run_dir = copy_run(lenet_run, tmp_path / "run")
    ckpt = run_dir / "checkpoint.safetensors"
    before = ckpt.read_bytes()
    argv = ["train", "--resume", "--out", str(run_dir), "--threads", "1"]
    code, _, err = run(capsys, *argv, "--epochs", "2", "--lr", "1e30")
    line = one_error_line(err)
    assert code == 2 and "the loss became nan" in line and "keeps epoch 1" in line
    assert ckpt.read_bytes() == before and len(metric_lines(run_dir)) == 1
    code, _, err = run(capsys, *argv, "--lr", "0.01", "--json")
    assert code == 0 and "lr=0.01" in err
    rows = metric_lines(run_dir)
    assert [m["epoch"] for m in rows] == [0, 1] and np.isfinite(rows[-1]["train_loss"])
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()
