"""Data sets, transforms and batch loading for cnnpress.

Fashion-MNIST and MNIST (IDX files), CIFAR-10 (binary or python version, the latter read
through a restricted unpickler) and a small synthetic set, all held as uint8 tensors and
served by :class:`Loader` as normalised float batches.
"""

from cnnpress.data.datasets import dataset_names, default_data_dir, get_spec, load_dataset
from cnnpress.data.errors import DataError
from cnnpress.data.loader import Loader
from cnnpress.data.spec import Dataset, DatasetSpec
from cnnpress.data.transforms import normalize, random_crop, random_hflip

__all__ = [
    "DataError",
    "Dataset",
    "DatasetSpec",
    "Loader",
    "dataset_names",
    "default_data_dir",
    "get_spec",
    "load_dataset",
    "normalize",
    "random_crop",
    "random_hflip",
]
