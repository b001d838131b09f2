"""Tests for cnnpress.data: file formats, registry, transforms and the batch loader."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnpress.data import (
    DataError,
    Dataset,
    DatasetSpec,
    Loader,
    dataset_names,
    default_data_dir,
    get_spec,
    load_dataset,
    normalize,
    random_crop,
    random_hflip,
)
from cnnpress.data.cifar import restricted_loads, write_cifar_bin, write_cifar_py
from cnnpress.data.idx import read_idx, write_idx

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _write_idx_split(folder: Path, prefix: str, n: int, gz: bool, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, gz=gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz=gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_idx_roundtrip(tmp_path: Path, gz: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = write_idx(tmp_path / "a.idx", array, gz=gz)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dataset(tmp_path: Path, name: str, gz: bool) -> None:
    train_images, train_labels = _write_idx_split(tmp_path, "train", 30, gz, seed=1)
    test_images, _ = _write_idx_split(tmp_path, "t10k", 12, gz, seed=2)
    ds = load_dataset(name, "train", data_dir=tmp_path)
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and len(ds) == 30 and ds.split == "train"
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), train_images)
    np.testing.assert_array_equal(ds.labels.numpy(), train_labels)
    test = load_dataset(name, "test", data_dir=str(tmp_path))
    np.testing.assert_array_equal(test.images[:, 0].numpy(), test_images)
    assert test.spec == get_spec(name)


def _corrupt(tmp_path: Path, case: str) -> str:
    """Write a broken train split; return the file name the error must mention."""
    _write_idx_split(tmp_path, "train", 8, gz=case == "corrupt_gzip")
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    if case == "wrong_magic":
        images.write_bytes(b"\x01\x02" + images.read_bytes()[2:])
        return images.name
    if case == "truncated":
        images.write_bytes(images.read_bytes()[:-5])
        return images.name
    if case == "label_count":
        write_idx(labels, np.zeros(7, dtype=np.uint8))
        return labels.name
    if case == "label_range":
        write_idx(labels, np.full(8, 10, dtype=np.uint8))
        return labels.name
    if case == "wrong_ndim":
        write_idx(images, np.zeros((8, 784), dtype=np.uint8))
        return images.name
    if case == "corrupt_gzip":
        gz_file = tmp_path / "train-images-idx3-ubyte.gz"
        raw = gz_file.read_bytes()
        gz_file.write_bytes(raw[:20] + bytes(b ^ 0x5A for b in raw[20:200]) + raw[200:])
        return gz_file.name
    labels.unlink()  # missing
    return "train-labels-idx1-ubyte(.gz)"


@pytest.mark.parametrize(
    "case",
    [
        "wrong_magic",
        "truncated",
        "label_count",
        "label_range",
        "wrong_ndim",
        "corrupt_gzip",
        "missing",
    ],  # fmt: skip
)
def test_malformed_idx_raises_data_error(tmp_path: Path, case: str) -> None:
    file_name = _corrupt(tmp_path, case)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    message = str(info.value)
    assert file_name in message and "\n" not in message
    assert "--data-dir" in message


def test_missing_folder_names_file_and_apt_hint(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\(\.gz\).*apt-get install"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path / "nope")


def _cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def test_cifar_bin_record_layout(tmp_path: Path) -> None:
    # Hand-built records: label byte, then R, G, B planes of 32x32, row-major.
    records = bytearray(3 * 3073)
    for i, (label, c, r, col) in enumerate([(3, 0, 0, 1), (7, 1, 5, 9), (9, 2, 31, 30)]):
        records[i * 3073] = label
        records[i * 3073 + 1 + c * 1024 + r * 32 + col] = 200 + i
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(bytes(records))
    ds = load_dataset("cifar10", "test", data_dir=tmp_path)  # the parent folder
    assert ds.labels.tolist() == [3, 7, 9]
    assert ds.images.shape == (3, 3, 32, 32)
    assert ds.images[0, 0, 0, 1] == 200 and ds.images[1, 1, 5, 9] == 201
    assert ds.images[2, 2, 31, 30] == 202
    assert int(ds.images.sum()) == 200 + 201 + 202


def test_cifar_bin_train_batches_in_order(tmp_path: Path) -> None:
    train, test = _cifar_arrays(13, 0), _cifar_arrays(4, 1)
    folder = write_cifar_bin(tmp_path / "bin", {"train": train, "test": test})
    assert sorted(p.name for p in folder.iterdir()) == [
        *(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
    ]
    ds = load_dataset("cifar10", "train", data_dir=folder)  # the folder itself
    np.testing.assert_array_equal(ds.images.numpy(), train[0])
    np.testing.assert_array_equal(ds.labels.numpy(), train[1])
    (folder / "data_batch_3.bin").write_bytes(b"\x00" * 3072)
    with pytest.raises(DataError, match="data_batch_3.bin"):
        load_dataset("cifar10", "train", data_dir=folder)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar_python_version(tmp_path: Path, protocol: int) -> None:
    train, test = _cifar_arrays(11, 2), _cifar_arrays(5, 3)
    write_cifar_py(tmp_path / "cifar-10-batches-py", {"train": train, "test": test}, 5, protocol)
    if protocol == 3:  # the real files name numpy.core, as pickled by old numpy
        batch = tmp_path / "cifar-10-batches-py" / "test_batch"
        raw = batch.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n_reconstruct" in raw
        batch.write_bytes(raw)
    for split, (images, labels) in (("train", train), ("test", test)):
        ds = load_dataset("cifar10", split, data_dir=tmp_path)
        np.testing.assert_array_equal(ds.images.numpy(), images)
        np.testing.assert_array_equal(ds.labels.numpy(), labels)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}
    (folder / "test_batch").write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError, match=r"test_batch.*refuses to load global \w+\.system"):
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert not marker.exists()
    with pytest.raises(DataError, match="builtins.eval"):
        restricted_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    assert restricted_loads(pickle.dumps(np.arange(4, dtype=np.uint8))).tolist() == [0, 1, 2, 3]


def test_synthetic_dataset() -> None:
    a = load_dataset("synthetic", "train", seed=3)
    b = load_dataset("synthetic", "train", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (512, 1, 16, 16) and len(load_dataset("synthetic", "test")) == 256
    test = load_dataset("synthetic", "test", seed=3)
    assert not torch.equal(a.images[:256], test.images)
    assert not torch.equal(a.images, load_dataset("synthetic", "train", seed=4).images)
    c = load_dataset(
        "synthetic", "train", num_samples=10, in_channels=3, image_size=8, num_classes=5
    )
    assert c.images.shape == (10, 3, 8, 8) and c.spec.num_classes == 5
    assert c.spec.class_names == tuple(f"class{i}" for i in range(5))
    with pytest.raises(DataError, match="unknown option"):
        load_dataset("synthetic", "train", colour=1)


def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(3):
        loader = Loader(train, 64, train=True)
        loader.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        x, y = next(iter(Loader(test, 256, train=False)))
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9


def test_transforms() -> None:
    x = torch.randint(1, 256, (6, 2, 5, 7), dtype=torch.uint8)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)
    one = random_crop(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(one, random_crop(x, 2, torch.Generator().manual_seed(5)))
    assert one.shape == x.shape and one.dtype == torch.uint8
    assert torch.equal(random_hflip(x, torch.Generator(), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, torch.Generator(), p=0.0), x)
    flipped = random_hflip(x, torch.Generator().manual_seed(1))
    assert all(
        torch.equal(f, s) or torch.equal(f, s.flip(-1)) for f, s in zip(flipped, x, strict=True)
    )
    out = normalize(
        torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8), (0.5, 0.2), (0.5, 0.1)
    )
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))
    assert out.dtype == torch.float32


@settings(max_examples=30, deadline=None)
@given(padding=st.integers(1, 4), seed=st.integers(0, 2**31), h=st.integers(1, 6))
def test_random_crop_is_window_of_padded_input(padding: int, seed: int, h: int) -> None:
    x = torch.randint(1, 256, (4, 3, h, 5), dtype=torch.uint8)
    out = random_crop(x, padding, torch.Generator().manual_seed(seed))
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    for i in range(len(x)):
        windows = [
            padded[i, :, r : r + h, c : c + 5]
            for r in range(2 * padding + 1)
            for c in range(2 * padding + 1)
        ]
        assert any(torch.equal(out[i], w) for w in windows)


def _indexed_dataset(n: int) -> Dataset:
    spec = dataclasses.replace(
        get_spec("synthetic"), num_classes=n, class_names=tuple(map(str, range(n)))
    )
    images = torch.zeros((n, 1, 16, 16), dtype=torch.uint8)
    return Dataset(images=images, labels=torch.arange(n), spec=spec, split="train")


def _epoch_labels(loader: Loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return [v for _, y in loader for v in y.tolist()]


def test_loader_order_and_coverage() -> None:
    ds = _indexed_dataset(23)
    loader = Loader(ds, 5, train=True, seed=7, drop_last=False)
    assert len(loader) == 5 and len(Loader(ds, 5, train=True)) == 4
    e0 = _epoch_labels(loader, 0)
    assert sorted(e0) == list(range(23))
    assert e0 == _epoch_labels(Loader(ds, 5, train=True, seed=7, drop_last=False), 0)
    assert e0 != _epoch_labels(loader, 1) and e0 != list(range(23))
    evaluation = Loader(ds, 5, train=False)
    assert _epoch_labels(evaluation, 0) == list(range(23)) == _epoch_labels(evaluation, 3)
    x, _ = next(iter(evaluation))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 16, 16)


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_ranks_are_disjoint(drop_last: bool) -> None:
    ds = _indexed_dataset(21)
    ranks = [
        _epoch_labels(Loader(ds, 4, True, seed=1, drop_last=drop_last, rank=r, world_size=2), 2)
        for r in range(2)
    ]
    assert not set(ranks[0]) & set(ranks[1])
    if drop_last:
        assert len(ranks[0]) == len(ranks[1]) == 8
    else:
        assert sorted(ranks[0] + ranks[1]) == list(range(21))


def test_loader_augmentation_is_seeded() -> None:
    ds = dataclasses.replace(
        load_dataset("synthetic", "train", num_samples=16),
        spec=dataclasses.replace(get_spec("synthetic"), crop_padding=2, hflip=True),
    )
    batches = [[x for x, _ in Loader(ds, 8, True, seed=s)] for s in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[1], strict=True))
    assert not torch.equal(batches[0][0], batches[2][0])
    plain = [x for x, _ in Loader(ds, 8, True, seed=0, augment=False)]
    assert not any(torch.equal(a, b) for a, b in zip(batches[0], plain, strict=True))


def test_registry_and_specs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert dataset_names() == ["cifar10", "fashion-mnist", "mnist", "synthetic"]
    fm, mn, cf = get_spec("fashion-mnist"), get_spec("mnist"), get_spec("cifar10")
    assert fm.class_names[0] == "T-shirt/top" and fm.hflip and not mn.hflip
    assert (cf.in_channels, cf.image_size, cf.crop_padding) == (3, (32, 32), 4)
    for spec in (fm, mn, cf, get_spec("synthetic")):
        assert DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(DataError, match="missing keys"):
        DatasetSpec.from_dict({"name": "x"})
    with pytest.raises(DataError, match="cifar10, fashion-mnist"):
        get_spec("imagenet")
    with pytest.raises(DataError, match="split"):
        load_dataset("synthetic", "val")
    monkeypatch.delenv("CNNPRESS_DATA_DIR", raising=False)
    assert default_data_dir("fashion-mnist") == FMNIST_DIR and default_data_dir("cifar10") is None
    monkeypatch.setenv("CNNPRESS_DATA_DIR", str(tmp_path))
    assert default_data_dir("mnist") == tmp_path == default_data_dir("cifar10")
    _write_idx_split(tmp_path, "t10k", 3, gz=True)
    assert len(load_dataset("mnist", "test")) == 3


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_real_fashion_mnist_test_split() -> None:
    ds = load_dataset("fashion-mnist", "test", data_dir=FMNIST_DIR)
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10
    with gzip.open(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x01"


def test_limit_option_keeps_the_first_samples():
    full = load_dataset("synthetic", "train", num_samples=40)
    part = load_dataset("synthetic", "train", num_samples=40, limit=7)
    assert len(part) == 7 and torch.equal(part.images, full.images[:7])
    with pytest.raises(DataError, match="limit"):
        load_dataset("synthetic", "train", limit=0)
