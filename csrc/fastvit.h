// Shared helpers of the fastvit_kernels C++ op library (fastvit_kernels._C).
//
// Everything here is built on PyTorch's stable ABI (torch/csrc/stable, targeted at 2.10 by setup.py), so one
// build loads into every torch release that ABI covers. Kernels reach ATen through torch_call_dispatcher: an op
// is called by name with a boxed stack of StableIValues, the way the stable ops.h wrappers do it.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastvit {

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::headeronly::ScalarType;

// Calls the ATen op `name.overload` with `args` (every schema argument, defaults included, in order) and returns
// the stack, whose first `num_outputs` entries then hold the results.
template <typename... Args>
std::vector<StableIValue> call_stack(const char* name, const char* overload, size_t num_outputs,
                                     const Args&... args) {
  std::vector<StableIValue> stack{torch::stable::detail::from(args)...};
  if (stack.size() < num_outputs) stack.resize(num_outputs);
  STD_TORCH_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS,
                  "fastvit_kernels._C: the ATen call ", name, ".", overload, " failed");
  return stack;
}

// Calls an ATen op with one Tensor result.
template <typename... Args>
Tensor call(const char* name, const char* overload, const Args&... args) {
  auto stack = call_stack(name, overload, 1, args...);
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// Tensor helpers (ATen ops by name; the stable ABI has no method syntax for most of them).
// x itself when it has the dtype already (what aten::to returns then too), without the dispatcher round trip
inline Tensor to_dtype(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype ? x : torch::stable::to(x, dtype);
}
inline Tensor f32(const Tensor& x) { return to_dtype(x, ScalarType::Float); }
inline Tensor mm(const Tensor& a, const Tensor& b) { return torch::stable::matmul(a, b); }
inline Tensor t(const Tensor& a) { return call("aten::t", "", a); }
// a + b as a - (-1) b: the stable ABI's only add-like op with a Scalar alpha is subtract.Tensor
inline Tensor add(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }
inline Tensor sub(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, 1.0); }
inline Tensor mul(const Tensor& a, const Tensor& b) { return call("aten::mul", "Tensor", a, b); }
// A 0-dim tensor of x's dtype and device: the stable ABI passes no Scalar arguments, so a number meets a tensor
// through the Tensor overloads (a 0-dim operand does not change the result dtype).
inline Tensor scalar_like(const Tensor& x, double value) {
  return torch::stable::full({}, value, x.scalar_type(), std::nullopt, x.device());
}
inline Tensor mul(const Tensor& a, double s) { return mul(a, scalar_like(a, s)); }
inline Tensor add(const Tensor& a, double s) { return add(a, scalar_like(a, s)); }
inline Tensor rshape(const Tensor& a, std::vector<int64_t> shape) { return torch::stable::reshape(a, shape); }
inline Tensor contig(const Tensor& a) { return torch::stable::contiguous(a); }
inline Tensor linear(const Tensor& x, const Tensor& w, const OptTensor& b) {
  return call("aten::linear", "", x, w, b);
}
inline Tensor empty_1d(const Tensor& like, int64_t n, ScalarType dtype) {
  return torch::stable::new_empty(like, {n}, dtype);
}

// Checks every kernel makes before computing: the op name goes into the message.
inline void check_dim(const Tensor& x, int64_t dim, const char* op, const char* arg) {
  STD_TORCH_CHECK(x.dim() == dim, op, ": ", arg, " must be ", dim, "-D; got ", x.dim(), "-D");
}

}  // namespace fastvit

