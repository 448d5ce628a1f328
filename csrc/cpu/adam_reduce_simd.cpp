// adam_reduce_simd (adam_reduce_simd.h): the ISA-specific vectors, one copy of the loop per
// ISA, and the run-time choice among them.
#include "adam_reduce_simd.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cfloat>

// GCC-compatible x86-64 compilers only: the per-ISA regions below need `#pragma GCC target`
// (clang ignores it); elsewhere every segment takes the exact loop.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MLHD_ADAM_REDUCE_SIMD 1
#include <immintrin.h>
#endif

namespace mlhd {
namespace {

enum class Isa { Exact, Avx2, Avx512 };

#ifdef MLHD_ADAM_REDUCE_SIMD
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct Vec {
  using Mask = __mmask16;
  __m512 x;
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec all(float a) { return {_mm512_set1_ps(a)}; }
  void store(float* p) const { _mm512_storeu_ps(p, x); }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }    // a b + c
  static Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.x, b.x, c.x)}; }  // c - a b
  static Vec sqrt(Vec a) { return {_mm512_sqrt_ps(a.x)}; }
  static Vec rsqrt_approx(Vec a) { return {_mm512_rsqrt14_ps(a.x)}; }  // relative error < 2^-14
  static Vec rcp_approx(Vec a) { return {_mm512_rcp14_ps(a.x)}; }
  static Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.x, b.x, _CMP_EQ_OQ); }
  static Mask ge(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.x, b.x, _CMP_GE_OQ); }
  static Mask le(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.x, b.x, _CMP_LE_OQ); }
  static bool all_set(Mask m) { return m == 0xFFFF; }
  static Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m, b.x, a.x)}; }  // m ? a : b
};
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.x, b.x)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.x, b.x)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.x, b.x)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.x, b.x)}; }
#include "adam_reduce_simd_body.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
// 16 lanes as two 8-lane halves, so the lanes (and the order of the sums) match AVX-512's.
struct Vec {
  struct Mask {
    __m256 lo, hi;
  };
  __m256 lo, hi;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Vec all(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
  void store(float* p) const { _mm256_storeu_ps(p, lo), _mm256_storeu_ps(p + 8, hi); }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static Vec fnma(Vec a, Vec b, Vec c) {
    return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
  }
  static Vec sqrt(Vec a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
  static Vec rsqrt_approx(Vec a) { return {_mm256_rsqrt_ps(a.lo), _mm256_rsqrt_ps(a.hi)}; }  // < 1.5 * 2^-12
  static Vec rcp_approx(Vec a) { return {_mm256_rcp_ps(a.lo), _mm256_rcp_ps(a.hi)}; }
  static Mask eq(Vec a, Vec b) { return {_mm256_cmp_ps(a.lo, b.lo, _CMP_EQ_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_EQ_OQ)}; }
  static Mask ge(Vec a, Vec b) { return {_mm256_cmp_ps(a.lo, b.lo, _CMP_GE_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GE_OQ)}; }
  static Mask le(Vec a, Vec b) { return {_mm256_cmp_ps(a.lo, b.lo, _CMP_LE_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LE_OQ)}; }
  static bool all_set(Mask m) { return (_mm256_movemask_ps(m.lo) & _mm256_movemask_ps(m.hi)) == 0xFF; }
  static Vec select(Mask m, Vec a, Vec b) {
    return {_mm256_blendv_ps(b.lo, a.lo, m.lo), _mm256_blendv_ps(b.hi, a.hi, m.hi)};
  }
};
inline Vec::Mask operator&(Vec::Mask a, Vec::Mask b) { return {_mm256_and_ps(a.lo, b.lo), _mm256_and_ps(a.hi, b.hi)}; }
inline Vec::Mask operator|(Vec::Mask a, Vec::Mask b) { return {_mm256_or_ps(a.lo, b.lo), _mm256_or_ps(a.hi, b.hi)}; }
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
#include "adam_reduce_simd_body.h"
}  // namespace avx2
#pragma GCC pop_options

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Exact;
}
#else
Isa best_isa() { return Isa::Exact; }
#endif

std::atomic<Isa>& selected() {
  static std::atomic<Isa> isa{best_isa()};
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    case Isa::Exact: break;
  }
  return "exact";
}

}  // namespace

int64_t adam_reduce_simd(const AdamReduceInputs& in, int64_t n, bool param_sums, bool coupled_decay,
                         const AdamReduceLanes& acc) {
  switch (selected().load(std::memory_order_relaxed)) {
#ifdef MLHD_ADAM_REDUCE_SIMD
    case Isa::Avx512: return avx512::adam_reduce(in, n, param_sums, coupled_decay, acc);
    case Isa::Avx2: return avx2::adam_reduce(in, n, param_sums, coupled_decay, acc);
#endif
    default: return 0;
  }
}

std::string adam_reduce_isa(const std::string& select) {
  if (!select.empty()) {
    const Isa best = best_isa();
    Isa want = best;
    if (select == "avx512") want = Isa::Avx512;
    else if (select == "avx2") want = Isa::Avx2;
    else if (select == "exact") want = Isa::Exact;
    else TORCH_CHECK(select == "auto", "adam_reduce_isa: expected auto, avx512, avx2 or exact, got '", select, "'");
    // every CPU that runs AVX-512F here also has AVX2 and FMA (x86-64-v4 implies v3)
    TORCH_CHECK(want <= best, "adam_reduce_isa: this CPU cannot run '", select, "' (its best is ",
                isa_name(best), ")");
    selected().store(want);
  }
  return isa_name(selected().load());
}

}  // namespace mlhd
