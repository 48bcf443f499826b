"""Data: reading images, finding datasets, preprocessing and the prepared cache."""

from medpretrain.data.cache import PreparedData, prepare_dataset, prepare_pool
from medpretrain.data.datasets import CaseSource, DatasetSource, discover_dataset, discover_pool, make_split
from medpretrain.data.io import Image3D, read_header, read_image, write_nifti
from medpretrain.data.preprocess import (
    Geometry,
    PreparedCase,
    PreprocessConfig,
    preprocess_case,
    preprocess_image,
    restore_to_original,
)

__all__ = [
    "CaseSource",
    "DatasetSource",
    "Geometry",
    "Image3D",
    "PreparedCase",
    "PreparedData",
    "PreprocessConfig",
    "discover_dataset",
    "discover_pool",
    "make_split",
    "prepare_dataset",
    "prepare_pool",
    "preprocess_case",
    "preprocess_image",
    "read_header",
    "read_image",
    "restore_to_original",
    "write_nifti",
]
