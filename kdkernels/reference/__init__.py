"""Plain-PyTorch references: the specification every kernel is tested against."""
from .divergence import divergence_rows
from .mixing_matrix import mixing_matrix_loss_per_head

__all__ = ["divergence_rows", "mixing_matrix_loss_per_head"]
