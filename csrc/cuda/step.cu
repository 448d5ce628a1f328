// CUDA kernels of the fused step; the same tables and element math as the CPU (common.h).
//
// One block per chunk; its warps take the chunk's segments in turn (segment w, w + kWarps,
// ...) and the lanes of a warp stride over a segment's elements, so every unit's partial
// sum comes from a fixed shuffle tree in one warp (units of one element: a thread each). Partials land in per-segment and
// per-chunk slots, and cleanup kernels add them in a fixed order: no atomics, the same
// bits on every run. The apply kernel reads the gate on the device and returns at once
// for a skipped step; nothing waits for the host. Element indices are int64.
#include "runtime.cuh"
#include "step.cuh"

namespace mlhd {

template <> struct Convert<__half> {
  template <typename T> __device__ static T load(__half x) { return T(__half2float(x)); }
  template <typename T> __device__ static __half store(T x) { return __float2half_rn(float(x)); }
};
template <> struct Convert<__nv_bfloat16> {
  template <typename T> __device__ static T load(__nv_bfloat16 x) { return T(__bfloat162float(x)); }
  template <typename T> __device__ static __nv_bfloat16 store(T x) { return __float2bfloat16_rn(float(x)); }
};

namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;

// Lane 0 gets the warp's sum, always added in the same order.
template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Thread 0 gets the block's sum (every thread must call it).
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warps[kWarps];
  v = warp_sum(v);
  __syncthreads();  // `warps` may still be read by a previous call
  if (threadIdx.x % kWarp == 0) warps[threadIdx.x / kWarp] = v;
  __syncthreads();
  T s = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) s += warps[w];
  return s;
}

template <typename S, Uprev U, bool PARAM, bool WD>
__global__ void __launch_bounds__(kThreads) reduce_kernel(ReduceArgs a) {
  using T = math_t<S>;
  const Coef<T> k(a.hyper, a.grad_factor);  // each thread reads grad_factor once
  T* slots = static_cast<T*>(a.slot_partials);
  const int64_t c = blockIdx.x;
  const int64_t* chunk = a.tables.chunks + c * kChunkFields;
  const int64_t* t = a.tables.tensors + chunk[kTensor] * kTensorFields;
  const ReduceTensor<S, T> rt(a.tables.ptrs + chunk[kTensor] * kPtrFields, U, a.hyper);
  const int lane = threadIdx.x % kWarp;
  T dot = 0, sq = 0, nonfinite = 0;
  if (t[kRowLen] == 1) {  // one element per unit: a thread per element, its terms are the unit's partials
    for (int64_t e = chunk[kSegBegin] + threadIdx.x; e < chunk[kSegEnd]; e += kThreads) {
      T hs = 0, qg = 0, qu = 0;
      reduce_element<U, PARAM, WD>(e, rt.g, rt.p, rt.u0, rt.u1, rt.rate, rt.rsqrt_bc2, k, hs, qg, qu, dot, sq,
                                   nonfinite);
      if constexpr (U != Uprev::None) store_partials(slots, a.tables.num_slots, t[kFirstSlot] + e, rt.scale, hs, qg, qu);
    }
  } else {
    for (int64_t s = chunk[kSegBegin] + threadIdx.x / kWarp; s < chunk[kSegEnd]; s += kWarps) {
      const Segment seg = segment(t, s);
      T hs = 0, qg = 0, qu = 0;
      for (int64_t e = seg.begin + lane; e < seg.end; e += kWarp)
        reduce_element<U, PARAM, WD>(e, rt.g, rt.p, rt.u0, rt.u1, rt.rate, rt.rsqrt_bc2, k, hs, qg, qu, dot, sq,
                                     nonfinite);
      if constexpr (U != Uprev::None) {
        hs = warp_sum(hs);
        qg = warp_sum(qg);
        qu = warp_sum(qu);
        if (lane == 0) store_partials(slots, a.tables.num_slots, seg.slot, rt.scale, hs, qg, qu);
      }
    }
  }
  T* chunk_out = static_cast<T*>(a.chunk_partials) + 3 * c;
  dot = block_sum(dot);
  sq = block_sum(sq);
  nonfinite = block_sum(nonfinite);
  if (threadIdx.x == 0) {
    chunk_out[0] = rt.scale * dot;
    chunk_out[1] = sq;
    chunk_out[2] = nonfinite;
  }
}

// Unit sums from their segments' partials: blocks along y take tensors, threads take rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) unit_sums_kernel(ReduceArgs a) {
  const T* slots = static_cast<const T*>(a.slot_partials);
  T* out = static_cast<T*>(a.unit_sums);
  for (int64_t i = blockIdx.y; i < a.tables.num_tensors; i += gridDim.y) {
    const int64_t* t = a.tables.tensors + i * kTensorFields;
    for (int64_t row = blockIdx.x * int64_t(kThreads) + threadIdx.x; row < t[kUnits]; row += gridDim.x * int64_t(kThreads))
      for (int64_t q = 0; q < a.num_sums; ++q)
        out[q * a.units_stride + t[kUnitOffset] + row] = unit_total(slots + q * a.tables.num_slots, t, row);
  }
}

