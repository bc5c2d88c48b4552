"""Tensor operations shared by training, the engine and bench: one implementation of each stage.

Every function takes and returns torch tensors and runs unchanged on CPU or GPU.
"""
