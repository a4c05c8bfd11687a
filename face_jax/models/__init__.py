"""Models: CF backbones and the FACE module."""
