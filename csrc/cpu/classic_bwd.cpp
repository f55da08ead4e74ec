// CPU kernels of the classic ViT backward ops (patch embedding, norm1 + qkv, attention, proj + residual,
// norm2 + GELU MLP + residual, and the whole attention half), so a CPU process with only this library loaded can
// train through the fused ops' schemas. Each returns what the Triton op returns (fastvit_kernels/ops/*.py and the
// register_fake functions there are the spec): the same tuple, shapes and dtypes, (0,)-shaped bias gradients
// where the op has no bias, empty image / weight gradients where they are not asked for. The math is the
// textbook backward of the eager reference (fastvit_kernels/reference.py), from the tensors the forward saved:
// LayerNorm / RMSNorm from the fp32 row statistics (rstd = 1 / sqrt(var + eps); Ba et al. 2016, Zhang & Sennrich
// 2019), attention from the log-sum-exp in log2 units with delta = rowsum(dO * O) (FlashAttention-2's backward,
// Dao 2023), GELU through aten::gelu_backward (Hendrycks & Gimpel 2016). Everything is computed in fp32 (inputs
// upcast, fp32 GEMMs and reductions) and cast once to the output's dtype.
#include "../fastvit.h"

#include <cmath>

namespace fastvit {
namespace {

constexpr double kLn2 = 0.6931471805599453;

using IntList = std::optional<std::vector<int64_t>>;

// Sums over `dims` (fp32 in, fp32 out). Not named `sum`: torch::stable::sum would be found by ADL.
Tensor sum_dims(const Tensor& x, std::vector<int64_t> dims, bool keepdim) {
  return call("aten::sum", "dim_IntList", x, IntList(std::move(dims)), keepdim, std::optional<ScalarType>());
}

Tensor mean_last_keep(const Tensor& x) {
  return call("aten::mean", "dim", x, IntList(std::vector<int64_t>{-1}), true, std::optional<ScalarType>());
}

Tensor exp_t(const Tensor& x) { return call("aten::exp", "", x); }

Tensor permute_t(const Tensor& x, std::vector<int64_t> dims) { return call("aten::permute", "", x, dims); }

// Rows [start, start + length) of dim `dim` (a view).
Tensor slice_t(const Tensor& x, int64_t dim, int64_t start, int64_t length) {
  Tensor v = x;
  return torch::stable::narrow(v, dim, start, length);
}

// The (0,) tensor the ops return for a gradient that is not computed (their fakes' `new_empty(0)`).
Tensor empty0(const Tensor& like) { return torch::stable::new_empty(like, {0}); }

void check_shape(const Tensor& x, const std::vector<int64_t>& shape, const char* op, const char* arg) {
  bool ok = x.dim() == static_cast<int64_t>(shape.size());
  for (int64_t i = 0; ok && i < x.dim(); ++i) ok = x.size(i) == shape[i];
  if (ok) return;
  std::string want = "(", got = "(";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  for (int64_t i = 0; i < x.dim(); ++i) got += (i ? ", " : "") + std::to_string(x.size(i));
  STD_TORCH_CHECK(false, op, ": ", arg, " must have shape ", want, ")", "; got ", got, ")");
}

// xhat (M, D) fp32 of LayerNorm (x - mean) * rstd, or of RMSNorm x * rstd, from the saved (M,) fp32 statistics.
Tensor xhat_rows(const Tensor& x32, const Tensor& mean, const Tensor& rstd, bool rms) {
  const int64_t M = x32.size(0);
  Tensor r = rshape(f32(rstd), {M, 1});
  return rms ? mul(x32, r) : mul(sub(x32, rshape(f32(mean), {M, 1})), r);
}

// The norm's output xhat * gamma (+ beta), fp32.
Tensor normed_rows(const Tensor& xhat, const Tensor& gamma, const OptTensor& beta) {
  Tensor y = mul(xhat, f32(gamma));
  return beta.has_value() ? add(y, f32(*beta)) : y;
}

// LayerNorm / RMSNorm backward from dy = d norm(x) (M, D) fp32: (dx, dgamma, dbeta) fp32 with
// g = dy * gamma, dx = rstd * (g - xhat mean(g xhat) - mean(g)) (RMSNorm: no mean(g) term), dgamma = sum_m dy xhat,
// dbeta = sum_m dy (the gradient of a norm bias, computed also without one, as the Triton op).
std::tuple<Tensor, Tensor, Tensor> norm_rows_bwd(const Tensor& xhat, const Tensor& dy, const Tensor& gamma,
                                                 const Tensor& rstd, bool rms) {
  const int64_t M = xhat.size(0);
  Tensor g = mul(dy, f32(gamma));
  Tensor inner = sub(g, mul(xhat, mean_last_keep(mul(g, xhat))));
  if (!rms) inner = sub(inner, mean_last_keep(g));
  Tensor dx = mul(inner, rshape(f32(rstd), {M, 1}));
  return {dx, sum_dims(mul(dy, xhat), {0}, false), sum_dims(dy, {0}, false)};
}

void check_norm_inputs(const Tensor& x, const Tensor& mean, const Tensor& rstd, const Tensor& norm_weight,
                       const OptTensor& norm_bias, const char* op) {
  const int64_t M = x.size(0), D = x.size(1);
  check_shape(mean, {M}, op, "mean");
  check_shape(rstd, {M}, op, "rstd");
  check_shape(norm_weight, {D}, op, "norm_weight");
  if (norm_bias.has_value()) check_shape(*norm_bias, {D}, op, "norm_bias");
}

// Gradients of Linear: (dx = dy @ W, dW = dy^T @ x, db = sum_m dy), all fp32 from fp32 (M, N) dy and (M, K) x.
std::tuple<Tensor, Tensor, Tensor> linear_rows_bwd(const Tensor& dy, const Tensor& x32, const Tensor& w32) {
  return {mm(dy, w32), mm(t(dy), x32), sum_dims(dy, {0}, false)};
}

// Attention backward, fp32: d(qkv) (B, N, 3 * D) from do, o (B, N, D), packed qkv and lse (B, H, N) in log2
// units. P = exp(scale q k^T - lse ln 2) is the forward's softmax; delta = rowsum(dO * O) = rowsum(P * dP).
Tensor attention_core_bwd(const Tensor& do32, const Tensor& qkv32, const Tensor& o32, const Tensor& lse,
                          int64_t H, double scale) {
  const int64_t B = qkv32.size(0), N = qkv32.size(1), D = qkv32.size(2) / 3, hd = D / H;
  Tensor q5 = permute_t(rshape(qkv32, {B, N, 3, H, hd}), {2, 0, 3, 1, 4});  // (3, B, H, N, hd)
  Tensor q = torch::stable::select(q5, 0, 0), k = torch::stable::select(q5, 0, 1),
         v = torch::stable::select(q5, 0, 2);
  Tensor dO = permute_t(rshape(do32, {B, N, H, hd}), {0, 2, 1, 3});  // (B, H, N, hd)
  Tensor O = permute_t(rshape(o32, {B, N, H, hd}), {0, 2, 1, 3});
  Tensor s = mul(mm(q, torch::stable::transpose(k, -2, -1)), scale);  // (B, H, N, N)
  Tensor p = exp_t(sub(s, rshape(mul(f32(lse), kLn2), {B, H, N, 1})));
  Tensor dv = mm(torch::stable::transpose(p, -2, -1), dO);
  Tensor dp = mm(dO, torch::stable::transpose(v, -2, -1));
  Tensor delta = sum_dims(mul(dO, O), {-1}, true);
  Tensor ds = mul(mul(p, sub(dp, delta)), scale);
  Tensor dq = mm(ds, k), dk = mm(torch::stable::transpose(ds, -2, -1), q);
  Tensor d5 = call("aten::stack", "", std::vector<Tensor>{dq, dk, dv}, int64_t{0});  // (3, B, H, N, hd)
  return rshape(contig(permute_t(d5, {1, 3, 0, 2, 4})), {B, N, 3 * D});
}

void check_attention_inputs(const Tensor& dout, const Tensor& qkv, const Tensor& out, const Tensor& lse, int64_t H,
                            const char* op) {
  check_dim(qkv, 3, op, "qkv");
  STD_TORCH_CHECK(H > 0 && qkv.size(2) % (3 * H) == 0, op, ": qkv's last dim must be 3 * num_heads * head_dim ",
                  "(num_heads=", H, "); got ", qkv.size(2));
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3;
  check_shape(dout, {B, N, D}, op, "dout");
  check_shape(out, {B, N, D}, op, "out");
  check_shape(lse, {B, H, N}, op, "lse");
  STD_TORCH_CHECK(lse.scalar_type() == ScalarType::Float, op, ": lse must be float32 (the forward's log2-sum-exp2)");
}

// ---------------------------------------------------------------------------------------------------------------
// (dx, dW, db): dx like x, dW and db (N_out,) in weight's dtype, db (0,) without a bias.
std::tuple<Tensor, Tensor, Tensor> linear_residual_bwd(Tensor dout, Tensor x, Tensor weight, bool has_bias) {
  const char* op = "fastvit::linear_residual_bwd";
  check_dim(x, 2, op, "x");
  check_dim(weight, 2, op, "weight");
  check_shape(weight, {weight.size(0), x.size(1)}, op, "weight");
  check_shape(dout, {x.size(0), weight.size(0)}, op, "dout");
  auto [dx, dw, db] = linear_rows_bwd(f32(dout), f32(x), f32(weight));
  const ScalarType wdt = weight.scalar_type();
  return {to_dtype(dx, x.scalar_type()), to_dtype(dw, wdt), has_bias ? to_dtype(db, wdt) : empty0(weight)};
}

// Shared by layernorm_linear_bwd and attention_block_bwd: (dx, dgamma, dbeta, dW, db) fp32 from dout32 (M, N_out);
// dres (M, D) is the gradient reaching x by another path (the residual), added to dx.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> norm_linear_bwd_f32(const Tensor& dout32, const Tensor& x,
                                                                       const Tensor& mean, const Tensor& rstd,
                                                                       const Tensor& norm_weight,
                                                                       const OptTensor& norm_bias,
                                                                       const Tensor& weight, bool rms,
                                                                       const OptTensor& dres) {
  Tensor xhat = xhat_rows(f32(x), mean, rstd, rms);
  auto [dln, dw, db] = linear_rows_bwd(dout32, normed_rows(xhat, norm_weight, norm_bias), f32(weight));
  auto [dx, dgamma, dbeta] = norm_rows_bwd(xhat, dln, norm_weight, rstd, rms);
  if (dres.has_value()) dx = add(dx, *dres);
  return {dx, dgamma, dbeta, dw, db};
}

// (dx like x, dgamma and dbeta in norm_weight's dtype, dW (N_out, D) and db in weight's dtype, db (0,) without
// a bias); `rms`: the norm is RMSNorm (mean unused).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_linear_bwd(Tensor dout, Tensor x, Tensor mean,
                                                                        Tensor rstd, Tensor norm_weight,
                                                                        OptTensor norm_bias, Tensor weight,
                                                                        bool has_bias, bool rms) {
  const char* op = "fastvit::layernorm_linear_bwd";
  check_dim(x, 2, op, "x");
  check_dim(weight, 2, op, "weight");
  check_shape(weight, {weight.size(0), x.size(1)}, op, "weight");
  check_shape(dout, {x.size(0), weight.size(0)}, op, "dout");
  check_norm_inputs(x, mean, rstd, norm_weight, norm_bias, op);
  auto [dx, dgamma, dbeta, dw, db] =
      norm_linear_bwd_f32(f32(dout), x, mean, rstd, norm_weight, norm_bias, weight, rms, std::nullopt);
  const ScalarType ndt = norm_weight.scalar_type(), wdt = weight.scalar_type();
  return {to_dtype(dx, x.scalar_type()), to_dtype(dgamma, ndt), to_dtype(dbeta, ndt), to_dtype(dw, wdt),
          has_bias ? to_dtype(db, wdt) : empty0(weight)};
}

