// What the CPU and the CUDA kernels share: the launch tables, the op arguments and the
// per-element math of docs/algorithm.md sections 2-3. Torch-free and host+device, so that the CUDA
// kernels compile without torch headers and both devices run literally the same math.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

// Always inlined: the CPU loops vectorise only with the element math inside them.
#ifdef __CUDACC__
#define MLHD_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MLHD_HD inline __attribute__((always_inline))
#else
#define MLHD_HD inline
#endif

namespace mlhd {

// ---------------------------------------------------------------------------------------
// Launch tables (int64, built once per plan by multilevel_hd/backends/cpp_backend.py).
//
// Every row (unit) of a tensor is cut into `segs_per_row` segments of at most `seg_len`
// elements; a chunk is a run of whole segments of one tensor. A segment lies inside one
// unit, so the reduction writes its partial sums (S, Qg, Qu) to one "slot", and three
// totals per chunk; a cleanup adds them up in a fixed order. Nothing depends on how chunks
// are spread over threads or blocks, so the sums are bit-identical for any thread count.
// Element e of a tensor is e in memory order: every tensor of a parameter shares its
// layout, with dim 0 outermost, so unit j is the block [j * row_len, (j + 1) * row_len).
// Rows of one element (biases, norm weights) make segment e = element e = slot offset e;
// the kernels walk such tensors as plain arrays rather than segment by segment.
enum TensorField { kUnits, kRowLen, kSegsPerRow, kSegLen, kUnitOffset, kFirstSlot, kTensorFields };
enum ChunkField { kTensor, kSegBegin, kSegEnd, kChunkFields };
// The pointer table: one row per tensor, refreshed only when a storage moves (ops.cpp).
// 0 marks a tensor the configuration does not have.
enum PtrField { kParam, kGrad, kStateA, kStateB, kStateC, kRate, kStep, kPtrFields };

struct Tables {
  const int64_t* tensors;  // [num_tensors, kTensorFields]
  const int64_t* chunks;   // [num_chunks, kChunkFields]
  const int64_t* ptrs;     // [num_tensors, kPtrFields]
  int64_t num_tensors, num_chunks, num_slots;
};

struct Segment {
  int64_t begin, end;  // elements of the tensor
  int64_t unit;        // index in the group's flat unit array
  int64_t slot;        // index of the segment's partial sums
};

MLHD_HD Segment segment(const int64_t* t, int64_t s) {
  const int64_t row = t[kSegsPerRow] == 1 ? s : s / t[kSegsPerRow];  // most rows are one segment
  const int64_t row_begin = row * t[kRowLen];
  const int64_t begin = row_begin + (s - row * t[kSegsPerRow]) * t[kSegLen];
  const int64_t end = begin + t[kSegLen] < row_begin + t[kRowLen] ? begin + t[kSegLen] : row_begin + t[kRowLen];
  return {begin, end, t[kUnitOffset] + row, t[kFirstSlot] + s};
}

// A unit's sum from its segments' partials, in segment order (the reduction's cleanup).
template <typename T>
MLHD_HD T unit_total(const T* slots, const int64_t* t, int64_t row) {
  const T* s = slots + t[kFirstSlot] + row * t[kSegsPerRow];
  T acc = 0;
  for (int64_t j = 0; j < t[kSegsPerRow]; ++j) acc += s[j];
  return acc;
}

template <typename T>
MLHD_HD T* pointer(const int64_t* ptr_row, int field) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(ptr_row[field]));
}

// ---------------------------------------------------------------------------------------
// Op arguments.
enum class Dtype { Float, Double, Half, BFloat16 };
// Base direction (docs/algorithm.md section 3). State A / B: Adam m / v; SGD momentum_buffer /
// prev_direction, each present only where the configuration keeps it. State C: Adam with
// amsgrad (Amsgrad), the running maximum vmax of v.
enum class Direction { Adam, Amsgrad, Sgd, Momentum, Nesterov };
// Where the reduction takes u_prev from: not needed (no hyper-gradient sums), Adam's m and v
// (vmax when the table has state C), or a stored tensor (SGD: prev_direction if kept, else
// momentum_buffer).
enum class Uprev { None, Adam, Stored };

