// CPU kernels of the fused step: at::parallel_for over the chunks of the launch table.
//
// Inner loops are plain loops over a segment (one unit, so one kappa and one partial sum)
// that the compiler vectorises; a sum is kept in kLanes independent lanes, so vectorising
// never reorders it, and lanes are added in a fixed order. Every hot function is compiled
// for AVX-512, AVX2 and baseline x86-64 (target_clones), picked when the library loads.
// The clones name ISA extensions, not "arch=": a clone with another -march/-mtune could not
// inline the shared element functions, and its loops would stay scalar.
// The float32 Adam reduction hands each segment to adam_reduce_simd.h first (its u_prev from
// refined approximate instructions, so that the pass stays memory-bound where the divider is
// slow) and finishes the tail here.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops.h"
#include "adam_reduce_simd.h"
#include "parallel.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define MLHD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MLHD_VECTOR_CLONES
#endif
// The tensors of one parameter never overlap, but their pointers come out of a table, so the
// compiler cannot know that; without this it gives up on the loop (too many alias checks).
#if defined(__clang__)
#define MLHD_INDEPENDENT _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define MLHD_INDEPENDENT _Pragma("GCC ivdep")
#else
#define MLHD_INDEPENDENT
#endif

namespace mlhd {
namespace {

constexpr int kLanes = 16;

// Pairwise, in a fixed order: a short dependency chain at the end of every segment.
template <typename T>
T lane_sum(const T (&x)[kLanes]) {
  T y[kLanes];
  std::copy(x, x + kLanes, y);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) y[j] += y[j + width];
  return y[0];
}


int64_t num_elements(const Tables& t) {
  int64_t n = 0;
  for (int64_t i = 0; i < t.num_tensors; ++i) n += t.tensors[i * kTensorFields + kUnits] * t.tensors[i * kTensorFields + kRowLen];
  return n;
}

// Stage 1 for chunks [c0, c1): three partials per segment, three per chunk.
template <typename S, Uprev U, bool PARAM, bool WD>
MLHD_VECTOR_CLONES void reduce_chunks(const ReduceArgs& a, const Coef<math_t<S>> k, int64_t c0, int64_t c1) {
  using T = math_t<S>;
  T* slots = static_cast<T*>(a.slot_partials);
  const int64_t num_slots = a.tables.num_slots;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t* chunk = a.tables.chunks + c * kChunkFields;
    const int64_t* t = a.tables.tensors + chunk[kTensor] * kTensorFields;
    const ReduceTensor<S, T> rt(a.tables.ptrs + chunk[kTensor] * kPtrFields, U, a.hyper);
    T dot[kLanes] = {}, sq[kLanes] = {}, nonfinite[kLanes] = {};
    // Adds element e into lane j of the chunk's sums and of the given segment sums.
    auto element = [&](int64_t e, int j, T& hs, T& qg, T& qu) {
      reduce_element<U, PARAM, WD>(e, rt.g, rt.p, rt.u0, rt.u1, rt.rate, rt.rsqrt_bc2, k, hs, qg, qu, dot[j], sq[j],
                                   nonfinite[j]);
    };
    if (t[kRowLen] == 1) {
      // One element per unit (biases, norm weights): segment e is element e, and its terms
      // are its unit's partials; one vector loop instead of a loop per element.
      auto one = [&](int64_t e, int j) {
        T hs = 0, qg = 0, qu = 0;
        element(e, j, hs, qg, qu);
        if constexpr (U != Uprev::None) store_partials(slots, num_slots, t[kFirstSlot] + e, rt.scale, hs, qg, qu);
      };
      int64_t e = chunk[kSegBegin];
      for (; e + kLanes <= chunk[kSegEnd]; e += kLanes)
        MLHD_INDEPENDENT for (int j = 0; j < kLanes; ++j) one(e + j, j);
      for (int j = 0; e < chunk[kSegEnd]; ++e, ++j) one(e, j);
    } else {
      for (int64_t s = chunk[kSegBegin]; s < chunk[kSegEnd]; ++s) {
        const Segment seg = segment(t, s);
        T hs[kLanes] = {}, qg[kLanes] = {}, qu[kLanes] = {};
        int64_t e = seg.begin;
        if constexpr (std::is_same_v<S, float> && U == Uprev::Adam) {
          const AdamReduceInputs in{rt.g + e, rt.p + e, rt.u0 + e, rt.u1 + e, PARAM ? rt.rate + e : nullptr,
                                    k.grad_factor, k.weight_decay, rt.rsqrt_bc2, k.eps};
          e += adam_reduce_simd(in, seg.end - e, PARAM, WD, {hs, qg, qu, dot, sq, nonfinite});
        }
        for (; e + kLanes <= seg.end; e += kLanes)
          MLHD_INDEPENDENT for (int j = 0; j < kLanes; ++j) element(e + j, j, hs[j], qg[j], qu[j]);
        for (int j = 0; e < seg.end; ++e, ++j) element(e, j, hs[j], qg[j], qu[j]);
        if constexpr (U != Uprev::None)
          store_partials(slots, num_slots, seg.slot, rt.scale, lane_sum(hs), lane_sum(qg), lane_sum(qu));
      }
    }
    T* chunk_out = static_cast<T*>(a.chunk_partials) + 3 * c;
    chunk_out[0] = rt.scale * lane_sum(dot);
    chunk_out[1] = lane_sum(sq);
    chunk_out[2] = lane_sum(nonfinite);
  }
}