// d(qkv) (B, N, 3 * D) contiguous in qkv's dtype, packed like qkv (dq | dk | dv).
Tensor attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int64_t num_heads, double scale) {
  check_attention_inputs(dout, qkv, out, lse, num_heads, "fastvit::attention_bwd");
  return to_dtype(attention_core_bwd(f32(dout), f32(qkv), f32(out), lse, num_heads, scale), qkv.scalar_type());
}

// (dx like x, dgamma, dbeta in norm_weight's dtype, dW1, db1 (D_hidden,), dW2, db2 (D,) in the fc weights' dtype).
// `recompute`: preact is the empty (0, D_hidden) the forward returned, and fc1's pre-activation is recomputed
// from x and the statistics (rounded to x's dtype, as the forward's stored one); otherwise preact (M, D_hidden).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_mlp_bwd(
    Tensor dout, Tensor x, Tensor preact, Tensor mean, Tensor rstd, Tensor norm_weight, OptTensor norm_bias,
    Tensor fc1_weight, OptTensor fc1_bias, Tensor fc2_weight, bool add_residual, bool recompute,
    std::string approximate, bool rms) {
  const char* op = "fastvit::layernorm_mlp_bwd";
  STD_TORCH_CHECK(approximate == "none" || approximate == "tanh", op,
                  ": approximate must be 'none' or 'tanh'; got '", approximate, "'");
  check_dim(x, 2, op, "x");
  const int64_t M = x.size(0), D = x.size(1);
  check_dim(fc1_weight, 2, op, "fc1_weight");
  const int64_t Dh = fc1_weight.size(0);
  check_shape(fc1_weight, {Dh, D}, op, "fc1_weight");
  check_shape(fc2_weight, {D, Dh}, op, "fc2_weight");
  if (fc1_bias.has_value()) check_shape(*fc1_bias, {Dh}, op, "fc1_bias");
  check_shape(dout, {M, D}, op, "dout");
  check_shape(preact, {recompute ? 0 : M, Dh}, op, recompute ? "preact (recompute=True)" : "preact");
  check_norm_inputs(x, mean, rstd, norm_weight, norm_bias, op);
  const ScalarType dt = x.scalar_type(), wdt = fc1_weight.scalar_type();

  Tensor xhat = xhat_rows(f32(x), mean, rstd, rms);
  Tensor normed = normed_rows(xhat, norm_weight, norm_bias);
  Tensor w1 = f32(fc1_weight);
  Tensor pre = recompute ? f32(to_dtype(linear(normed, w1, fc1_bias.has_value() ? OptTensor(f32(*fc1_bias))
                                                                                  : std::nullopt),
                                        dt))
                         : f32(preact);
  Tensor act = call("aten::gelu", "", pre, approximate);
  Tensor dout32 = f32(dout);
  auto [dact, dw2, db2] = linear_rows_bwd(dout32, act, f32(fc2_weight));
  Tensor dh = call("aten::gelu_backward", "", dact, pre, approximate);
  auto [dln, dw1, db1] = linear_rows_bwd(dh, normed, w1);
  auto [dx, dgamma, dbeta] = norm_rows_bwd(xhat, dln, norm_weight, rstd, rms);
  if (add_residual) dx = add(dx, dout32);
  const ScalarType ndt = norm_weight.scalar_type(), w2dt = fc2_weight.scalar_type();
  return {to_dtype(dx, dt),       to_dtype(dgamma, ndt), to_dtype(dbeta, ndt), to_dtype(dw1, wdt),
          to_dtype(db1, wdt),     to_dtype(dw2, w2dt),   to_dtype(db2, w2dt)};
}

