"""Sparsifiers: pure functions from a tensor to a boolean keep-mask (DESIGN principle 2).

They know nothing of checkpoints; the code that walks tensors calls them one tensor at a time.
"""

from compress.sparsify.masks import keep_count, magnitude_mask, random_mask, seeded_generator, sparsify

__all__ = ["keep_count", "magnitude_mask", "random_mask", "seeded_generator", "sparsify"]
