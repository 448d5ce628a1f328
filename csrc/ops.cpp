// The op schemas, and the argument handling both devices share (pointer tables, staging).
#include <Python.h>
#include <torch/library.h>

#include <cstring>

#include "ops.h"

namespace mlhd {

namespace {

// Units are dim-0 slices; the kernels find unit j at [j * row_len, (j + 1) * row_len) in
// memory, which holds for a dense tensor whose dim 0 is outermost (contiguous and
// channels_last tensors are).
bool rows_in_memory_order(const at::Tensor& p) {
  return p.is_non_overlapping_and_dense() && (p.dim() == 0 || p.size(0) == 1 || p.stride(0) * p.size(0) == p.numel());
}

// Same element at the same offset (strides of size-1 dimensions do not matter).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr())); }

Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::Float;
    case at::kDouble: return Dtype::Double;
    case at::kHalf: return Dtype::Half;
    case at::kBFloat16: return Dtype::BFloat16;
    default: TORCH_CHECK(false, "multilevel_hd: unsupported parameter dtype ", t);
  }
}

// Upload the pointer rows only when a storage moved since the last call. The host mirror is
// only read and written here; the upload goes through a fresh pinned buffer, which the
// caching host allocator keeps until the asynchronous copy has finished. Never while a CUDA
// graph is being captured: the graph would record a copy from that temporary buffer, and
// its replays would read whatever the allocator has put there since.
void refresh_pointers(const std::vector<int64_t>& rows, at::Tensor& mirror, at::Tensor& table, bool capturing) {
  const size_t bytes = rows.size() * sizeof(int64_t);
  TORCH_CHECK(mirror.device().is_cpu() && mirror.scalar_type() == at::kLong && mirror.is_contiguous() &&
                  static_cast<size_t>(mirror.numel()) == rows.size(),
              "ptr_mirror must be a contiguous CPU int64 tensor of ", rows.size(), " elements");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.is_contiguous() && table.numel() == mirror.numel(),
              "ptr_table must be a contiguous int64 tensor shaped like ptr_mirror");
  if (std::memcmp(mirror.data_ptr(), rows.data(), bytes) == 0) return;
  TORCH_CHECK(!capturing,
              "multilevel_hd: a parameter, gradient or state tensor has a new address since the last eager step, "
              "and the kernels' pointer table cannot be updated inside a CUDA graph capture. Capture after a few "
              "eager steps with the same tensors: keep gradients in static tensors (zero_grad(set_to_none=False) "
              "in the captured region, or capture opt.step() alone)");
  std::memcpy(mirror.data_ptr(), rows.data(), bytes);
  if (table.device().is_cpu())
    std::memcpy(table.data_ptr(), rows.data(), bytes);
  else
    table.copy_(mirror.pin_memory(), /*non_blocking=*/true);
}

}  // namespace

Direction parse_direction(std::string_view d) {
  if (d == "adam") return Direction::Adam;
  if (d == "amsgrad") return Direction::Amsgrad;
  if (d == "sgd") return Direction::Sgd;
  if (d == "momentum") return Direction::Momentum;
  if (d == "nesterov") return Direction::Nesterov;
  TORCH_CHECK(false, "unknown direction '", std::string(d), "'; expected adam, amsgrad, sgd, momentum or nesterov");
}

const void* scalar_data(const at::Tensor& t, const at::TensorOptions& math, const char* what) {
  TORCH_CHECK(t.numel() == 1 && is_math(t, math), what, " must be a one-element tensor of the parameters' math dtype and device");
  return t.data_ptr();
}

void Operands::finish() {
  for (auto& [tensor, copy] : write_back) tensor.copy_(copy);
}

