// The CUDA level-stage kernel of csrc/cuda/levels.cu, compiled as host C++ over the emulation.
#include "../cuda/levels.cu"
