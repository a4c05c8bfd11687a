"""Installs face_jax: FACE (LLM-token descriptors for CF embeddings) in JAX."""

import pathlib

import setuptools

_README = pathlib.Path(__file__).parent / "README.md"

setuptools.setup(
  name="face_jax",
  version="0.1.0",
  description=(
    "FACE: map collaborative-filtering embeddings onto LLM tokens, in JAX"
  ),
  long_description=_README.read_text(encoding="utf-8"),
  long_description_content_type="text/markdown",
  python_requires=">=3.10",
  # `configs` ships beside the package so that dataset configs can import
  # their shared base from any working directory.
  packages=[
    *setuptools.find_packages(include=["face_jax", "face_jax.*"]),
    "configs",
  ],
  package_data={"face_jax": ["resources/*"]},
  install_requires=[
    "absl-py>=2.1",
    "chex>=0.1.87",
    "flax>=0.10",
    "jax>=0.5",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "safetensors>=0.4",
    "scipy>=1.11",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "transformers>=4.45",
  ],
  extras_require={
    "test": [
      # The notebook test draws its charts headless (Agg).
      "matplotlib>=3.7",
      "pytest>=8",
      "ruff>=0.6",
    ],
  },
)
