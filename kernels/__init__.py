"""Triton kernels of multilevel_hd, installed as `multilevel_hd.kernels` and driven by
`multilevel_hd.backends.triton_backend`: `reduce` (stage 1 of a step: the per-unit sums),
`step` (stage 3: the fused elementwise pass) and `common` (their shared table layout and
math)."""
