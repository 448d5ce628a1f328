"""Triton kernels of multilevel_hd, installed as `multilevel_hd.kernels`."""
