"""Two processes (torchrun, gloo on 127.0.0.1) train what one process trains with the same
global batch, and a killed distributed run resumes to the same bits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnpress.cli.main import main
from cnnpress.errors import ConfigError
from cnnpress.run import loaders
from cnnpress.train.config import TrainConfig
from cnnpress.train.distributed import DistContext, init_distributed

# ResNet-20 has BatchNorm after every conv, so this also checks that BatchNorm sees the
# global batch; bn_recalibrate checks the collective re-estimation before evaluation.
RECIPE = """\
model: resnet20
model_args: {width: 4}
data: synthetic
data_options: {num_samples: 128}
train: {epochs: 3, batch_size: 32, lr: 0.05, bn_recalibrate: 2}
"""
#: Two processes vs one after 12 SGD steps: the same maths, summed in another order (the
#: gradient is the mean of two half-batch means, BatchNorm's sums are all-reduced), so the
#: weights agree to float32 rounding grown over the steps (~1e-6 seen), not bit for bit.
ATOL = 1e-4
#: The optimiser's momentum buffers are sums of gradients, which amplify that rounding: their
#: norms agree to 0.08-0.16% on this machine (up to 5e-4 in absolute value on values up to
#: 0.45), far from what a real difference makes (half the batch, a gradient not averaged:
#: tens of percent).
MOMENTUM_RTOL = 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return subprocess.Popen([*cmd, "-m", "cnnpress", *argv], env=env, text=True, **popen)


def metric_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipe") / "ddp.yaml"
    path.write_text(RECIPE)
    return str(path)


@pytest.fixture(scope="module")
def single(recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", "--recipe", recipe, "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def ddp(recipe, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    argv = ["train", "--recipe", recipe, "--out", str(out), "--threads", "1", "--json"]
    proc = torchrun(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    return out, stdout


def test_two_processes_match_one_process_with_the_same_global_batch(single, ddp):
    out, stdout = ddp
    result = json.loads(stdout)  # one JSON document: only rank 0 printed
    assert result["world_size"] == 2 and result["train"]["batch_size"] == 32
    a = load_file(str(single / "checkpoint.safetensors"))
    b = load_file(str(out / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("momentum_buffer"):
            assert (b[key] - a[key]).norm() <= MOMENTUM_RTOL * a[key].norm(), key
        elif a[key].is_floating_point() and key != "rng.torch":
            torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    one, two = metric_lines(single), metric_lines(out)
    assert [m["epoch"] for m in two] == [0, 1, 2]  # rank 0 alone wrote the file
    for m1, m2 in zip(one, two, strict=True):
        assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)
        assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-4)


@pytest.mark.slow
def test_xnor_thresholds_start_at_the_global_batch_mean_in_two_processes(recipe, single, tmp_path):
    # XNOR's beta starts at the mean input of the first training batch; with two processes
    # each sees half of it and the means are all-reduced, so both runs start and end alike
    argv = ["compress", "--recipe", recipe, "--method", "xnor", "--init", str(single),
            "--epochs", "1", "--threads", "1", "--json"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    proc = torchrun(*argv, "--out", str(tmp_path / "two"), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)  # fmt: skip
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    a = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint.safetensors"))
    shifts = [key for key in a if key.endswith(".shift")]
    assert len(shifts) == 18  # every conv but the first
    for key in shifts:
        assert bool(a[key.replace(".shift", ".shift_ready")])
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=0, msg=key)


def test_killed_distributed_run_resumes_to_the_same_bits(recipe, ddp, tmp_path):
    cut = tmp_path / "cut"
    argv = ["train", "--out", str(cut), "--threads", "1"]
    with (tmp_path / "log.txt").open("w") as log:
        proc = torchrun(*argv, "--recipe", recipe, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 900
        while not metric_lines(cut):  # the first epoch is saved: kill inside the second
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.wait()
    assert not (cut / "model.cnnp").exists()
    proc = torchrun(*argv, "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    a = load_file(str(ddp[0] / "checkpoint.safetensors"))
    b = load_file(str(cut / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_global_batch_must_split_evenly_over_the_processes():
    cfg = {"data": "synthetic", "data_options": {"num_samples": 8}}
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        loaders(cfg, TrainConfig(batch_size=32), DistContext(rank=0, world_size=3))
    train, _, _ = loaders(cfg, TrainConfig(batch_size=4), DistContext(rank=1, world_size=2))
    assert train.batch_size == 2 and train.rank == 1 and len(train) == 2


def test_environment_checks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="RANK is not set"):
        init_distributed()
