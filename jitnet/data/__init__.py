"""jitnet.data: dataset readers, an embedded Fashion-MNIST subset, mini-batch
loading and Numba image augmentation.  Batches are NumPy arrays."""

from .augment import (
    center_crop,
    per_image_standardization,
    random_brightness,
    random_contrast,
    random_crop,
    random_flip_left_right,
)
from .datasets import (
    CHECKSUMS,
    CIFAR10_CLASSES,
    BabiQuery,
    generate_babi_single_fact,
    load_babi,
    load_cifar10,
    load_default_images,
    load_embedded_fashion_mnist,
    load_fashion_mnist,
    load_mnist,
    load_text8,
    load_text_corpus,
    parse_babi,
    read_cifar10_batch,
    read_idx,
    text8_preprocess,
)
from .download import dataset_cache_dir, download_url, find_dataset_files, sha256_file
from .loader import ArrayDataset, DataLoader
from .seq_tasks import BucketBatcher, CharVocab, date_task, pad_batch, reverse_task

__all__ = [
    "ArrayDataset",
    "BabiQuery",
    "BucketBatcher",
    "CharVocab",
    "CHECKSUMS",
    "CIFAR10_CLASSES",
    "DataLoader",
    "center_crop",
    "dataset_cache_dir",
    "date_task",
    "download_url",
    "find_dataset_files",
    "generate_babi_single_fact",
    "load_babi",
    "load_cifar10",
    "load_default_images",
    "load_embedded_fashion_mnist",
    "load_fashion_mnist",
    "load_mnist",
    "load_text8",
    "load_text_corpus",
    "pad_batch",
    "parse_babi",
    "per_image_standardization",
    "random_brightness",
    "random_contrast",
    "random_crop",
    "random_flip_left_right",
    "read_cifar10_batch",
    "read_idx",
    "reverse_task",
    "sha256_file",
    "text8_preprocess",
]