Operands prepare_operands(const OpLists& l, const at::Tensor& meta, at::Tensor& ptr_mirror, at::Tensor& ptr_table,
                          int64_t num_slots, bool writes, bool capturing) {
  const int64_t n = static_cast<int64_t>(l.params.size());
  TORCH_CHECK(n > 0 && static_cast<int64_t>(l.grads.size()) == n && static_cast<int64_t>(l.steps.size()) == n,
              "params, grads and steps must be non-empty lists of one length");
  for (const auto* list : {&l.state_a, &l.state_b, &l.state_c, &l.param_rates})
    TORCH_CHECK(list->empty() || static_cast<int64_t>(list->size()) == n, "state lists must be empty or match params");
  const at::ScalarType dtype = l.params[0].scalar_type();
  const at::Device device = meta.device();
  Operands ops;
  ops.dtype = dtype_of(dtype);
  ops.math = at::TensorOptions().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat).device(device);
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.is_contiguous() && meta.numel() > n * kTensorFields &&
                  (meta.numel() - n * kTensorFields) % kChunkFields == 0,
              "meta is not a launch table for ", n, " tensors");
  ops.tables.tensors = meta.data_ptr<int64_t>();
  ops.tables.chunks = ops.tables.tensors + n * kTensorFields;
  ops.tables.num_tensors = n;
  ops.tables.num_chunks = (meta.numel() - n * kTensorFields) / kChunkFields;
  ops.tables.num_slots = num_slots;

  std::vector<int64_t> rows(n * kPtrFields, 0);
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor p = l.params[i];
    TORCH_CHECK(p.scalar_type() == dtype && p.device() == device && p.numel() > 0,
                "params must be non-empty tensors of one dtype on the launch table's device");
    const at::Tensor& step = l.steps[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat && step.device() == device,
                "steps must be one-element float32 tensors on the parameters' device");
    if (!rows_in_memory_order(p)) {
      at::Tensor copy = p.contiguous();
      if (writes) ops.write_back.emplace_back(p, copy);
      else ops.keep_alive.push_back(copy);
      p = copy;
    }
    // A tensor laid out unlike p is walked through a copy in p's layout.
    auto use = [&](const at::Tensor& x, at::ScalarType want, bool written) -> int64_t {
      TORCH_CHECK(x.sizes() == p.sizes() && x.device() == device, "state and gradients must match their parameter's shape and device");
      if (same_layout(x, p) && x.scalar_type() == want) return address(x);
      at::Tensor copy = at::empty_like(p, p.options().dtype(want)).copy_(x);
      if (written) ops.write_back.emplace_back(x, copy);
      else ops.keep_alive.push_back(copy);
      return address(copy);
    };
    auto state = [&](at::TensorList list) -> int64_t {
      if (list.empty()) return 0;
      TORCH_CHECK(list[i].scalar_type() == ops.math.dtype().toScalarType(),
                  "optimizer state must be ", ops.math.dtype(), " for ", dtype, " parameters");
      return use(list[i], list[i].scalar_type(), writes);
    };
    int64_t* row = rows.data() + i * kPtrFields;
    row[kParam] = address(p);
    row[kGrad] = use(l.grads[i], dtype, false);
    row[kStateA] = state(l.state_a);
    row[kStateB] = state(l.state_b);
    row[kStateC] = state(l.state_c);
    row[kRate] = state(l.param_rates);
    row[kStep] = address(step);
  }
  refresh_pointers(rows, ptr_mirror, ptr_table, capturing);
  ops.tables.ptrs = ptr_table.data_ptr<int64_t>();
  return ops;
}

}  // namespace mlhd

// Schemas. Both ops walk the same launch table `meta` (cpp_backend.py builds it) and keep
// the pointer table in (ptr_mirror on the host, ptr_table on the device). State lists:
// state_a / state_b are Adam's exp_avg / exp_avg_sq, or SGD's momentum_buffer /
// prev_direction (empty lists where the configuration keeps none); state_c is Adam's
// max_exp_avg_sq with amsgrad (direction "amsgrad"; the reduction then takes u_prev from
// it), else empty; param_rates is empty
// without a param level. grad_factor: a one-element tensor of the math dtype on the device,
// (-1 for maximize) / GradScaler's scale; the kernels multiply every raw gradient by it as
// they read it (before coupled weight decay), and read it only on the device.
// The emulation build (MLHD_CUDA_ON_CPU: csrc/cuda_on_cpu) registers the same ops under a
// namespace of its own, so that it loads beside the real library.
#ifdef MLHD_CUDA_ON_CPU
#define MLHD_OPS multilevel_hd_cuda_on_cpu
#else
#define MLHD_OPS multilevel_hd
#endif
#define MLHD_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands MLHD_OPS before TORCH_LIBRARY pastes it

