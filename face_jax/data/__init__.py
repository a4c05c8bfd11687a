"""Datasets: loaders that all reach `Dataset`."""

from face_jax.data.dataset import DataError, Dataset
from face_jax.data.registry import SOURCES, load_dataset

__all__ = ["SOURCES", "DataError", "Dataset", "load_dataset"]
