"""Triton kernels of multilevel_hd, installed as `multilevel_hd.kernels` and driven by
`multilevel_hd.backends.triton_backend`: `reduce` (stage 1 of a step: the per-unit sums),
`level_stage` (stage 2, two small launches: what `multilevel_hd.levels.update_levels`
computes, from the unit sums to the new rates, weights and per-unit applied rates),
`step` (stage 3: the fused elementwise pass) and `common` (their shared table layout and
math)."""