struct Hyper {
  double weight_decay;  // coupled (L2) decay, folded into g; 0 if decoupled
  double decoupled_weight_decay;
  double beta1, beta2, eps;
  double momentum, dampening;
  bool multiplicative;         // the param level's HD rule
  double shrinkage;            // the param level's rho (0: none)
  double rate_min, rate_max;   // +-inf where unbounded
};

struct ReduceArgs {
  Tables tables;
  Hyper hyper;
  // math-type device scalar: what the raw gradient is multiplied by before anything else,
  // (-1 for maximize) / GradScaler's scale; read once per thread, never on the host
  const void* grad_factor;
  Uprev uprev;
  bool param_sums;      // sums with the param level's rates (param_dot, param_sq)
  bool coupled_decay;   // g reads p
  int64_t num_sums;     // 1: S; 3: S, Qg, Qu (multiplicative rule)
  // math-type arrays: slot partials [3, num_slots], chunk partials [num_chunks, 3],
  // outputs unit_sums [num_sums, units_stride] and totals [3] (param_dot, param_sq, nonfinite)
  void* slot_partials;
  void* chunk_partials;
  void* unit_sums;
  int64_t units_stride;
  void* totals;
};

struct ApplyArgs {
  Tables tables;
  Hyper hyper;
  const void* grad_factor;  // as in ReduceArgs
  Direction direction;
  bool param_level;
  // math-type device scalars / per-unit arrays from the level stage (StepCoefficients);
  // a stride of 0 broadcasts a 0-d value to every unit
  const void* gate;
  const void* hd_gate;
  const void* kappa_units;
  int64_t kappa_stride;
  const void* param_kappa;
  const void* param_hd;
  const void* param_parent;  // null: no shrinkage
  int64_t parent_stride;
};

// Runtime flags -> template arguments, so that a configuration neither reads tensors it does
// not need nor branches per element.
template <typename Half, typename BFloat16, typename F>
void dispatch_dtype(Dtype d, F&& f) {
  switch (d) {
    case Dtype::Float: return f(static_cast<float*>(nullptr));
    case Dtype::Double: return f(static_cast<double*>(nullptr));
    case Dtype::Half: return f(static_cast<Half*>(nullptr));
    case Dtype::BFloat16: return f(static_cast<BFloat16*>(nullptr));
  }
}

template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{}); else f(std::false_type{});
}

// f(Uprev constant, param_sums constant, coupled_decay constant)
template <typename F>
void dispatch_reduce(const ReduceArgs& a, F&& f) {
  dispatch_bool(a.coupled_decay, [&](auto wd) {
    if (a.uprev == Uprev::None) return f(std::integral_constant<Uprev, Uprev::None>{}, std::false_type{}, wd);
    dispatch_bool(a.param_sums, [&](auto param) {
      if (a.uprev == Uprev::Adam) f(std::integral_constant<Uprev, Uprev::Adam>{}, param, wd);
      else f(std::integral_constant<Uprev, Uprev::Stored>{}, param, wd);
    });
  });
}

