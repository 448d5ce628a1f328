// Host entry points of the CUDA kernels (step.cu, levels.cu). Torch-free: the binding
// (binding.cpp) passes raw tables and the stream as an opaque cudaStream_t.
#pragma once

#include "../common.h"
#include "../levels.h"

namespace mlhd::cuda {

// Each returns nullptr on success, else the CUDA error string. Nothing synchronises.
const char* launch_reduce(const ReduceArgs& a, Dtype dtype, void* stream);
const char* launch_apply(const ApplyArgs& a, Dtype dtype, void* stream);
const char* launch_levels(const LevelArgs& a, bool float64, void* stream);

// Whether the stream is capturing a CUDA graph (the pointer tables must not be uploaded then).
bool stream_capturing(void* stream);

}  // namespace mlhd::cuda