// Totals from the chunks' partials, in one block: thread j adds chunks j, j + kThreads, ...
template <typename T>
__global__ void __launch_bounds__(kThreads) totals_kernel(ReduceArgs a) {
  const T* chunks = static_cast<const T*>(a.chunk_partials);
  for (int q = 0; q < 3; ++q) {
    T s = 0;
    for (int64_t c = threadIdx.x; c < a.tables.num_chunks; c += kThreads) s += chunks[3 * c + q];
    s = block_sum(s);
    if (threadIdx.x == 0) static_cast<T*>(a.totals)[q] = s;
  }
}

template <typename S, Direction D, bool PARAM>
__global__ void __launch_bounds__(kThreads) apply_kernel(ApplyArgs a) {
  using T = math_t<S>;
  if (*static_cast<const T*>(a.gate) == 0) return;  // a skipped step writes nothing
  const Coef<T> k(a.hyper, a.grad_factor);
  const StepScalars<T> sc(a);
  const int64_t* chunk = a.tables.chunks + blockIdx.x * kChunkFields;
  const int64_t* t = a.tables.tensors + chunk[kTensor] * kTensorFields;
  const ApplyTensor<S, T> at(a.tables.ptrs + chunk[kTensor] * kPtrFields, a.hyper);
  if (t[kRowLen] == 1) {  // one element per unit: a thread per element, with its unit's rate
    for (int64_t e = chunk[kSegBegin] + threadIdx.x; e < chunk[kSegEnd]; e += kThreads) {
      const UnitCoef<T> u(a, t[kUnitOffset] + e);
      apply_element<D, PARAM>(e, at.p, at.g, at.a, at.b, at.c, at.rate, u.kappa, u.parent, k, sc, at.step);
    }
    return;
  }
  for (int64_t s = chunk[kSegBegin] + threadIdx.x / kWarp; s < chunk[kSegEnd]; s += kWarps) {
    const Segment seg = segment(t, s);
    const UnitCoef<T> u(a, seg.unit);
    for (int64_t e = seg.begin + threadIdx.x % kWarp; e < seg.end; e += kWarp)
      apply_element<D, PARAM>(e, at.p, at.g, at.a, at.b, at.c, at.rate, u.kappa, u.parent, k, sc, at.step);
  }
}

// After apply_kernel (same stream): every tensor's own step count moves with the gate. A
// separate kernel, because apply_kernel's blocks read the old counts.
template <typename T>
__global__ void count_steps_kernel(Tables tables, const T* gate) {
  const int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  if (i < tables.num_tensors && *gate != 0) *pointer<float>(tables.ptrs + i * kPtrFields, kStep) += 1;
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// The current device's grid-y limit, asked of the runtime rather than assumed (so that the
// emulation can lower it and test the loop that covers what the grid does not).
int64_t max_grid_y() {
  int device = 0, limit = 65535;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&limit, cudaDevAttrMaxGridDimY, device) != cudaSuccess)
    limit = 65535;  // (the launch then reports whatever is wrong with the device)
  return limit;
}

}  // namespace

const char* launch_reduce(const ReduceArgs& a, Dtype dtype, void* stream) {
  if (const char* error = pending_error()) return error;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(dtype, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    using T = math_t<S>;
    dispatch_reduce(a, [&](auto u, auto param, auto wd) {
      MLHD_LAUNCH(static_cast<unsigned>(a.tables.num_chunks), kThreads, s,
                  reduce_kernel<S, decltype(u)::value, decltype(param)::value, decltype(wd)::value>)(a);
    });
    if (a.uprev != Uprev::None) {
      // grid y is limited (65,535 on every GPU so far): its blocks loop over the tensors beyond
      const int64_t limit = max_grid_y();
      const unsigned tensors = unsigned(a.tables.num_tensors < limit ? a.tables.num_tensors : limit);
      MLHD_LAUNCH(dim3(4, tensors), kThreads, s, unit_sums_kernel<T>)(a);
    }
    MLHD_LAUNCH(1, kThreads, s, totals_kernel<T>)(a);
  });
  return launch_status();
}

const char* launch_apply(const ApplyArgs& a, Dtype dtype, void* stream) {
  if (const char* error = pending_error()) return error;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<__half, __nv_bfloat16>(dtype, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    dispatch_apply(a, [&](auto direction, auto param) {
      MLHD_LAUNCH(static_cast<unsigned>(a.tables.num_chunks), kThreads, s,
                  apply_kernel<S, decltype(direction)::value, decltype(param)::value>)(a);
    });
    MLHD_LAUNCH(blocks_for(a.tables.num_tensors), kThreads, s, count_steps_kernel<math_t<S>>)(
        a.tables, static_cast<const math_t<S>*>(a.gate));
  });
  return launch_status();
}

bool stream_capturing(void* stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) == cudaSuccess &&
         status != cudaStreamCaptureStatusNone;
}

}  // namespace cuda
}  // namespace mlhd