MLHD_TORCH_LIBRARY(MLHD_OPS, m) {
  // Stage 1: per-unit sums of g*u_prev (and g^2, u_prev^2 when unit_sums has 3 rows) into
  // unit_sums[:, unit]; totals = (sum alpha_param*g*u_prev, sum (alpha_param*g)^2, 0 or NaN
  // if some g is NaN/Inf).
  m.def(
      "reduce(Tensor[] params, Tensor[] grads, Tensor[] state_a, Tensor[] state_b, Tensor[] state_c, "
      "Tensor[] param_rates, Tensor[] steps, Tensor meta, Tensor(a!) ptr_mirror, Tensor(b!) ptr_table, int num_slots, str direction, "
      "bool hypergrad_sums, bool param_sums, Tensor grad_factor, float coupled_weight_decay, float beta1, "
      "float beta2, float eps, Tensor(c!) unit_sums, Tensor(d!) totals) -> ()");
  // Stage 3: the elementwise pass with the level stage's coefficients; does nothing at all
  // when gate is 0 (a skipped step).
  m.def(
      "apply(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_a, Tensor(c!)[] state_b, "
      "Tensor(h!)[] state_c, Tensor(d!)[] param_rates, Tensor(e!)[] steps, Tensor meta, Tensor(f!) ptr_mirror, "
      "Tensor(g!) ptr_table, "
      "str direction, Tensor grad_factor, float coupled_weight_decay, float decoupled_weight_decay, float beta1, "
      "float beta2, float eps, float momentum, float dampening, Tensor gate, Tensor hd_gate, Tensor kappa_units, "
      "Tensor? param_kappa, Tensor? param_hd, Tensor? param_parent, bool multiplicative, float shrinkage, "
      "float rate_min, float rate_max) -> ()");
  // Stage 2 (levels.h): the gate and t, the coarse rates and the weights from the unit sums
  // (qg, qu: multiplicative rule; param_dot, param_sq: the param level among several), the
  // group state updated in place, and coef = (gate, hd_gate, param_kappa, param_hd,
  // kappa per unit, the param level's shrinkage target per unit) for apply. Per level
  // (global, layer, unit, param): level_index its position in the weights or -1, parents
  // its shrinkage parent or -1; rates of inactive levels are None. first_unit: each layer's
  // first unit, then the number of units (layer l's units are first_unit[l] to first_unit[l + 1]).
  m.def(
      "levels(Tensor s, Tensor? qg, Tensor? qu, Tensor? param_dot, Tensor? param_sq, Tensor? finite, "
      "Tensor? found_inf, Tensor lr_scale, Tensor first_unit, Tensor unit_scale, Tensor layer_scale, "
      "Tensor unit_mask, Tensor layer_mask, Tensor(a!) step, Tensor(b!) skipped, Tensor(c!) lr_scale_state, "
      "Tensor(d!) weights, Tensor(e!)? rate_global, Tensor(f!)? rate_layer, Tensor(g!)? rate_unit, "
      "Tensor(h!) applied_scale, Tensor(i!) applied_offset, Tensor(j!) coef, int[] level_index, int[] parents, "
      "float[] beta, float[] rho, float delta, float hd_decay, float final_lr, float rate_min, float rate_max, "
      "bool multiplicative, bool sized) -> ()");
}

#ifndef MLHD_CUDA_ON_CPU
// `import multilevel_hd._C` (the setup.py build) loads this library, which registers the ops.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
