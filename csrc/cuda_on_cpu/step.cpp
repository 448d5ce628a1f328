// The CUDA kernels of csrc/cuda/step.cu, compiled as host C++ over the emulation (emulation.h).
#include "../cuda/step.cu"
