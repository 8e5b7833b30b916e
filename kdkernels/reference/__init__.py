"""Plain-PyTorch references: the specification every kernel is tested against."""
from .divergence import divergence_rows

__all__ = ["divergence_rows"]