// f(Direction constant, param_level constant)
template <typename F>
void dispatch_apply(const ApplyArgs& a, F&& f) {
  dispatch_bool(a.param_level, [&](auto param) {
    switch (a.direction) {
      case Direction::Adam: return f(std::integral_constant<Direction, Direction::Adam>{}, param);
      case Direction::Amsgrad: return f(std::integral_constant<Direction, Direction::Amsgrad>{}, param);
      case Direction::Sgd: return f(std::integral_constant<Direction, Direction::Sgd>{}, param);
      case Direction::Momentum: return f(std::integral_constant<Direction, Direction::Momentum>{}, param);
      case Direction::Nesterov: return f(std::integral_constant<Direction, Direction::Nesterov>{}, param);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Per-element math, in T = float (float32 and half parameters) or double.
template <typename S> struct MathType { using type = float; };
template <> struct MathType<double> { using type = double; };
template <typename S> using math_t = typename MathType<S>::type;

// Storage <-> math conversions; the CUDA file specialises them for __half / __nv_bfloat16.
template <typename S> struct Convert {
  template <typename T> MLHD_HD static T load(S x) { return static_cast<T>(x); }
  template <typename T> MLHD_HD static S store(T x) { return static_cast<S>(x); }
};

// The per-element code below has no branch on a per-call flag: a flag becomes a math-type
// value selected on (`flag != 0 ? a : b`, both sides computed first, which the CPU loops
// vectorise; GCC will not vectorise a select on a loop-invariant bool, nor one whose sides
// hold selects of their own), or a coefficient where the term it multiplies is finite
// (x * 1 = x, 0 * buf = 0 for the zero buffer of a first step): a coefficient of 0 on a
// term that may be infinite would be NaN.
// grad_factor is read from the op's device scalar (ReduceArgs / ApplyArgs) by whoever
// builds the Coef: once per CPU op call, once per CUDA thread. Adam's 1 - beta is taken in
// double, as torch.optim takes it: in float, 1 - 0.999f is off by 1.3e-5 (0.999 itself rounds).
template <typename T>
struct Coef {
  T grad_factor, weight_decay, decoupled_weight_decay, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, momentum;
  MLHD_HD Coef(const Hyper& h, const void* factor)
      : grad_factor(*static_cast<const T*>(factor)), weight_decay(h.weight_decay),
        decoupled_weight_decay(h.decoupled_weight_decay), beta1(h.beta1), beta2(h.beta2),
        one_minus_beta1(1 - h.beta1), one_minus_beta2(1 - h.beta2), eps(h.eps), momentum(h.momentum) {}
};

// What one tensor's own step count implies (computed in double, once per chunk).
template <typename T>
struct TensorStep {
  T prev_scale, prev_rsqrt_bc2;  // Adam u_prev with s = max(step, 1): zero if never stepped
  T scale, rsqrt_bc2;            // Adam u of this step, s = step + 1
  T buf_keep, buf_grad;          // SGD: buf = keep * buf + grad * g (the first step sets buf = g)
  MLHD_HD TensorStep(float step, const Hyper& h) {
    const double s_prev = step > 1 ? step : 1.0, s = step + 1.0;
    prev_scale = T(1.0 / (1.0 - std::pow(h.beta1, s_prev)));
    prev_rsqrt_bc2 = T(1.0 / std::sqrt(1.0 - std::pow(h.beta2, s_prev)));
    scale = T(1.0 / (1.0 - std::pow(h.beta1, s)));
    rsqrt_bc2 = T(1.0 / std::sqrt(1.0 - std::pow(h.beta2, s)));
    buf_keep = step == 0 ? T(0) : T(h.momentum);
    buf_grad = step == 0 ? T(1) : T(1 - h.dampening);
  }
};

// docs/algorithm.md step 1: the raw gradient times grad_factor (unscaled from GradScaler's scale and
// negated for maximize), then plus coupled weight decay, which must see the unscaled g (a
// select, not a multiply by 0: an infinite p must not turn g into NaN when there is no decay).
template <typename T>
MLHD_HD T effective_grad(T g, T p, const Coef<T>& k) {
  g *= k.grad_factor;
  return k.weight_decay != 0 ? g + k.weight_decay * p : g;
}

// Adam's direction without the 1 / (1 - b1^s) factor, which callers apply to sums or kappa.
// m = 0 gives m itself (what the division gives wherever it is defined): with eps = 0 a
// parameter that never stepped (m = v = 0) has u_prev = 0, not 0/0 (docs/algorithm.md section 2, step 3).
template <typename T>
MLHD_HD T adam_unscaled(T m, T v, T rsqrt_bc2, T eps) {
  return m == T(0) ? m : m / (std::sqrt(v) * rsqrt_bc2 + eps);
}

template <typename T>
MLHD_HD T sign(T x) { return T(x > 0) - T(x < 0); }

// A segment's partial sums S, Qg, Qu (Qg and Qu matter only to the multiplicative rule).
template <typename T>
MLHD_HD void store_partials(T* slots, int64_t num_slots, int64_t slot, T scale, T hs, T qg, T qu) {
  slots[slot] = scale * hs;
  slots[num_slots + slot] = qg;
  slots[2 * num_slots + slot] = scale * scale * qu;
}

// One tensor as the reduction reads it. u_prev = scale * x, with x from u0 and u1 (Adam: m
// and v, or vmax with amsgrad; otherwise the stored direction in u0); the scale goes onto the sums.
template <typename S, typename T>
struct ReduceTensor {
  const S* g;
  const S* p;
  const T *u0, *u1, *rate;
  T scale = 1, rsqrt_bc2 = 1;
  MLHD_HD ReduceTensor(const int64_t* ptr, Uprev u, const Hyper& h)
      : g(pointer<const S>(ptr, kGrad)), p(pointer<const S>(ptr, kParam)), u0(pointer<const T>(ptr, kStateA)),
        u1(pointer<const T>(ptr, kStateB)), rate(pointer<const T>(ptr, kRate)) {
    if (u == Uprev::Stored && u1) u0 = u1;  // SGD: prev_direction when kept, else momentum_buffer
    if (const T* vmax = pointer<const T>(ptr, kStateC)) u1 = vmax;  // Adam with amsgrad
    if (u == Uprev::Adam) {
      const TensorStep<T> ts(*pointer<const float>(ptr, kStep), h);
      scale = ts.prev_scale;
      rsqrt_bc2 = ts.prev_rsqrt_bc2;
    }
  }
};

// docs/algorithm.md steps 1-3 for one element: adds g*x, g^2, x^2, the param level's alpha*g*x and
// (alpha*g)^2, and g - g (0, or NaN for a NaN or Inf g) to the caller's accumulators.
template <Uprev U, bool PARAM, bool WD, typename S, typename T>
MLHD_HD void reduce_element(int64_t e, const S* __restrict__ g, const S* __restrict__ p, const T* __restrict__ u0,
                            const T* __restrict__ u1, const T* __restrict__ rate, T rsqrt_bc2, const Coef<T>& k,
                            T& hs, T& qg, T& qu, T& dot, T& sq, T& nonfinite) {
  const T gv = effective_grad(Convert<S>::template load<T>(g[e]), WD ? Convert<S>::template load<T>(p[e]) : T(0), k);
  nonfinite += gv - gv;
  if constexpr (U != Uprev::None) {
    const T x = U == Uprev::Adam ? adam_unscaled(u0[e], u1[e], rsqrt_bc2, k.eps) : u0[e];
    hs += gv * x;
    qg += gv * gv;
    qu += x * x;
    if constexpr (PARAM) {
      const T ag = rate[e] * gv;
      dot += ag * x;
      sq += ag * ag;
    }
  }
}

// A rate into its bounds, as torch.clamp: a NaN stays NaN.
template <typename T>
MLHD_HD T clamp_rate(T x, T lo, T hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

// The param level's coefficients for one call, from the level stage's device scalars.
template <typename T>
struct StepScalars {
  T param_kappa;  // kappa_e = kappa_units[unit] + param_kappa * alpha_param_new[e]
  T hd;           // the HD coefficient of the rule's update
  T shrinkage, rate_min, rate_max;
  T multiplicative, shrink;  // flags, 1 or 0 (see Coef)
  T rates_move;              // t >= 2 (the level stage's hd_gate); before, every rate keeps its value
  MLHD_HD explicit StepScalars(const ApplyArgs& a) {
    const Hyper& h = a.hyper;
    param_kappa = a.param_level ? *static_cast<const T*>(a.param_kappa) : T(0);
    hd = a.param_level ? *static_cast<const T*>(a.param_hd) : T(0);
    shrinkage = T(h.shrinkage);
    rate_min = T(h.rate_min);
    rate_max = T(h.rate_max);
    multiplicative = h.multiplicative ? T(1) : T(0);
    shrink = h.shrinkage != 0 ? T(1) : T(0);
    rates_move = *static_cast<const T*>(a.hd_gate);
  }
};

// The param level's HD update (docs/algorithm.md step 4: multiplicative rate * (1 + hd * sign(h)) or
// additive rate + hd * h), shrinkage toward its parent, clamp. Every switch is a select, never
// a coefficient of 0: 0 * h is NaN for an infinite h (skip_nonfinite=False), so a switched-off
// term or a rate that must not move would turn NaN.
template <typename T>
MLHD_HD T new_param_rate(T rate, T h, T parent, const StepScalars<T>& c) {
  const T multiplied = rate * (1 + c.hd * sign(h)), added = rate + c.hd * h;
  const T updated = c.multiplicative != 0 ? multiplied : added;
  const T shrunk = updated + c.shrinkage * (parent - updated);
  const T clamped = clamp_rate(c.shrink != 0 ? shrunk : updated, c.rate_min, c.rate_max);
  return c.rates_move != 0 ? clamped : rate;
}

// One tensor as the elementwise pass reads and writes it.
template <typename S, typename T>
struct ApplyTensor {
  S* p;
  const S* g;
  T *a, *b, *c, *rate;  // state A / B / C (see Direction) and the param level's rates
  TensorStep<T> step;
  MLHD_HD ApplyTensor(const int64_t* ptr, const Hyper& h)
      : p(pointer<S>(ptr, kParam)), g(pointer<const S>(ptr, kGrad)), a(pointer<T>(ptr, kStateA)),
        b(pointer<T>(ptr, kStateB)), c(pointer<T>(ptr, kStateC)), rate(pointer<T>(ptr, kRate)),
        step(*pointer<const float>(ptr, kStep), h) {}
};

// A unit's applied rate without the param level, and its param-level shrinkage target.
template <typename T>
struct UnitCoef {
  T kappa, parent;
  MLHD_HD UnitCoef(const ApplyArgs& a, int64_t unit)
      : kappa(static_cast<const T*>(a.kappa_units)[unit * a.kappa_stride]),
        parent(a.param_parent ? static_cast<const T*>(a.param_parent)[unit * a.parent_stride] : T(0)) {}
};

// docs/algorithm.md steps 4 (param level), 5 and 6 for one element; every state moves here. Runs only
// when the step proceeds (gate 1): a skipped step never reaches it, so it writes nothing.
template <Direction D, bool PARAM, typename S, typename T>
MLHD_HD void apply_element(int64_t e, S* __restrict__ p, const S* __restrict__ grad, T* __restrict__ a,
                           T* __restrict__ b, T* __restrict__ vmax, T* __restrict__ rate, T kappa, T parent,
                           const Coef<T>& k, const StepScalars<T>& c, const TensorStep<T>& ts) {
  constexpr bool ADAM = D == Direction::Adam || D == Direction::Amsgrad;
  T x = Convert<S>::template load<T>(p[e]);
  const T g = effective_grad(Convert<S>::template load<T>(grad[e]), x, k);
  if constexpr (PARAM) {
    T u_prev;  // read before the state moves
    if constexpr (ADAM)
      u_prev = adam_unscaled(a[e], D == Direction::Amsgrad ? vmax[e] : b[e], ts.prev_rsqrt_bc2, k.eps) * ts.prev_scale;
    else if constexpr (D == Direction::Momentum) u_prev = a[e];
    else u_prev = b[e];
    const T r = new_param_rate(rate[e], g * u_prev, parent, c);
    rate[e] = r;
    kappa += c.param_kappa * r;
  }
  x *= 1 - kappa * k.decoupled_weight_decay;
  T u = g;
  if constexpr (ADAM) {
    const T m = k.beta1 * a[e] + k.one_minus_beta1 * g;
    T v = k.beta2 * b[e] + k.one_minus_beta2 * g * g;
    a[e] = m;
    b[e] = v;
    if constexpr (D == Direction::Amsgrad) {
      // torch.maximum(vmax, v) of the raw v, before bias correction; a NaN in either propagates
      const T old = vmax[e];
      v = (v != v || v > old) ? v : old;
      vmax[e] = v;
    }
    u = adam_unscaled(m, v, ts.rsqrt_bc2, k.eps) * ts.scale;
  } else {
    if constexpr (D != Direction::Sgd) {
      const T buf = ts.buf_keep * a[e] + ts.buf_grad * g;
      a[e] = buf;
      u = D == Direction::Nesterov ? g + k.momentum * buf : buf;
    }
    if constexpr (D != Direction::Momentum) b[e] = u;  // prev_direction: the next step's u_prev
  }
  p[e] = Convert<S>::template store<T>(x - kappa * u);
}

}  // namespace mlhd
