// The float32 Adam reduction's inner loop with an approximate u_prev, for CPUs whose divider
// is the limit: the reduction must read g, m and v (12 B/element) and nothing more, but the
// exact u_prev = m / (sqrt(v) * c + eps) costs a square root and a division per element,
// which on a core whose two hyper-threads share one divider (Intel Xeon, 2 vCPUs) took 29 ms
// on ResNet-50 against 13 ms for reading the same bytes. Here u_prev comes from the
// hardware's approximate reciprocal square root and reciprocal, each refined by one Newton
// step: a few float32 ulps from the exact quotient (tests/test_cpp_backend.py bounds the
// sums' error against float64). It feeds only the hyper-gradient sums; the apply pass keeps
// the exact math, so a step with hypergrad_lr=0 still equals torch.optim.Adam.
//
// Picked at run time by CPU features (AVX-512F, else AVX2 with FMA, else the exact loop),
// never by build flags, so a cached build serves any x86-64 CPU.
#pragma once

#include <cstdint>
#include <string>

namespace mlhd {

// One segment's 16-lane accumulators (lane j takes elements begin + 16 i + j, as the
// exact loop's lanes do, so the fast and the exact loop add in the same order).
struct AdamReduceLanes {
  float *hs, *qg, *qu;          // the segment's sums: g*x, g^2, x^2
  float *dot, *sq, *nonfinite;  // the chunk's: param-level alpha*g*x, (alpha*g)^2, g - g
};

struct AdamReduceInputs {
  const float *g, *p, *m, *v, *rate;  // p: coupled decay only; rate: param sums only
  float grad_factor, weight_decay, rsqrt_bc2, eps;
};

// Adds elements [0, n - n % 16) of one segment; returns how many it added (0 when the
// exact loop is selected), leaving the rest to the caller's exact loop.
int64_t adam_reduce_simd(const AdamReduceInputs& in, int64_t n, bool param_sums, bool coupled_decay,
                         const AdamReduceLanes& acc);

// The loop adam_reduce_simd runs: "avx512", "avx2" or "exact". `select` (tests, benchmarks)
// switches to another the CPU supports, "" keeps the current one, "auto" restores the best.
std::string adam_reduce_isa(const std::string& select);

}  // namespace mlhd
