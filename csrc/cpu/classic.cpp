// CPU kernels of the classic ViT forward ops (patch embedding, norm1 + qkv, attention, proj + residual,
// norm2 + GELU MLP + residual, and the whole attention half), computing the eager reference math with ATen ops
// (fastvit_kernels/reference.py is the spec: timm's PatchEmbed / LayerNorm / Attention / Mlp semantics). They
// return the same auxiliary outputs as the Triton ops (fp32 row statistics, the attention log-sum-exp in log2
// units, the fc1 pre-activation), so a graph exported with the fused ops runs on a CPU process with only this
// library loaded. Statistics, softmax and accumulation are fp32; outputs are cast back to the input's dtype.
#include "../fastvit.h"

#include <cmath>

namespace fastvit {
namespace {

constexpr double kLog2e = 1.4426950408889634;


Tensor mean_last(const Tensor& x, bool keepdim) {
  return call("aten::mean", "dim", x, std::optional<std::vector<int64_t>>(std::vector<int64_t>{-1}), keepdim,
              std::optional<ScalarType>());
}

// (normed (M, D) in x's dtype, mean (M,) fp32, rstd (M,) fp32): LayerNorm, or RMSNorm (mean 0) when rms.
std::tuple<Tensor, Tensor, Tensor> norm_rows(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                             double eps, bool rms) {
  const int64_t M = x.size(0);
  Tensor x32 = f32(x);
  OptTensor b32 = bias.has_value() ? OptTensor(f32(*bias)) : std::nullopt;
  Tensor w32 = f32(weight);
  Tensor out32, mean, rstd;
  if (rms) {
    Tensor ms = mean_last(mul(x32, x32), false);
    rstd = call("aten::rsqrt", "", add(ms, eps));
    mean = torch::stable::new_zeros(x32, {M});
    out32 = mul(mul(x32, rshape(rstd, {M, 1})), w32);
    if (b32.has_value()) out32 = add(out32, *b32);
  } else {
    auto st = call_stack("aten::native_layer_norm", "", 3, x32, std::vector<int64_t>{x.size(1)}, OptTensor(w32),
                         b32, eps);
    out32 = torch::stable::detail::to<Tensor>(st[0]);
    mean = rshape(torch::stable::detail::to<Tensor>(st[1]), {M});
    rstd = rshape(torch::stable::detail::to<Tensor>(st[2]), {M});
  }
  return {to_dtype(out32, x.scalar_type()), mean, rstd};
}

// out (B, N, D), lse (B, H, N) fp32 in log2 units, from packed qkv (B, N, 3 * D).
std::tuple<Tensor, Tensor> attention_core(const Tensor& qkv, int64_t H, double scale) {
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, hd = D / H;
  Tensor q5 = call("aten::permute", "", rshape(f32(qkv), {B, N, 3, H, hd}), std::vector<int64_t>{2, 0, 3, 1, 4});
  Tensor q = torch::stable::select(q5, 0, 0), k = torch::stable::select(q5, 0, 1), v = torch::stable::select(q5, 0, 2);
  Tensor s = mul(mm(q, torch::stable::transpose(k, -2, -1)), scale);  // (B, H, N, N)
  Tensor lse = mul(call("aten::logsumexp", "", s, std::vector<int64_t>{-1}, false), kLog2e);
  Tensor p = call("aten::_softmax", "", s, int64_t{-1}, false);
  Tensor o = call("aten::permute", "", mm(p, v), std::vector<int64_t>{0, 2, 1, 3});  // (B, N, H, hd)
  return {to_dtype(rshape(contig(o), {B, N, D}), qkv.scalar_type()), lse};
}

void check_qkv(const Tensor& qkv, int64_t H, const char* op) {
  check_dim(qkv, 3, op, "qkv");
  STD_TORCH_CHECK(H > 0 && qkv.size(2) % (3 * H) == 0, op, ": qkv's last dim must be 3 * num_heads * head_dim ",
                  "(num_heads=", H, "); got ", qkv.size(2));
}

// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> attention_fwd(Tensor qkv, int64_t num_heads, double scale) {
  check_qkv(qkv, num_heads, "fastvit::attention_fwd");
  return attention_core(qkv, num_heads, scale);
}

std::tuple<Tensor, Tensor, Tensor> layernorm_linear_fwd(Tensor x, Tensor norm_weight, OptTensor norm_bias,
                                                        Tensor weight, OptTensor bias, double eps, bool rms) {
  check_dim(x, 2, "fastvit::layernorm_linear_fwd", "x");
  auto [normed, mean, rstd] = norm_rows(x, norm_weight, norm_bias, eps, rms);
  Tensor out = linear(normed, to_dtype(weight, x.scalar_type()), opt_to(bias, x.scalar_type()));
  return {out, mean, rstd};
}

Tensor linear_residual_fwd(Tensor x, Tensor weight, OptTensor bias, Tensor residual) {
  check_dim(x, 2, "fastvit::linear_residual_fwd", "x");
  Tensor y = linear(x, to_dtype(weight, x.scalar_type()), opt_to(bias, x.scalar_type()));
  return add(y, to_dtype(residual, x.scalar_type()));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layernorm_mlp_fwd(Tensor x, Tensor norm_weight, OptTensor norm_bias,
                                                             Tensor fc1_weight, OptTensor fc1_bias,
                                                             Tensor fc2_weight, OptTensor fc2_bias, double eps,
                                                             bool add_residual, bool recompute,
                                                             std::string approximate, bool rms) {
  check_dim(x, 2, "fastvit::layernorm_mlp_fwd", "x");
  STD_TORCH_CHECK(approximate == "none" || approximate == "tanh",
                  "fastvit::layernorm_mlp_fwd: approximate must be 'none' or 'tanh'; got '", approximate, "'");
  const ScalarType dt = x.scalar_type();
  auto [normed, mean, rstd] = norm_rows(x, norm_weight, norm_bias, eps, rms);
  Tensor pre = linear(normed, to_dtype(fc1_weight, dt), opt_to(fc1_bias, dt));
  Tensor act = call("aten::gelu", "", pre, approximate);
  Tensor out = linear(act, to_dtype(fc2_weight, dt), opt_to(fc2_bias, dt));
  if (add_residual) out = add(out, x);
  Tensor preact = recompute ? torch::stable::new_empty(x, {0, fc1_weight.size(0)}) : pre;
  return {out, preact, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_block_fwd(
    Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor qkv_weight, OptTensor qkv_bias, Tensor proj_weight,
    OptTensor proj_bias, int64_t num_heads, double scale, double eps) {
  check_dim(x, 3, "fastvit::attention_block_fwd", "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const ScalarType dt = x.scalar_type();
  Tensor x2d = rshape(x, {B * N, D});
  auto [normed, mean, rstd] = norm_rows(x2d, norm_weight, OptTensor(norm_bias), eps, false);
  Tensor qkv = rshape(linear(normed, to_dtype(qkv_weight, dt), opt_to(qkv_bias, dt)), {B, N, 3 * D});
  check_qkv(qkv, num_heads, "fastvit::attention_block_fwd");
  auto [o, lse] = attention_core(qkv, num_heads, scale);
  Tensor out = add(linear(o, to_dtype(proj_weight, dt), opt_to(proj_bias, dt)), x);
  return {out, qkv, o, lse, mean, rstd};
}

Tensor patch_embed_fwd(Tensor images, Tensor weight, OptTensor bias, Tensor pos_embed, OptTensor cls_token,
                       OptTensor reg_token, OptTensor norm, bool no_embed_class) {
  check_dim(images, 4, "fastvit::patch_embed_fwd", "images");
  check_dim(weight, 4, "fastvit::patch_embed_fwd", "weight");
  const int64_t B = images.size(0), C = images.size(1), D = weight.size(0), P = weight.size(3);
  const ScalarType dt = weight.scalar_type();
  Tensor x = f32(images);
  if (norm.has_value()) {  // rows (scale, shift): x * scale + shift, 1 / 255 folded into scale for uint8 pixels
    Tensor nrm = f32(*norm);
    x = add(mul(x, rshape(torch::stable::select(nrm, 0, 0), {1, C, 1, 1})),
            rshape(torch::stable::select(nrm, 0, 1), {1, C, 1, 1}));
  } else if (images.scalar_type() == ScalarType::Byte) {
    x = mul(x, 1.0 / 255.0);
  }
  x = to_dtype(x, dt);
  const int64_t Hh = images.size(2), Ww = images.size(3);
  const int64_t pad_h = (P - Hh % P) % P, pad_w = (P - Ww % P) % P;
  if (pad_h || pad_w) x = torch::stable::pad(x, {0, pad_w, 0, pad_h}, "constant", 0.0);
  Tensor y = call("aten::conv2d", "", x, weight, opt_to(bias, dt), std::vector<int64_t>{P, P},
                  std::vector<int64_t>{0, 0}, std::vector<int64_t>{1, 1}, int64_t{1});
  y = torch::stable::transpose(torch::stable::flatten(y, 2, -1), 1, 2);  // (B, N, D)
  std::vector<Tensor> prefix;
  if (cls_token.has_value())
    prefix.push_back(call("aten::expand", "", to_dtype(*cls_token, dt), std::vector<int64_t>{B, -1, -1}, false));
  if (reg_token.has_value())
    prefix.push_back(call("aten::expand", "", to_dtype(*reg_token, dt), std::vector<int64_t>{B, -1, -1}, false));
  Tensor pos = to_dtype(pos_embed, dt);
  if (no_embed_class) y = add(y, pos);
  if (!prefix.empty()) {
    prefix.push_back(y);
    y = call("aten::cat", "", prefix, int64_t{1});
  }
  if (!no_embed_class) y = add(y, pos);
  (void)D;
  return contig(y);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("attention_fwd", TORCH_BOX(&attention_fwd));
  m.impl("attention_block_fwd", TORCH_BOX(&attention_block_fwd));
  m.impl("layernorm_linear_fwd", TORCH_BOX(&layernorm_linear_fwd));
  m.impl("layernorm_mlp_fwd", TORCH_BOX(&layernorm_mlp_fwd));
  m.impl("linear_residual_fwd", TORCH_BOX(&linear_residual_fwd));
  m.impl("patch_embed_fwd", TORCH_BOX(&patch_embed_fwd));
}

}  // namespace fastvit