// ---------------------------------------------------------------------------------------------------------------
// Helpers of the modern ops' kernels (csrc/cpu/modern*.cpp): fp32 norms, concatenation, selection, index checks.
// Names avoid those of torch::stable (found by argument-dependent lookup on Tensor arguments).
// ---------------------------------------------------------------------------------------------------------------
namespace fastvit {

inline OptTensor opt_to(const OptTensor& t, ScalarType dtype) {
  return t.has_value() ? OptTensor(to_dtype(*t, dtype)) : std::nullopt;
}
inline OptTensor opt_f32(const OptTensor& t) { return opt_to(t, ScalarType::Float); }
inline Tensor concat(const std::vector<Tensor>& parts, int64_t dim) { return call("aten::cat", "", parts, dim); }
// a view of x's rows [start, start + length) along dim
inline Tensor part(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  return call("aten::narrow", "", x, dim, start, length);
}
inline Tensor permuted(const Tensor& x, std::vector<int64_t> dims) { return call("aten::permute", "", x, dims); }
// cond ? a : b, elementwise with broadcasting
inline Tensor choose(const Tensor& cond, const Tensor& a, const Tensor& b) {
  return call("aten::where", "self", cond, a, b);
}
inline Tensor sum_dims(const Tensor& x, std::vector<int64_t> dims, bool keepdim = false) {
  return call("aten::sum", "dim_IntList", x, std::optional<std::vector<int64_t>>(dims), keepdim,
              std::optional<ScalarType>());
}
inline Tensor mean_dims(const Tensor& x, std::vector<int64_t> dims, bool keepdim) {
  return call("aten::mean", "dim", x, std::optional<std::vector<int64_t>>(dims), keepdim,
              std::optional<ScalarType>());
}

// fp32 LayerNorm (or RMSNorm: zero mean, when rms) over the rows of x (M, D): (normed (M, D) fp32, mean (M,)
// fp32, rstd (M,) fp32), rstd = 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(x^2) + eps)); weight / bias (D,) or
// None, applied in fp32.
inline std::tuple<Tensor, Tensor, Tensor> norm_rows_f32(const Tensor& x, const OptTensor& weight,
                                                        const OptTensor& bias, double eps, bool rms) {
  const int64_t M = x.size(0), D = x.size(1);
  Tensor x32 = f32(x);
  OptTensor w32 = opt_f32(weight), b32 = opt_f32(bias);
  if (rms) {
    Tensor rstd = call("aten::rsqrt", "", add(mean_dims(mul(x32, x32), {-1}, false), eps));
    Tensor out = mul(x32, rshape(rstd, {M, 1}));
    if (w32.has_value()) out = mul(out, *w32);
    if (b32.has_value()) out = add(out, *b32);
    return {out, torch::stable::new_zeros(x32, {M}), rstd};
  }
  auto st = call_stack("aten::native_layer_norm", "", 3, x32, std::vector<int64_t>{D}, w32, b32, eps);
  return {torch::stable::detail::to<Tensor>(st[0]), rshape(torch::stable::detail::to<Tensor>(st[1]), {M}),
          rshape(torch::stable::detail::to<Tensor>(st[2]), {M})};
}

// The values of an int32 / int64 CPU tensor, read on the host (the CPU kernels' index arguments).
inline std::vector<int64_t> host_ints(const Tensor& t) {
  Tensor c = contig(t);
  const int64_t n = c.numel();
  std::vector<int64_t> out(static_cast<size_t>(n));
  if (c.scalar_type() == ScalarType::Int) {
    const int32_t* p = c.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  } else {
    const int64_t* p = c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = p[i];
  }
  return out;
}

inline void check_dtype(const Tensor& x, ScalarType dtype, const char* op, const char* arg, const char* want) {
  STD_TORCH_CHECK(x.scalar_type() == dtype, op, ": ", arg, " must be ", want, "; got ",
                  torch::headeronly::toString(x.scalar_type()));
}

// Checks cu_seqlens (S + 1,) int32: 0 first, non-decreasing, `total` last; returns its values.
inline std::vector<int64_t> checked_cu_seqlens(const Tensor& cu_seqlens, int64_t total, const char* op) {
  check_dim(cu_seqlens, 1, op, "cu_seqlens");
  check_dtype(cu_seqlens, ScalarType::Int, op, "cu_seqlens", "int32");
  STD_TORCH_CHECK(cu_seqlens.numel() >= 1, op, ": cu_seqlens must have S + 1 >= 1 entries; got 0");
  std::vector<int64_t> cu = host_ints(cu_seqlens);
  STD_TORCH_CHECK(cu.front() == 0 && cu.back() == total, op, ": cu_seqlens must start at 0 and end at the ",
                  "token count ", total, "; got ", cu.front(), " ... ", cu.back());
  for (size_t s = 1; s < cu.size(); ++s)
    STD_TORCH_CHECK(cu[s] >= cu[s - 1], op, ": cu_seqlens must be non-decreasing; got ", cu[s - 1], " then ",
                    cu[s], " at entry ", s);
  return cu;
}

// Checks that every value of the int64 index tensor idx lies in [low, high).
inline void check_index_range(const Tensor& idx, int64_t low, int64_t high, const char* op, const char* arg) {
  check_dtype(idx, ScalarType::Long, op, arg, "int64");
  for (int64_t v : host_ints(idx))
    STD_TORCH_CHECK(v >= low && v < high, op, ": ", arg, " values must lie in [", low, ", ", high, "); got ", v);
}

}  // namespace fastvit
