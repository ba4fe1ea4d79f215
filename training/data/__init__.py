"""Datasets for training: NIH-layout records, patient-wise splits, HDF5 cache, augmentation."""
from .records import Record, load_records, patient_folds, official_split, split_records
from .transforms import AugmentConfig, augment, normalise, resize_image_and_boxes
from .dataset import ChestDataset, collate
from .cache import CachedDataset, build_cache

__all__ = [
    "Record", "load_records", "patient_folds", "official_split", "split_records",
    "AugmentConfig", "augment", "normalise", "resize_image_and_boxes",
    "ChestDataset", "collate", "CachedDataset", "build_cache",
]
