// The level stage on the GPU (levels.h) in one launch of one block: each warp sums the
// units of some layers (a fixed order: lanes, then a shuffle tree), one thread adds up the
// group's sums and runs update_group, then every thread updates some layers, then some units. One block because the parts must wait
// for each other and the arrays are small (one entry per unit); the whole stage is a few
// microseconds of the step.
#include "../levels.h"
#include "runtime.cuh"
#include "step.cuh"

namespace mlhd::cuda {
namespace {

constexpr int kLevelThreads = 1024;
constexpr int kWarp = 32;

template <typename T, bool MULT, bool UNIT_DOT>
__device__ void sum_layers(const LevelArgs& a) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t l = threadIdx.x / kWarp; l < a.num_layers; l += kLevelThreads / kWarp) {
    double acc[kUnitSums] = {};
    for (int64_t u = a.first_unit[l] + lane; u < a.first_unit[l + 1]; u += kWarp)
      add_unit_sums<T, MULT, UNIT_DOT>(a, u, acc, 1);
    for (int q = 0; q < kUnitSums; ++q) {
      for (int offset = kWarp / 2; offset > 0; offset /= 2) acc[q] += __shfl_down_sync(0xffffffffu, acc[q], offset);
      if (lane == 0) a.layer_sums[l * kLayerSums + q] = acc[q];
    }
    if (lane == 0) layer_terms<T>(a, l);
  }
}

template <typename T, bool MULT>
__global__ void __launch_bounds__(kLevelThreads) level_stage_kernel(LevelArgs a) {
  __shared__ GroupStep<T> group;
  const int64_t L = a.num_layers;
  if (a.num_levels > 1 && a.index[kUnitLevel] >= 0) sum_layers<T, MULT, true>(a);
  else sum_layers<T, MULT, false>(a);
  __syncthreads();
  if (threadIdx.x == 0) {
    double total[kLayerSums] = {};
    for (int64_t l = 0; l < L; ++l)
      for (int q = 0; q < kLayerSums; ++q) total[q] += a.layer_sums[l * kLayerSums + q];
    group = update_group<T>(a, total);
  }
  __syncthreads();
  const GroupStep<T> g = group;
  for (int64_t l = threadIdx.x; l < L; l += kLevelThreads) update_layer<T>(a, g, l);
  __syncthreads();
  for (int64_t u = threadIdx.x; u < a.num_units; u += kLevelThreads) {
    int64_t lo = 0, hi = L;  // u's layer: the last l with first_unit[l] <= u (skips empty layers)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (a.first_unit[mid] <= u) lo = mid;
      else hi = mid;
    }
    const UnitPass<T> c = unit_pass<T>(a, g, lo);
    if (c.rate) update_unit<T, MULT, true>(c, u);
    else update_unit<T, MULT, false>(c, u);
  }
}

}  // namespace

const char* launch_levels(const LevelArgs& a, bool float64, void* stream) {
  if (const char* error = pending_error()) return error;
  auto s = static_cast<cudaStream_t>(stream);
  if (float64) {
    if (a.multiplicative) MLHD_LAUNCH(1, kLevelThreads, s, level_stage_kernel<double, true>)(a);
    else MLHD_LAUNCH(1, kLevelThreads, s, level_stage_kernel<double, false>)(a);
  } else {
    if (a.multiplicative) MLHD_LAUNCH(1, kLevelThreads, s, level_stage_kernel<float, true>)(a);
    else MLHD_LAUNCH(1, kLevelThreads, s, level_stage_kernel<float, false>)(a);
  }
  return launch_status();
}

}  // namespace mlhd::cuda
