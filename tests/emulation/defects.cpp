// Kernels with planted defects, for the emulation's own tests (tests/test_cuda_on_cpu.py):
// the emulation must compute what a GPU computes, and report what a GPU leaves undefined.
// `defects CASE` runs one kernel on a block of 256 threads and prints its result, or the
// error the launch reports (exit status 3).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../csrc/cuda/runtime.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Lane 0 of each warp gets the sum of its warp; last_offset 1 is the correct tree.
__device__ double warp_sum(double v, int last_offset) {
  for (int offset = kWarp / 2; offset >= last_offset; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The block's sum in thread 0, through shared memory; `second_barrier` false is the planted race.
__device__ double block_sum(double v, bool second_barrier) {
  __shared__ double warps[kThreads / kWarp];
  v = warp_sum(v, 1);
  if (threadIdx.x % kWarp == 0) warps[threadIdx.x / kWarp] = v;
  if (second_barrier) __syncthreads();
  double s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / kWarp; ++w) s += warps[w];
  return s;
}

__global__ void sum_kernel(const double* x, double* out, bool second_barrier) {
  const double s = block_sum(x[blockIdx.x * kThreads + threadIdx.x], second_barrier);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

__global__ void warp_sum_kernel(const double* x, double* out, int last_offset) {
  const double s = warp_sum(x[threadIdx.x], last_offset);
  if (threadIdx.x % kWarp == 0) out[threadIdx.x / kWarp] = s;
}

__global__ void out_of_range_kernel(double* out) { out[threadIdx.x + 1] = threadIdx.x; }  // one past the end

__global__ void barrier_in_branch_kernel(double* out) {
  if (threadIdx.x < kThreads / 2) __syncthreads();  // half the block never arrives
  out[threadIdx.x] = 1;
}

__global__ void two_barriers_kernel(double* out) {
  if (threadIdx.x % 2) __syncthreads();
  else __syncthreads();  // another barrier: undefined on a GPU
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit_kernel(double* out) {
  if (threadIdx.x % kWarp == 31) return;  // lane 31 leaves; the mask still names it
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, double(threadIdx.x), 1);
}

__global__ void grid_y_kernel(double* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] += 1;
}

int report() {
  if (const char* error = mlhd::cuda::launch_status()) {
    std::printf("error: %s\n", error);
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string name = argv[1];
  const int blocks = 4;
  std::vector<double> x(blocks * kThreads), out(blocks * kThreads, 0.0);
  for (size_t i = 0; i < x.size(); ++i) x[i] = double((i * 7919) % 1000) / 8.0;  // exact sums in double
  const cudaStream_t s = nullptr;
  if (name == "sum" || name == "sum-missing-barrier") {
    MLHD_LAUNCH(blocks, kThreads, s, sum_kernel)(x.data(), out.data(), name == "sum");
    for (int b = 0; b < blocks; ++b) std::printf("%.3f ", out[b]);
  } else if (name == "warp-sum" || name == "warp-sum-off-by-one") {
    MLHD_LAUNCH(1, kThreads, s, warp_sum_kernel)(x.data(), out.data(), name == "warp-sum" ? 1 : 2);
    for (int w = 0; w < kThreads / kWarp; ++w) std::printf("%.3f ", out[w]);
  } else if (name == "out-of-range") {
    double* small = static_cast<double*>(std::malloc(kThreads * sizeof(double)));
    MLHD_LAUNCH(1, kThreads, s, out_of_range_kernel)(small);
    std::free(small);
  } else if (name == "barrier-in-branch") {
    MLHD_LAUNCH(1, kThreads, s, barrier_in_branch_kernel)(out.data());
  } else if (name == "two-barriers") {
    MLHD_LAUNCH(1, kThreads, s, two_barriers_kernel)(out.data());
  } else if (name == "shuffle-after-exit") {
    MLHD_LAUNCH(1, kThreads, s, shuffle_after_exit_kernel)(out.data());
  } else if (name == "grid-y-65536") {
    MLHD_LAUNCH(dim3(1, 65536), kThreads, s, grid_y_kernel)(out.data());
  } else {
    return 2;
  }
  std::printf("\n");
  return report();
}
