"""Datasets: loaders that all reach `Dataset`."""

from face_jax.data.dataset import DataError, Dataset

__all__ = ["DataError", "Dataset"]
