"""Training loop: it learns, checkpoints are resumable to the same bits, files rebuild models."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

import cnnpress
from cnnpress.api import load_model
from cnnpress.data import Loader, load_dataset
from cnnpress.errors import ConfigError
from cnnpress.methods import get as get_method
from cnnpress.train import loop
from cnnpress.train.checkpoint import CheckpointError, read_meta
from cnnpress.train.config import TrainConfig
from cnnpress.train.loop import fit, lr_at, make_optimizer, recalibrate_batchnorm


def loaders(seed: int = 0):
    train = load_dataset("synthetic", "train", num_samples=256)
    test = load_dataset("synthetic", "test", num_samples=128)
    return Loader(train, 32, train=True, seed=seed), Loader(test, 64, train=False)


def slbf_net():
    torch.manual_seed(0)
    net = cnnpress.models.create("resnet20", 1, 4, width=8)
    return cnnpress.compress(net, "slbf", slice_channels=4, num_filters=4)


class InterruptError(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=3, lr=0.05, seed=0)
    train, test = loaders()
    full = slbf_net()
    fit(full, train, test, cfg, tmp_path / "full")

    def stop_after_second_epoch(model, epoch, epochs):
        if epoch == 1:
            raise InterruptError

    part = slbf_net()
    with pytest.raises(InterruptError):
        fit(part, train, test, cfg, tmp_path / "cut", on_epoch_end=stop_after_second_epoch)
    resumed = slbf_net()
    torch.manual_seed(123)  # a resumed process starts from other RNG state
    fit(resumed, train, test, cfg, tmp_path / "cut", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]


def pruned_lenet():
    torch.manual_seed(0)
    net = cnnpress.models.create("lenet5", 1, 4)
    return cnnpress.compress(net, "magnitude_prune", sparsity=0.6, prune_epochs=2)


def test_resume_in_the_middle_of_a_pruning_ramp_gives_identical_weights(tmp_path):
    """The checkpoint's masks (and their layout in the config) are not the fresh model's."""
    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=3, lr=0.05, seed=0)
    train, test = loaders()
    method = cnnpress.methods.get("magnitude_prune")()
    full = pruned_lenet()
    fit(full, train, test, cfg, tmp_path / "full", method=method)

    def stop(model, epoch, epochs):  # in the second epoch: the first one's checkpoint is saved
        if epoch == 1:
            raise InterruptError

    part = pruned_lenet()
    with pytest.raises(InterruptError):
        fit(part, train, test, cfg, tmp_path / "cut", method=method, on_epoch_end=stop)
    resumed = pruned_lenet()
    dense = resumed.cnnpress_method["config"]["sparse_layout"]
    saved = read_meta(tmp_path / "cut" / "checkpoint.safetensors")["method"]["config"]
    assert saved["sparse_layout"] != dense  # the ramp had begun
    fit(resumed, train, test, cfg, tmp_path / "cut", resume=True, method=method)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.cnnpress_method == full.cnnpress_method  # the layout of the trained masks


def test_training_learns_the_synthetic_task(tmp_path):
    train, test = loaders()
    torch.manual_seed(0)
    net = cnnpress.models.create("lenet5", 1, 4)
    result = fit(net, train, test, TrainConfig(epochs=4, lr=0.05), tmp_path)
    assert result["test_accuracy"] > 80.0
    assert len(result["history"]) == 4


def test_run_folder_model_and_checkpoint_rebuild_the_trained_model(tmp_path):
    train, test = loaders()
    net = slbf_net()
    fit(net, train, test, TrainConfig(epochs=1, lr=0.05), tmp_path)
    assert not (tmp_path / "model.cnnp").exists()  # the file is the run's (cnnpress.run) to save
    cnnpress.save(net, tmp_path / "model.cnnp")
    x = torch.randn(3, 1, 16, 16)
    from_file, meta = load_model(tmp_path)  # the run folder's model.cnnp
    from_ckpt, _ = load_model(tmp_path / "checkpoint.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(from_file(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_ckpt(x), net(x), rtol=0, atol=0)
    assert meta["method"]["name"] == "slbf"


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train, test = loaders()
    cfg = TrainConfig(epochs=1)
    fit(cnnpress.models.create("lenet5", 1, 4), train, test, cfg, tmp_path)
    other = cnnpress.models.create("lenet5", 1, 10)
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    from cnnpress.train.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(tmp_path / "checkpoint.safetensors", other, optimizer)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "bad.safetensors")


def test_cosine_schedule_and_warmup():
    cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=1)
    assert lr_at(cfg, 0, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 9, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 10, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 19, 10) < 0.01


def test_batchnorm_recalibration_matches_the_data_statistics():
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    data = [(torch.randn(16, 3, 4, 4) * 3 + 2, None) for _ in range(4)]
    recalibrate_batchnorm(bn, data, batches=4)
    allx = torch.cat([x for x, _ in data])
    torch.testing.assert_close(bn[0].running_mean, allx.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert bn[0].momentum == 0.1  # restored


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    train, test = loaders()
    net = cnnpress.models.create("lenet5", 1, 4)
    with pytest.raises(cnnpress.CnnpressError, match="loss became nan"):
        fit(
            net,
            train,
            test,
            TrainConfig(epochs=1),
            tmp_path,
            loss_fn=lambda out, y, x: out.sum() * float("nan"),
        )


def test_kd_loss_is_hintons_formula():
    from cnnpress.methods.distill import kd_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    T, a = 3.0, 0.7
    p_t = torch.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, 1))).sum(1).mean()
    want = (1 - a) * torch.nn.functional.cross_entropy(s, y) + a * T * T * kl
    torch.testing.assert_close(kd_loss(s, t, y, T, a), want)
    assert kd_loss(t, t, y, T, 1.0).abs() < 1e-6  # a student equal to its teacher


def test_slimming_l1_must_not_be_negative():
    with pytest.raises(ConfigError, match="slimming_l1"):
        TrainConfig(slimming_l1=-0.1)


def test_a_batch_of_one_reaching_a_1x1_map_is_one_error_in_training(tmp_path):
    from cnnpress.batchnorm import BatchStatisticsError

    data = load_dataset("synthetic", "train", num_samples=8, image_size=4)
    one = Loader(data, 1, train=True, seed=0)  # ResNet-20's last stage sees 1x1 maps
    net = cnnpress.models.create("resnet20", 1, 4, width=8)
    with pytest.raises(BatchStatisticsError) as err:
        fit(net, one, one, TrainConfig(epochs=1, batch_size=1, lr=0.05), tmp_path)
    assert "batch" in str(err.value) and "\n" not in str(err.value)


def test_a_log_gets_plain_progress_lines_and_a_terminal_none_of_them(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "PLAIN_PROGRESS_SECONDS", 0.0)  # a line for every step but the last
    train, test = loaders()  # 8 steps an epoch
    log = io.StringIO()
    net = cnnpress.models.create("lenet5", 1, 4)
    cfg = TrainConfig(epochs=1, lr=0.05)
    fit(net, train, test, cfg, tmp_path / "log", console=Console(file=log))
    lines = [x for x in log.getvalue().splitlines() if " step " in x]
    assert [x.split()[3] for x in lines] == [f"{i}/8" for i in range(1, 8)], lines
    assert all("loss " in x and "acc " in x and " s left" in x for x in lines)
    term = io.StringIO()
    net = cnnpress.models.create("lenet5", 1, 4)
    console = Console(file=term, force_terminal=True)
    fit(net, train, test, cfg, tmp_path / "term", console=console)
    assert " step " not in term.getvalue()


def test_a_methods_no_decay_parameters_get_no_weight_decay_and_its_report_is_its_own():
    torch.manual_seed(0)
    xnor = cnnpress.compress(cnnpress.models.create("lenet5", 1, 4), "xnor")
    cfg = TrainConfig(weight_decay=5e-4)
    groups = make_optimizer(xnor, cfg, get_method("xnor").no_decay).param_groups
    shifts = {id(p) for n, p in xnor.named_parameters() if n.endswith(".shift")}
    free = [g for g in groups if g["weight_decay"] == 0.0]
    assert shifts and len(free) == 1 and {id(p) for p in free[0]["params"]} == shifts
    assert len(make_optimizer(xnor, cfg).param_groups) == 1  # no names: everything decays
    slbf = slbf_net()
    usage = get_method("slbf")().report(slbf)["bank_usage"]
    assert len(usage) == 18 and all(1 <= u["bank_used"] <= u["num_filters"] for u in usage)
    assert get_method("bwn")().report(xnor) == {}
