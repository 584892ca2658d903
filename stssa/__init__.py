"""STSSA model, data, training and evaluation layer, built on the public API of ``stssa_kernels``."""
