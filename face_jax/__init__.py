"""face_jax: FACE descriptors for collaborative filtering, in JAX."""

__version__ = "0.1.0"
