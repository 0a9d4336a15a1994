"""Data: one HDF5 layout, converters into it, a sharding loader, batched augmentations.

python -m hpcbnn.data --help        # convert NumPy, CIFAR, MNIST, ImageFolder, CSV, digits
info = open_dataset(path, "train")  # validated description of a split
loader = Loader(path, "train", grid, batch_size=B, seed=seed)
for batch in loader.epoch(e): ...   # this rank's B/D rows of every global batch
"""

from hpcbnn.data.augment import augmentation
from hpcbnn.data.convert import cache_dir, default_dataset
from hpcbnn.data.format import SCHEMA_VERSION, DatasetInfo, open_dataset
from hpcbnn.data.loader import Batch, Loader, epoch_order

__all__ = [
    "SCHEMA_VERSION",
    "Batch",
    "DatasetInfo",
    "Loader",
    "augmentation",
    "cache_dir",
    "default_dataset",
    "epoch_order",
    "open_dataset",
]
