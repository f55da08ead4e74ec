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
inline Tensor to_dtype(const Tensor& x, ScalarType dtype) { return torch::stable::to(x, dtype); }
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
