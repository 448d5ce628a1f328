// The loop of adam_reduce_simd over a 16-lane float vector `Vec`: included once per ISA by
// adam_reduce_simd.cpp, inside that ISA's `#pragma GCC target` region and namespace, so each
// copy compiles to that ISA's instructions. No includes here: anything included would be
// compiled for that ISA too and could replace the baseline copy of an inline function.

// u_prev without its 1 / (1 - beta1^s) factor (adam_unscaled in common.h), approximately:
// sqrt(v) = v * rsqrt(v) and 1 / d, each from the approximate instruction and one Newton
// step. Lanes the approximation cannot take (v zero, subnormal, infinite or NaN while m is
// not 0) send the whole vector through the exact square root and division instead: rare
// (a unit that never had a gradient has m = v = 0, which the approximation takes).
static inline Vec adam_direction(Vec m, Vec v, Vec c, Vec eps) {
  const Vec y = Vec::rsqrt_approx(v), s0 = v * y;
  const Vec s = Vec::fma(s0, Vec::fnma(s0 * Vec::all(0.5f), y, Vec::all(0.5f)), s0);  // s0 (1.5 - v y^2 / 2)
  const Vec d = Vec::fma(s, c, eps);
  const Vec q0 = Vec::rcp_approx(d);
  const Vec q = Vec::fma(q0, Vec::fnma(d, q0, Vec::all(1.0f)), q0);
  Vec x = m * q;
  // d below 2^100 keeps AVX2's rcpps out of its flush-to-zero range (d >= 2^125)
  const typename Vec::Mask safe = Vec::ge(v, Vec::all(FLT_MIN)) & Vec::le(v, Vec::all(FLT_MAX)) &
                                  Vec::le(d, Vec::all(0x1p100f));
  if (!Vec::all_set(safe | Vec::eq(m, Vec::all(0.0f))))
    x = m / Vec::fma(Vec::sqrt(v), c, eps);
  return Vec::select(Vec::eq(m, Vec::all(0.0f)), m, x);
}

template <bool PARAM, bool WD>
static int64_t reduce_segment(const AdamReduceInputs& in, int64_t n, const AdamReduceLanes& acc) {
  const Vec factor = Vec::all(in.grad_factor), wd = Vec::all(in.weight_decay), c = Vec::all(in.rsqrt_bc2),
            eps = Vec::all(in.eps);
  Vec hs = Vec::load(acc.hs), qg = Vec::load(acc.qg), qu = Vec::load(acc.qu), dot = Vec::load(acc.dot),
      sq = Vec::load(acc.sq), nonfinite = Vec::load(acc.nonfinite);
  int64_t e = 0;
  for (; e + 16 <= n; e += 16) {
    Vec g = Vec::load(in.g + e) * factor;
    if (WD) g = Vec::fma(wd, Vec::load(in.p + e), g);
    nonfinite = nonfinite + (g - g);
    const Vec x = adam_direction(Vec::load(in.m + e), Vec::load(in.v + e), c, eps);
    hs = Vec::fma(g, x, hs);
    qg = Vec::fma(g, g, qg);
    qu = Vec::fma(x, x, qu);
    if (PARAM) {
      const Vec ag = Vec::load(in.rate + e) * g;
      dot = Vec::fma(ag, x, dot);
      sq = Vec::fma(ag, ag, sq);
    }
  }
  hs.store(acc.hs), qg.store(acc.qg), qu.store(acc.qu), dot.store(acc.dot), sq.store(acc.sq);
  nonfinite.store(acc.nonfinite);
  return e;
}

static int64_t adam_reduce(const AdamReduceInputs& in, int64_t n, bool param_sums, bool coupled_decay,
                           const AdamReduceLanes& acc) {
  if (param_sums)
    return coupled_decay ? reduce_segment<true, true>(in, n, acc) : reduce_segment<true, false>(in, n, acc);
  return coupled_decay ? reduce_segment<false, true>(in, n, acc) : reduce_segment<false, false>(in, n, acc);
}
