// The three ops of a fused step (schemas in ops.cpp), written once for both devices: each
// device file instantiates reduce_op / levels_op / apply_op with its Runner (the kernels)
// and registers them for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <utility>
#include <vector>

#include "common.h"
#include "levels.h"

namespace mlhd {

struct OpLists {
  at::TensorList params, grads, state_a, state_b, state_c, param_rates, steps;
};

// The tensors of one call as kernel arguments: tables with fresh pointers, and copies of
// tensors whose layout the kernels cannot walk (rare; written back by finish()).
struct Operands {
  Tables tables{};
  Dtype dtype{};
  at::TensorOptions math;  // dtype and device of state, rates and sums
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (tensor, staged copy)
  std::vector<at::Tensor> keep_alive;                         // read-only staged copies
  void finish();
};

// capturing: the device's current stream is capturing a CUDA graph (Runner::capturing).
Operands prepare_operands(const OpLists& lists, const at::Tensor& meta, at::Tensor& ptr_mirror,
                          at::Tensor& ptr_table, int64_t num_slots, bool writes, bool capturing);
Direction parse_direction(std::string_view direction);
const void* scalar_data(const at::Tensor& t, const at::TensorOptions& math, const char* what);

inline bool is_math(const at::Tensor& t, const at::TensorOptions& math) {
  return t.scalar_type() == math.dtype().toScalarType() && t.device() == math.device();
}

template <class Runner>
void reduce_op(at::TensorList params, at::TensorList grads, at::TensorList state_a, at::TensorList state_b,
               at::TensorList state_c, at::TensorList param_rates, at::TensorList steps, const at::Tensor& meta, at::Tensor& ptr_mirror,
               at::Tensor& ptr_table, int64_t num_slots, std::string_view direction, bool hypergrad_sums,
               bool param_sums, const at::Tensor& grad_factor, double coupled_weight_decay, double beta1,
               double beta2, double eps, at::Tensor& unit_sums, at::Tensor& totals) {
  Operands ops = prepare_operands({params, grads, state_a, state_b, state_c, param_rates, steps}, meta, ptr_mirror,
                                  ptr_table, num_slots, /*writes=*/false, Runner::capturing(meta.device()));
  TORCH_CHECK(unit_sums.dim() == 2 && (unit_sums.size(0) == 1 || unit_sums.size(0) == 3) &&
                  unit_sums.stride(1) == 1 && is_math(unit_sums, ops.math),
              "reduce: unit_sums must be a [1 or 3, units] tensor of the parameters' math dtype and device");
  TORCH_CHECK(totals.numel() == 3 && totals.is_contiguous() && is_math(totals, ops.math),
              "reduce: totals must be a 3-element tensor of the parameters' math dtype and device");
  ReduceArgs a{};
  a.tables = ops.tables;
  a.grad_factor = scalar_data(grad_factor, ops.math, "grad_factor");
  a.hyper.weight_decay = coupled_weight_decay;
  a.hyper.beta1 = beta1;
  a.hyper.beta2 = beta2;
  a.hyper.eps = eps;
  const Direction d = parse_direction(direction);
  a.uprev = !hypergrad_sums ? Uprev::None
            : d == Direction::Adam || d == Direction::Amsgrad ? Uprev::Adam : Uprev::Stored;
  a.param_sums = param_sums;
  a.coupled_decay = coupled_weight_decay != 0;
  a.num_sums = unit_sums.size(0);
  at::Tensor slots = at::empty({3 * num_slots}, ops.math);
  at::Tensor chunks = at::empty({a.tables.num_chunks * 3}, ops.math);
  a.slot_partials = slots.data_ptr();
  a.chunk_partials = chunks.data_ptr();
  a.unit_sums = unit_sums.data_ptr();
  a.units_stride = unit_sums.stride(0);
  a.totals = totals.data_ptr();
  Runner::reduce(a, ops.dtype, unit_sums.device());
}

template <class Runner>
void apply_op(at::TensorList params, at::TensorList grads, at::TensorList state_a, at::TensorList state_b,
              at::TensorList state_c, at::TensorList param_rates, at::TensorList steps, const at::Tensor& meta, at::Tensor& ptr_mirror,
              at::Tensor& ptr_table, std::string_view direction, const at::Tensor& grad_factor,
              double coupled_weight_decay, double decoupled_weight_decay, double beta1, double beta2, double eps,
              double momentum, double dampening, const at::Tensor& gate, const at::Tensor& hd_gate,
              const at::Tensor& kappa_units,
              const std::optional<at::Tensor>& param_kappa, const std::optional<at::Tensor>& param_hd,
              const std::optional<at::Tensor>& param_parent, bool multiplicative, double shrinkage,
              double rate_min, double rate_max) {
  Operands ops = prepare_operands({params, grads, state_a, state_b, state_c, param_rates, steps}, meta, ptr_mirror,
                                  ptr_table, /*num_slots=*/0, /*writes=*/true, Runner::capturing(meta.device()));
  ApplyArgs a{};
  a.tables = ops.tables;
  a.hyper = {coupled_weight_decay, decoupled_weight_decay, beta1, beta2, eps, momentum, dampening,
             multiplicative, shrinkage, rate_min, rate_max};
  a.grad_factor = scalar_data(grad_factor, ops.math, "grad_factor");
  a.direction = parse_direction(direction);
  TORCH_CHECK((a.direction == Direction::Amsgrad) == !state_c.empty(),
              "apply: state_c (max_exp_avg_sq) goes with direction amsgrad, and only with it");
  a.param_level = !param_rates.empty();
  a.gate = scalar_data(gate, ops.math, "gate");
  a.hd_gate = scalar_data(hd_gate, ops.math, "hd_gate");
  TORCH_CHECK(kappa_units.dim() == 1 && is_math(kappa_units, ops.math),
              "apply: kappa_units must be a 1-D tensor of the parameters' math dtype and device");
  a.kappa_units = kappa_units.data_ptr();
  a.kappa_stride = kappa_units.stride(0);
  if (a.param_level) {
    TORCH_CHECK(param_kappa && param_hd, "apply: the param level needs param_kappa and param_hd");
    a.param_kappa = scalar_data(*param_kappa, ops.math, "param_kappa");
    a.param_hd = scalar_data(*param_hd, ops.math, "param_hd");
    if (param_parent) {
      TORCH_CHECK(param_parent->dim() <= 1 && is_math(*param_parent, ops.math),
                  "apply: param_parent must be 0-d or per unit, in the parameters' math dtype and device");
      a.param_parent = param_parent->data_ptr();
      a.parent_stride = param_parent->dim() ? param_parent->stride(0) : 0;
    }
  }
  Runner::apply(a, ops.dtype, kappa_units.device());
  ops.finish();
}

// Stage 2 (levels.h): checks, scratch on the device, then the Runner's one level-stage call.
template <class Runner>
void levels_op(const at::Tensor& s, const std::optional<at::Tensor>& qg, const std::optional<at::Tensor>& qu,
               const std::optional<at::Tensor>& param_dot, const std::optional<at::Tensor>& param_sq,
               const std::optional<at::Tensor>& finite, const std::optional<at::Tensor>& found_inf,
               const at::Tensor& lr_scale, const at::Tensor& first_unit, const at::Tensor& unit_scale,
               const at::Tensor& layer_scale, const at::Tensor& unit_mask, const at::Tensor& layer_mask,
               at::Tensor& step, at::Tensor& skipped, at::Tensor& lr_scale_state, at::Tensor& weights,
               const std::optional<at::Tensor>& rate_global, const std::optional<at::Tensor>& rate_layer,
               const std::optional<at::Tensor>& rate_unit, at::Tensor& applied_scale, at::Tensor& applied_offset,
               at::Tensor& coef, at::IntArrayRef level_index, at::IntArrayRef parents, at::ArrayRef<double> beta,
               at::ArrayRef<double> rho, double delta, double hd_decay, double final_lr, double rate_min,
               double rate_max, bool multiplicative, bool sized) {
  const at::TensorOptions math = weights.options();
  TORCH_CHECK(math.dtype() == at::kFloat || math.dtype() == at::kDouble,
              "levels: the group state must be float32 or float64");
  TORCH_CHECK(level_index.size() == kNumLevels && parents.size() == kNumLevels && beta.size() == kNumLevels &&
                  rho.size() == kNumLevels,
              "levels: level_index, parents, beta and rho need one entry per level (global, layer, unit, param)");
  LevelArgs a{};
  const at::Device device = weights.device();
  TORCH_CHECK(first_unit.dim() == 1 && first_unit.numel() > 0 && first_unit.scalar_type() == at::kLong &&
                  first_unit.is_contiguous() && first_unit.device() == device,
              "levels: first_unit must be a contiguous 1-D int64 tensor of num_layers + 1 elements on the group "
              "state's device");
  a.num_layers = first_unit.numel() - 1;
  a.num_units = s.numel();
  auto array = [&](const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.numel() == n && t.is_contiguous() && is_math(t, math), "levels: ", what, " must be a contiguous ",
                math.dtype(), " tensor of ", n, " elements on the group state's device");
    return t.data_ptr();
  };
  const int64_t L = a.num_layers, U = a.num_units;
  a.first_unit = first_unit.data_ptr<int64_t>();
  if (device.is_cpu()) {  // (on a GPU this would wait for the device)
    bool ordered = a.first_unit[0] == 0 && a.first_unit[L] == U;
    for (int64_t l = 0; l < L; ++l) ordered = ordered && a.first_unit[l] <= a.first_unit[l + 1];
    TORCH_CHECK(ordered, "levels: first_unit must rise from 0 to the ", U, " unit sums");
  }
  a.s = array(s, U, "s");
  a.qg = qg ? array(*qg, U, "qg") : nullptr;
  a.qu = qu ? array(*qu, U, "qu") : nullptr;
  TORCH_CHECK(!multiplicative || (a.qg && a.qu), "levels: the multiplicative rule needs qg and qu");
  a.param_dot = param_dot ? array(*param_dot, 1, "param_dot") : nullptr;
  a.param_sq = param_sq ? array(*param_sq, 1, "param_sq") : nullptr;
  if (finite) {
    TORCH_CHECK(finite->numel() == 1 && finite->scalar_type() == at::kBool && finite->device() == device,
                "levels: finite must be a one-element bool tensor on the group state's device");
    a.finite = finite->data_ptr<bool>();
  }
  a.found_inf = found_inf ? array(*found_inf, 1, "found_inf") : nullptr;
  a.lr_scale = array(lr_scale, 1, "lr_scale");
  a.unit_scale = array(unit_scale, U, "unit_scale");
  a.layer_scale = array(layer_scale, L, "layer_scale");
  a.unit_mask = array(unit_mask, U, "unit_mask");
  a.layer_mask = array(layer_mask, L, "layer_mask");
  a.step = array(step, 1, "step");
  TORCH_CHECK(skipped.numel() == 1 && skipped.scalar_type() == at::kLong && skipped.device() == device,
              "levels: skipped must be a one-element int64 tensor on the group state's device");
  a.skipped = skipped.data_ptr<int64_t>();
  a.lr_scale_state = array(lr_scale_state, 1, "lr_scale_state");
  a.num_levels = static_cast<int>(weights.numel());
  a.weights = array(weights, a.num_levels, "weights");
  const std::optional<at::Tensor>* rates[kCoarseLevels] = {&rate_global, &rate_layer, &rate_unit};
  const int64_t rate_sizes[kCoarseLevels] = {1, L, U};
  int count = 0;
  for (int lv = 0; lv < kNumLevels; ++lv) {
    a.index[lv] = static_cast<int>(level_index[lv]);
    a.parent[lv] = static_cast<int>(parents[lv]);
    a.beta[lv] = beta[lv];
    a.rho[lv] = rho[lv];
    TORCH_CHECK(a.index[lv] >= kNoLevel && a.index[lv] < a.num_levels && a.parent[lv] >= kNoLevel &&
                    a.parent[lv] < lv && (a.parent[lv] == kNoLevel || level_index[a.parent[lv]] >= 0),
                "levels: bad level_index or parents");
    count += a.index[lv] >= 0;
    if (lv < kCoarseLevels) {
      TORCH_CHECK(rates[lv]->has_value() == (a.index[lv] >= 0), "levels: pass the rates of the active levels only");
      a.rate[lv] = *rates[lv] ? array(**rates[lv], rate_sizes[lv], "a level's rates") : nullptr;
    }
  }
  TORCH_CHECK(count == a.num_levels, "levels: level_index names ", count, " levels, the weights ", a.num_levels);
  TORCH_CHECK(a.index[kParamLevel] < 0 || a.num_levels == 1 || (a.param_dot && (!multiplicative || a.param_sq)),
              "levels: the param level among several needs param_dot (and param_sq for the multiplicative rule)");
  a.applied_scale = array(applied_scale, L * a.num_levels, "applied_scale");
  a.applied_offset = array(applied_offset, L, "applied_offset");
  a.coef = array(coef, kCoefScalars + 2 * U, "coef");
  a.delta = delta;
  a.hd_decay = hd_decay;
  a.final_lr = final_lr;
  a.rate_min = rate_min;
  a.rate_max = rate_max;
  a.multiplicative = multiplicative;
  a.sized = sized;
  const bool float64 = math.dtype() == at::kDouble;
  const int64_t math_bytes = float64 ? 8 : 4;
  const int64_t group_bytes = (int64_t(float64 ? sizeof(GroupStep<double>) : sizeof(GroupStep<float>)) + 7) / 8 * 8;
  at::Tensor scratch = at::empty({L * kLayerSums * 8 + group_bytes + 2 * L * math_bytes}, math.dtype(at::kByte));
  a.layer_sums = reinterpret_cast<double*>(scratch.data_ptr());
  a.group_step = a.layer_sums + L * kLayerSums;
  a.old_layer = static_cast<char*>(a.group_step) + group_bytes;  // (8-byte aligned, like each part)
  a.hd_layer = static_cast<char*>(a.old_layer) + L * math_bytes;
  Runner::levels(a, float64, device);
}

}  // namespace mlhd
