"""Datasets as tensors: official-format readers, the named-dataset registry, downloads, seeded
stratified splits, the on-device batch loader, and domain sets / shifts (``load_domains``)."""

from mentor.data.domains import DomainSet, list_domain_sets, load_domains
from mentor.data.errors import DataError
from mentor.data.fetch import download_file, fetch, sha256_file
from mentor.data.folders import ImageFolder, find_classes, image_folder_domains, list_domains
from mentor.data.loader import DeviceLoader
from mentor.data.readers import ArrayDataset, read_cifar, read_digits, read_idx, read_idx_pair
from mentor.data.sources import (
    DATASETS,
    Download,
    Source,
    dataset_info,
    get_source,
    list_datasets,
    load_dataset,
)
from mentor.data.splits import stratified_split, stratified_subset

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataError",
    "DeviceLoader",
    "DomainSet",
    "Download",
    "ImageFolder",
    "Source",
    "dataset_info",
    "download_file",
    "fetch",
    "find_classes",
    "get_source",
    "image_folder_domains",
    "list_datasets",
    "list_domain_sets",
    "list_domains",
    "load_dataset",
    "load_domains",
    "read_cifar",
    "read_digits",
    "read_idx",
    "read_idx_pair",
    "sha256_file",
    "stratified_split",
    "stratified_subset",
]
