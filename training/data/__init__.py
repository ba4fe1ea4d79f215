"""Datasets for training: NIH-layout records, patient-wise splits, HDF5 cache, augmentation."""
from .records import Record, load_records, patient_folds, official_split, split_records
from .transforms import AugmentConfig, augment, resize_image_and_boxes
from .dataset import ChestDataset, collate, dataset_preprocess
from .cache import CachedDataset, build_cache

__all__ = [
    "Record", "load_records", "patient_folds", "official_split", "split_records",
    "AugmentConfig", "augment", "resize_image_and_boxes",
    "ChestDataset", "collate", "dataset_preprocess", "CachedDataset", "build_cache",
]