// (dx like x (B, N, D), dgamma, dbeta, dW_qkv, db_qkv (3 * D,) or (0,), dW_proj, db_proj (D,) or (0,)): the
// backward of x + proj(attention(LayerNorm(x) @ W_qkv^T + b_qkv)) from the forward's qkv, o, lse and statistics.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_block_bwd(
    Tensor dout, Tensor x, Tensor qkv, Tensor o, Tensor lse, Tensor mean, Tensor rstd, Tensor norm_weight,
    Tensor norm_bias, Tensor qkv_weight, Tensor proj_weight, bool has_qkv_bias, bool has_proj_bias,
    int64_t num_heads, double scale) {
  const char* op = "fastvit::attention_block_bwd";
  check_dim(x, 3, op, "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), M = B * N;
  check_shape(qkv, {B, N, 3 * D}, op, "qkv");
  check_attention_inputs(dout, qkv, o, lse, num_heads, op);
  check_shape(qkv_weight, {3 * D, D}, op, "qkv_weight");
  check_shape(proj_weight, {D, D}, op, "proj_weight");
  Tensor x2d = rshape(x, {M, D});
  check_norm_inputs(x2d, mean, rstd, norm_weight, OptTensor(norm_bias), op);

  Tensor dout32 = rshape(f32(dout), {M, D});
  auto [do32, dw_proj, db_proj] = linear_rows_bwd(dout32, rshape(f32(o), {M, D}), f32(proj_weight));
  Tensor dqkv = attention_core_bwd(rshape(do32, {B, N, D}), f32(qkv), f32(o), lse, num_heads, scale);
  auto [dx, dgamma, dbeta, dw_qkv, db_qkv] =
      norm_linear_bwd_f32(rshape(dqkv, {M, 3 * D}), x2d, mean, rstd, norm_weight, OptTensor(norm_bias), qkv_weight,
                          false, OptTensor(dout32));
  const ScalarType ndt = norm_weight.scalar_type(), qdt = qkv_weight.scalar_type(), pdt = proj_weight.scalar_type();
  return {to_dtype(rshape(dx, {B, N, D}), x.scalar_type()),
          to_dtype(dgamma, ndt),
          to_dtype(dbeta, norm_bias.scalar_type()),
          to_dtype(dw_qkv, qdt),
          has_qkv_bias ? to_dtype(db_qkv, qdt) : empty0(qkv_weight),
          to_dtype(dw_proj, pdt),
          has_proj_bias ? to_dtype(db_proj, pdt) : empty0(proj_weight)};
}

// (dimages like images or (0,), dweight (D, C, P, P) contiguous or (0,), dbias (D,), dpos_embed (1, rows, D) with
// rows = prefix + N, or N with no_embed_class, dcls (1, 1, D) or (0,), dreg (1, num_reg, D) or (0,)); all in
// weight's dtype but dimages. The patch matrix is re-gathered from the images as the forward makes it
// (normalised in fp32, rounded to weight's dtype, zero-padded to whole patches); the image gradient is the
// patches' gradient scattered back, times the normalisation's per-channel scale, the padding dropped.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_bwd(
    Tensor dout, Tensor images, Tensor weight, OptTensor norm, int64_t num_cls, int64_t num_reg,
    bool no_embed_class, bool needs_weight_grad, bool needs_images_grad) {
  const char* op = "fastvit::patch_embed_bwd";
  check_dim(images, 4, op, "images");
  check_dim(weight, 4, op, "weight");
  const int64_t B = images.size(0), C = images.size(1), Hh = images.size(2), Ww = images.size(3);
  const int64_t D = weight.size(0), P = weight.size(3);
  check_shape(weight, {D, C, P, P}, op, "weight");
  STD_TORCH_CHECK(num_cls == 0 || num_cls == 1, op, ": num_cls must be 0 or 1; got ", num_cls);
  STD_TORCH_CHECK(num_reg >= 0, op, ": num_reg must be >= 0; got ", num_reg);
  const int64_t gh = (Hh + P - 1) / P, gw = (Ww + P - 1) / P, Np = gh * gw, prefix = num_cls + num_reg;
  check_shape(dout, {B, prefix + Np, D}, op, "dout");
  if (norm.has_value()) check_shape(*norm, {2, C}, op, "norm");
  STD_TORCH_CHECK(!needs_images_grad || images.scalar_type() != ScalarType::Byte, op,
                  ": needs_images_grad=True needs float images; got uint8");
  const ScalarType wdt = weight.scalar_type();

  Tensor rows_sum = sum_dims(f32(dout), {0}, false);  // (prefix + Np, D)
  const int64_t pos_from = no_embed_class ? prefix : 0;
  Tensor dpos = to_dtype(rshape(slice_t(rows_sum, 0, pos_from, prefix + Np - pos_from), {1, prefix + Np - pos_from, D}),
                         wdt);
  Tensor dbias = to_dtype(sum_dims(slice_t(rows_sum, 0, prefix, Np), {0}, false), wdt);
  Tensor dcls = num_cls ? to_dtype(rshape(slice_t(rows_sum, 0, 0, 1), {1, 1, D}), wdt) : empty0(dout);
  Tensor dreg =
      num_reg ? to_dtype(rshape(slice_t(rows_sum, 0, num_cls, num_reg), {1, num_reg, D}), wdt) : empty0(dout);

  // the patch tokens' gradient as (B * Np, D), token order row-major over the (gh, gw) grid
  Tensor dpatch = rshape(slice_t(f32(dout), 1, prefix, Np), {B * Np, D});
  const int64_t K = C * P * P;
  Tensor dweight = empty0(dout);
  if (needs_weight_grad) {
    Tensor xi = f32(images);
    if (norm.has_value()) {  // rows (scale, shift): x * scale + shift
      Tensor nrm = f32(*norm);
      xi = add(mul(xi, rshape(torch::stable::select(nrm, 0, 0), {1, C, 1, 1})),
               rshape(torch::stable::select(nrm, 0, 1), {1, C, 1, 1}));
    } else if (images.scalar_type() == ScalarType::Byte) {
      xi = mul(xi, 1.0 / 255.0);
    }
    xi = f32(to_dtype(xi, wdt));
    if (gh * P != Hh || gw * P != Ww) xi = torch::stable::pad(xi, {0, gw * P - Ww, 0, gh * P - Hh}, "constant", 0.0);
    // (B, C, gh, P, gw, P) -> (B, gh, gw, C, P, P): one row per patch, features (channel, pixel row, pixel col)
    Tensor patches = rshape(permute_t(rshape(xi, {B, C, gh, P, gw, P}), {0, 2, 4, 1, 3, 5}), {B * Np, K});
    dweight = to_dtype(rshape(mm(t(dpatch), patches), {D, C, P, P}), wdt);
  }
  Tensor dimages = empty0(dout);
  if (needs_images_grad) {
    Tensor dp = mm(dpatch, rshape(f32(weight), {D, K}));  // (B * Np, K)
    Tensor dx = rshape(permute_t(rshape(dp, {B, gh, gw, C, P, P}), {0, 3, 1, 4, 2, 5}), {B, C, gh * P, gw * P});
    dx = slice_t(slice_t(dx, 2, 0, Hh), 3, 0, Ww);
    if (norm.has_value()) dx = mul(dx, rshape(torch::stable::select(f32(*norm), 0, 0), {1, C, 1, 1}));
    dimages = torch::stable::empty_like(images);  // images' dtype and memory format, as the op's fake
    torch::stable::copy_(dimages, dx);
  }
  return {dimages, dweight, dbias, dpos, dcls, dreg};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("attention_bwd", TORCH_BOX(&attention_bwd));
  m.impl("attention_block_bwd", TORCH_BOX(&attention_block_bwd));
  m.impl("layernorm_linear_bwd", TORCH_BOX(&layernorm_linear_bwd));
  m.impl("layernorm_mlp_bwd", TORCH_BOX(&layernorm_mlp_bwd));
  m.impl("linear_residual_bwd", TORCH_BOX(&linear_residual_bwd));
  m.impl("patch_embed_bwd", TORCH_BOX(&patch_embed_bwd));
}

}  // namespace fastvit
