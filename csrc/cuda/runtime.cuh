// The CUDA runtime the kernels of this folder build against: the real one under nvcc, or the
// CPU emulation (../cuda_on_cpu/emulation.h) when MLHD_CUDA_ON_CPU is defined, which compiles
// these very files as host C++. Kernels are launched through MLHD_LAUNCH, the one place where
// the two builds differ in syntax:
//   MLHD_LAUNCH(grid, block, stream, kernel<...>)(args...)  ==  kernel<...><<<grid, block, 0, stream>>>(args...)
#pragma once

#ifdef MLHD_CUDA_ON_CPU
#include "../cuda_on_cpu/emulation.h"
#define MLHD_LAUNCH(grid, block, stream, ...) ::mlhd_emu::launch_kernel(grid, block, stream, __VA_ARGS__)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define MLHD_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace mlhd::cuda {

// Before a launch: an error already pending came from someone else's earlier work. Report it
// as such, without clearing it (cudaGetLastError would), and launch nothing.
inline const char* pending_error() {
  return cudaPeekAtLastError() == cudaSuccess ? nullptr
                                              : "a CUDA error from earlier work (not multilevel_hd's) is pending";
}

// After the launches: nullptr, or the launch error's text.
inline const char* launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace mlhd::cuda
