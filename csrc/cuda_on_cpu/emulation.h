// CUDA on the CPU: just enough of the CUDA runtime and device language to run the kernels of
// csrc/cuda, unchanged, on CPU tensors (the counterpart of TRITON_INTERPRET=1). Built only
// into the emulation library (MLHD_CUDA_ON_CPU defined; _csrc.py, runtime.cuh), never into
// the real CUDA build.
//
// The model, chosen so that what is illegal on a GPU fails here instead of passing:
// - Every CUDA thread of a block is a fiber on one CPU thread, with its own stack; blocks run
//   one after another (so `__shared__` is a plain static: one block's copy at a time).
// - `__syncthreads()` is a barrier of the block's fibers. Threads waiting at different
//   barriers, or a thread that exits while others wait, is reported as a divergent barrier.
// - `__shfl_*_sync` is a barrier of the lanes named in the mask, and only those: shuffles
//   inside loops whose trip counts differ between warps stay legal, as on a GPU. Lanes that
//   disagree on the mask or the call site, or a mask that names an exited lane, are errors.
// - The order in which runnable fibers resume, and in which blocks run, is ascending,
//   descending or random (MLHD_CUDA_ON_CPU_ORDER, MLHD_CUDA_ON_CPU_SEED, read per launch):
//   a result that changes with the order has a race (a missing barrier, say).
// - Launch configurations are checked as the hardware checks them (block <= 1024 threads,
//   grid y and z <= 65535, y's limit lowered by MLHD_CUDA_ON_CPU_MAX_GRID_Y for tests), and
//   errors surface through cudaGetLastError as on a GPU.
// - The lanes of one warp shuffle with one mask at a time (so the kernels do).
// What it cannot catch: anything about real memory (coalescing, alignment faults, caches,
// the memory model of concurrent blocks), out-of-range accesses unless built with
// AddressSanitizer (tests/emulation/ does that for the emulation's own tests),
// resource limits (registers, launch bounds), and speed.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <functional>
#include <type_traits>
#include <tuple>
#include <utility>

// Device-language keywords: plain host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Set by the scheduler before it resumes a fiber; read by the kernels as on a GPU.
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// Runtime API: streams are opaque (one CPU stream); errors are sticky until read.
using cudaStream_t = struct CUstream_emulated*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
// One device, 0, whose grid-y limit is MLHD_CUDA_ON_CPU_MAX_GRID_Y (default 65535, as on a
// GPU): tests lower it to reach code that covers what the grid does not, with small grids.
enum cudaDeviceAttr { cudaDevAttrMaxGridDimY = 6 };
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

// Half types: c10's, which round to nearest even like the CUDA intrinsics.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

namespace mlhd_emu {

// Barriers, with their call site so that divergence can be named.
void syncthreads(const char* file, int line);
double shfl_down(unsigned mask, double value, unsigned delta, const char* file, int line);

// Runs body() once per thread of every block (the fibers call it); errors go to the sticky
// last error, as a failed launch does on a GPU.
void launch(dim3 grid, dim3 block, const std::function<void()>& body);

// The emulated stream's capture state, for tests of code that must refuse to run while a
// CUDA graph is being captured (no graph is recorded: the kernels still run).
void set_capturing(bool capturing);

// kernel<<<grid, block, 0, stream>>>(args...) as launch_kernel(grid, block, stream, kernel)(args...).
template <typename... Params>
struct KernelLaunch {
  dim3 grid, block;
  void (*kernel)(Params...);
  template <typename... Args>
  void operator()(Args&&... args) const {
    auto kernel_ = kernel;
    std::tuple<Params...> params(std::forward<Args>(args)...);  // copied, as a launch copies them
    launch(grid, block, [&] { std::apply(kernel_, params); });
  }
};
template <typename... Params>
KernelLaunch<Params...> launch_kernel(dim3 grid, dim3 block, cudaStream_t, void (*kernel)(Params...)) {
  return {grid, block, kernel};
}

}  // namespace mlhd_emu

#define __syncthreads() ::mlhd_emu::syncthreads(__FILE__, __LINE__)

// The value travels as a double, which holds every float, double and int exactly. (The
// optional width argument is not emulated: the kernels shuffle whole warps.)
template <typename T>
inline T mlhd_emu_shfl_down(unsigned mask, T value, unsigned delta, const char* file, int line) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int>,
                "the emulation shuffles float, double and int");
  return static_cast<T>(::mlhd_emu::shfl_down(mask, static_cast<double>(value), delta, file, line));
}
#define __shfl_down_sync(mask, value, delta) mlhd_emu_shfl_down((mask), (value), (delta), __FILE__, __LINE__)
