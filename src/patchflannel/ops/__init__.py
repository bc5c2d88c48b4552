"""Tensor operations shared by training, the engine and bench: one implementation of each stage.

Functions take and return torch tensors and run unchanged on CPU or GPU, but the host's mask
post-processing (``mask.postprocess_mask``, ``mask.fill_holes``), which works on numpy arrays.
"""