// Stage 1 cleanup: unit sums from their segments' partials, totals from the chunks', both
// in a fixed order.
template <typename T>
void finish_reduce(const ReduceArgs& a) {
  const T* slots = static_cast<const T*>(a.slot_partials);
  T* out = static_cast<T*>(a.unit_sums);
  if (a.uprev != Uprev::None) {
    const int64_t tensors = a.tables.num_tensors;
    at::parallel_for(0, tensors, grain(tensors, a.tables.num_slots), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t* t = a.tables.tensors + i * kTensorFields;
        for (int64_t q = 0; q < a.num_sums; ++q) {
          const T* from = slots + q * a.tables.num_slots;
          T* to = out + q * a.units_stride + t[kUnitOffset];
          if (t[kSegsPerRow] == 1)  // the usual case: a unit's one partial is its sum
            std::copy(from + t[kFirstSlot], from + t[kFirstSlot] + t[kUnits], to);
          else
            for (int64_t row = 0; row < t[kUnits]; ++row) to[row] = unit_total(from, t, row);
        }
      }
    });
  }
  const T* chunks = static_cast<const T*>(a.chunk_partials);
  T* totals = static_cast<T*>(a.totals);
  for (int q = 0; q < 3; ++q) {
    T s = 0;
    for (int64_t c = 0; c < a.tables.num_chunks; ++c) s += chunks[3 * c + q];
    totals[q] = s;
  }
}

// Stage 3 for chunks [c0, c1).
template <typename S, Direction D, bool PARAM>
MLHD_VECTOR_CLONES void apply_chunks(const ApplyArgs& a, const Coef<math_t<S>> k, int64_t c0, int64_t c1) {
  using T = math_t<S>;
  const StepScalars<T> sc(a);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t* chunk = a.tables.chunks + c * kChunkFields;
    const int64_t* t = a.tables.tensors + chunk[kTensor] * kTensorFields;
    const ApplyTensor<S, T> at(a.tables.ptrs + chunk[kTensor] * kPtrFields, a.hyper);
    if (t[kRowLen] == 1) {  // one element per unit: one loop, with the unit's rate per element
      MLHD_INDEPENDENT for (int64_t e = chunk[kSegBegin]; e < chunk[kSegEnd]; ++e) {
        const UnitCoef<T> u(a, t[kUnitOffset] + e);
        apply_element<D, PARAM>(e, at.p, at.g, at.a, at.b, at.c, at.rate, u.kappa, u.parent, k, sc, at.step);
      }
      continue;
    }
    for (int64_t s = chunk[kSegBegin]; s < chunk[kSegEnd]; ++s) {
      const Segment seg = segment(t, s);
      const UnitCoef<T> u(a, seg.unit);
      MLHD_INDEPENDENT for (int64_t e = seg.begin; e < seg.end; ++e)
        apply_element<D, PARAM>(e, at.p, at.g, at.a, at.b, at.c, at.rate, u.kappa, u.parent, k, sc, at.step);
    }
  }
}

struct CpuRunner {
  static bool capturing(at::Device) { return false; }  // (CUDA graphs capture CUDA streams only)
  static void reduce(const ReduceArgs& a, Dtype dtype, at::Device) {
    const int64_t chunks = a.tables.num_chunks, chunk_grain = grain(chunks, num_elements(a.tables));
    dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;
      const Coef<math_t<S>> k(a.hyper, a.grad_factor);  // grad_factor read once per call
      dispatch_reduce(a, [&](auto u, auto param, auto wd) {
        at::parallel_for(0, chunks, chunk_grain, [&](int64_t c0, int64_t c1) {
          reduce_chunks<S, decltype(u)::value, decltype(param)::value, decltype(wd)::value>(a, k, c0, c1);
        });
      });
      finish_reduce<math_t<S>>(a);
    });
  }

  static void apply(const ApplyArgs& a, Dtype dtype, at::Device) {
    const int64_t chunks = a.tables.num_chunks, chunk_grain = grain(chunks, num_elements(a.tables));
    dispatch_dtype<c10::Half, c10::BFloat16>(dtype, [&](auto* tag) {
      using S = std::remove_pointer_t<decltype(tag)>;
      if (*static_cast<const math_t<S>*>(a.gate) == 0) return;  // a skipped step writes nothing
      const Coef<math_t<S>> k(a.hyper, a.grad_factor);
      dispatch_apply(a, [&](auto direction, auto param) {
        at::parallel_for(0, chunks, chunk_grain, [&](int64_t c0, int64_t c1) {
          apply_chunks<S, decltype(direction)::value, decltype(param)::value>(a, k, c0, c1);
        });
      });
      for (int64_t i = 0; i < a.tables.num_tensors; ++i) *pointer<float>(a.tables.ptrs + i * kPtrFields, kStep) += 1;
    });
  }
};

}  // namespace

// Which loop the float32 Adam reduction runs (adam_reduce_simd.h): the CPU's best by
// default; tests and benchmarks switch it to compare the approximate loops with the exact one.
TORCH_LIBRARY_FRAGMENT(multilevel_hd, m) {
  m.def("adam_reduce_isa(str select='') -> str", [](std::string select) { return adam_reduce_isa(select); });
}

TORCH_LIBRARY_IMPL(multilevel_hd, CPU, m) {
  m.impl("reduce", &reduce_op<CpuRunner>);
  m.impl("apply", &apply_op<CpuRunner>);
}

}  // namespace mlhd
