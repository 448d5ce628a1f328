// The level stage on the GPU (levels.h): four launches on the stream, one per part that must
// wait for all of the previous one, so that the stage scales to millions of units and tens
// of thousands of layers; no atomics and no host synchronisation, the same bits on every run.
// (1) layer_sums_kernel: a warp per layer, lanes over its units, then a shuffle tree.
// (2) group_kernel: one block adds up the group's sums in layer order and one thread runs
//     update_group, leaving its GroupStep in device scratch for the launches after it.
// (2) layers_kernel: a thread per layer runs update_layer.
// (3) units_kernel: a thread per unit runs update_unit.
// Grids are sized to the work: x holds 2^31 - 1 blocks, more than any group that fits in a
// GPU's memory needs (a unit has at least one element, a layer is a tensor). Indices are int64.
#include "../levels.h"
#include "runtime.cuh"
#include "step.cuh"

namespace mlhd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
// Layers whose sums group_kernel stages in shared memory at a time (28 KiB).
constexpr int kGroupChunk = 512;

// Enough blocks of `per_block` for n items; at least one (an empty grid is a launch error,
// and a group may have no units).
unsigned blocks_for(int64_t n, int per_block) {
  return n > 0 ? static_cast<unsigned>((n + per_block - 1) / per_block) : 1u;
}

// (1) Warp w of block b sums layer b * kWarps + w: lane j adds units j, j + 32, ... of the
// layer, then a fixed shuffle tree adds the lanes (a fixed order, whatever the schedule).
template <typename T, bool MULT, bool UNIT_DOT>
__global__ void __launch_bounds__(kThreads) layer_sums_kernel(LevelArgs a) {
  const int64_t l = blockIdx.x * int64_t(kWarps) + threadIdx.x / kWarp;
  if (l >= a.num_layers) return;  // (whole warps: kWarps layers per block)
  const int lane = threadIdx.x % kWarp;
  double acc[kUnitSums] = {};
  for (int64_t u = a.first_unit[l] + lane; u < a.first_unit[l + 1]; u += kWarp)
    add_unit_sums<T, MULT, UNIT_DOT>(a, u, acc, 1);
  for (int q = 0; q < kUnitSums; ++q) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) acc[q] += __shfl_down_sync(0xffffffffu, acc[q], offset);
    if (lane == 0) a.layer_sums[l * kLayerSums + q] = acc[q];
  }
  if (lane == 0) layer_terms<T>(a, l);
}

// (2) One block. Each of the group's sums is one chain of additions in layer order (the
// order update_group asks for), so it runs in one thread: thread q adds sum q. The block
// first copies kGroupChunk layers' sums into shared memory, a coalesced load, so that the
// chains wait on shared memory rather than on a global load per layer.
template <typename T>
__global__ void __launch_bounds__(kThreads) group_kernel(LevelArgs a) {
  __shared__ double chunk[kGroupChunk * kLayerSums];
  __shared__ double total[kLayerSums];
  const int q = threadIdx.x;
  double sum = 0;
  for (int64_t first = 0; first < a.num_layers; first += kGroupChunk) {
    const int n = static_cast<int>(a.num_layers - first < kGroupChunk ? a.num_layers - first : kGroupChunk);
    for (int i = threadIdx.x; i < n * kLayerSums; i += kThreads) chunk[i] = a.layer_sums[first * kLayerSums + i];
    __syncthreads();
    if (q < kLayerSums)
      for (int l = 0; l < n; ++l) sum += chunk[l * kLayerSums + q];
    __syncthreads();  // the chunk is read before the next one overwrites it
  }
  if (q < kLayerSums) total[q] = sum;
  __syncthreads();
  if (threadIdx.x == 0) *static_cast<GroupStep<T>*>(a.group_step) = update_group<T>(a, total);
}

// (2) A thread per layer.
template <typename T>
__global__ void __launch_bounds__(kThreads) layers_kernel(LevelArgs a) {
  const int64_t l = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (l < a.num_layers) update_layer<T>(a, *static_cast<const GroupStep<T>*>(a.group_step), l);
}

// (3) A thread per unit; its layer is the last l with first_unit[l] <= u (a binary search,
// which skips empty layers).
template <typename T, bool MULT>
__global__ void __launch_bounds__(kThreads) units_kernel(LevelArgs a) {
  const int64_t u = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (u >= a.num_units) return;
  int64_t lo = 0, hi = a.num_layers;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (a.first_unit[mid] <= u) lo = mid;
    else hi = mid;
  }
  const UnitPass<T> c = unit_pass<T>(a, *static_cast<const GroupStep<T>*>(a.group_step), lo);
  if (c.rate && c.shrink) update_unit<T, MULT, true, true>(c, u);
  else if (c.rate) update_unit<T, MULT, true, false>(c, u);
  else update_unit<T, MULT, false, false>(c, u);
}

template <typename T, bool MULT>
void launch_stage(const LevelArgs& a, cudaStream_t s) {
  const unsigned layer_warps = blocks_for(a.num_layers, kWarps);
  if (a.num_levels > 1 && a.index[kUnitLevel] >= 0)
    MLHD_LAUNCH(layer_warps, kThreads, s, layer_sums_kernel<T, MULT, true>)(a);
  else
    MLHD_LAUNCH(layer_warps, kThreads, s, layer_sums_kernel<T, MULT, false>)(a);
  MLHD_LAUNCH(1, kThreads, s, group_kernel<T>)(a);
  MLHD_LAUNCH(blocks_for(a.num_layers, kThreads), kThreads, s, layers_kernel<T>)(a);
  MLHD_LAUNCH(blocks_for(a.num_units, kThreads), kThreads, s, units_kernel<T, MULT>)(a);
}

}  // namespace

const char* launch_levels(const LevelArgs& a, bool float64, void* stream) {
  if (const char* error = pending_error()) return error;
  auto s = static_cast<cudaStream_t>(stream);
  if (float64) {
    if (a.multiplicative) launch_stage<double, true>(a, s);
    else launch_stage<double, false>(a, s);
  } else {
    if (a.multiplicative) launch_stage<float, true>(a, s);
    else launch_stage<float, false>(a, s);
  }
  return launch_status();
}

}  // namespace mlhd::cuda
