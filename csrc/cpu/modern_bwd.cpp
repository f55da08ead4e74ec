// CPU kernels of the backward ops of the modern forward ops in modern.cpp (SwiGLU MLP, LayerNorm + Linear + RoPE,
// varlen / key-masked attention, patch embedding of pre-patchified tokens): the exact gradients of the reference
// math, in fp32, returned in the Python ops' output conventions (the same tuple, shapes and dtypes as their fakes
// and Triton implementations, (0,) tensors for the gradients not produced).
//
// Numerics: the norm backward is the closed form from the saved fp32 row statistics
// (dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), without the mean(dxhat) term for RMSNorm); the
// attention backward recomputes the softmax of each sequence / image in fp32 (the saved out and lse are not
// needed on the CPU) and applies the softmax backward dS = P * (dP - rowsum(P * dP)); the RoPE backward rotates
// d(qkv) by -theta (the rotation's transpose); scatter-adds (patch / position-row gradients) are ATen's CPU
// scatter_add, which sums in a fixed order.
#include "modern_common.h"

#include <limits>

namespace fastvit {
namespace {
using namespace modern;

// xhat = (x - mean) * rstd (M, D) fp32 from the forward's row statistics (mean 0 for RMSNorm).
Tensor xhat_rows(const Tensor& x32, const Tensor& mean, const Tensor& rstd) {
  const int64_t M = x32.size(0);
  return mul(sub(x32, rshape(f32(mean), {M, 1})), rshape(f32(rstd), {M, 1}));
}

Tensor affine(const Tensor& xhat, const OptTensor& weight, const OptTensor& bias) {
  Tensor y = weight.has_value() ? mul(xhat, f32(*weight)) : xhat;
  return bias.has_value() ? add(y, f32(*bias)) : y;
}

// Backward of y = xhat * weight + bias over rows: (dx, dgamma, dbeta), fp32.
std::tuple<Tensor, Tensor, Tensor> norm_rows_bwd(const Tensor& dy, const Tensor& xhat, const Tensor& rstd,
                                                 const OptTensor& weight, bool rms) {
  const int64_t M = dy.size(0);
  Tensor dgamma = sum_dims(mul(dy, xhat), {0}), dbeta = sum_dims(dy, {0});
  Tensor dxhat = weight.has_value() ? mul(dy, f32(*weight)) : dy;
  Tensor inner = sub(dxhat, mul(xhat, mean_dims(mul(dxhat, xhat), {-1}, true)));
  if (!rms) inner = sub(inner, mean_dims(dxhat, {-1}, true));
  return {mul(inner, rshape(f32(rstd), {M, 1})), dgamma, dbeta};
}

void check_stats(const Tensor& mean, const Tensor& rstd, int64_t M, const char* op, const char* what) {
  STD_TORCH_CHECK(mean.dim() == 1 && mean.size(0) == M && rstd.dim() == 1 && rstd.size(0) == M, op, ": ", what,
                  " must be (M=", M, ",) row statistics; got ", mean.dim(), "-D / ", rstd.dim(), "-D of ",
                  mean.numel(), " / ", rstd.numel(), " elements");
}

// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> swiglu_mlp_bwd(
    Tensor dout, Tensor x, Tensor preact, Tensor mean, Tensor rstd, Tensor hmean, Tensor hrstd, Tensor norm_weight,
    OptTensor norm_bias, Tensor gate_weight, OptTensor up_weight, Tensor fc2_weight, OptTensor hidden_norm_weight,
    OptTensor hidden_norm_bias, bool rms, bool add_residual) {
  const char* op = "fastvit::swiglu_mlp_bwd";
  check_dim(x, 2, op, "x");
  check_dim(fc2_weight, 2, op, "fc2_weight");
  const int64_t M = x.size(0), D = x.size(1), Dh = fc2_weight.size(1);
  check_dim(dout, 2, op, "dout");
  STD_TORCH_CHECK(dout.size(0) == M && dout.size(1) == D, op, ": dout must be x's shape (", M, ", ", D, ")");
  check_dim(preact, 2, op, "preact");
  STD_TORCH_CHECK(preact.size(0) == M && preact.size(1) == 2 * Dh, op, ": preact must be (M=", M,
                  ", 2 * D_hidden=", 2 * Dh, "); got (", preact.size(0), ", ", preact.size(1), ")");
  check_stats(mean, rstd, M, op, "mean / rstd");
  if (hidden_norm_weight.has_value()) check_stats(hmean, hrstd, M, op, "hmean / hrstd");
  const ScalarType dt = x.scalar_type(), wdt = fc2_weight.scalar_type();
  Tensor g = f32(dout), pre = f32(preact);
  Tensor gate = part(pre, 1, 0, Dh), up = part(pre, 1, Dh, Dh);
  Tensor sg = silu(gate);
  Tensor hidden = f32(to_dtype(mul(sg, up), dt));  // the forward's hidden, rounded to x's dtype as it stored it
  Tensor z = hidden, hxhat;
  if (hidden_norm_weight.has_value()) {
    hxhat = xhat_rows(hidden, hmean, hrstd);
    z = affine(hxhat, hidden_norm_weight, hidden_norm_bias);
  }
  Tensor dw2 = mm(t(g), z), db2 = sum_dims(g, {0});
  Tensor dh = mm(g, f32(fc2_weight));  // d z (M, Dh)
  Tensor dhw = empty_1d(x, 0, wdt), dhb = empty_1d(x, 0, wdt);
  if (hidden_norm_weight.has_value()) {
    auto [dhid, dgw, dgb] = norm_rows_bwd(dh, hxhat, hrstd, hidden_norm_weight, false);
    dh = dhid;
    dhw = to_dtype(dgw, wdt);
    dhb = to_dtype(dgb, wdt);
  }
  Tensor dgate = call("aten::silu_backward", "", mul(dh, up), gate);
  Tensor dpre = concat({dgate, mul(dh, sg)}, 1);  // d(gate | up) (M, 2 Dh)
  Tensor w1 = up_weight.has_value() ? concat({f32(gate_weight), f32(*up_weight)}, 0) : f32(gate_weight);
  Tensor xhat = xhat_rows(f32(x), mean, rstd);
  Tensor dw1 = mm(t(dpre), affine(xhat, norm_weight, norm_bias)), db1 = sum_dims(dpre, {0});
  auto [dx, dgamma, dbeta] = norm_rows_bwd(mm(dpre, w1), xhat, rstd, norm_weight, rms);
  if (add_residual) dx = add(dx, g);
  const ScalarType ndt = norm_weight.scalar_type();
  return {to_dtype(dx, dt),    to_dtype(dgamma, ndt), to_dtype(dbeta, ndt), to_dtype(dw1, wdt), to_dtype(db1, wdt),
          to_dtype(dw2, wdt), to_dtype(db2, wdt),    dhw,                   dhb};
}

// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_linear_rope_bwd(
    Tensor dout, Tensor x, Tensor mean, Tensor rstd, Tensor norm_weight, OptTensor norm_bias, Tensor weight,
    bool has_bias, Tensor coords, Tensor freqs, int64_t num_heads, bool half, bool rms) {
  const char* op = "fastvit::layernorm_linear_rope_bwd";
  check_dim(x, 2, op, "x");
  check_rope(weight, coords, freqs, num_heads, op);
  const int64_t M = x.size(0), N_out = weight.size(0);
  check_dim(dout, 2, op, "dout");
  STD_TORCH_CHECK(dout.size(0) == M && dout.size(1) == N_out, op, ": dout must be (M=", M, ", N_out=", N_out,
                  "); got (", dout.size(0), ", ", dout.size(1), ")");
  check_stats(mean, rstd, M, op, "mean / rstd");
  // d(qkv before RoPE): the rotation's transpose, a rotation by -theta
  Tensor dq = rope_rotate(f32(dout), mul(rope_angles(coords, freqs, M), -1.0), num_heads, half);
  Tensor xhat = xhat_rows(f32(x), mean, rstd);
  Tensor dw = mm(t(dq), affine(xhat, norm_weight, norm_bias));
  const ScalarType wdt = weight.scalar_type(), ndt = norm_weight.scalar_type();
  Tensor db = has_bias ? to_dtype(sum_dims(dq, {0}), wdt) : empty_1d(x, 0, wdt);
  auto [dx, dgamma, dbeta] = norm_rows_bwd(mm(dq, f32(weight)), xhat, rstd, norm_weight, rms);
  return {to_dtype(dx, x.scalar_type()), to_dtype(dgamma, ndt), to_dtype(dbeta, ndt), to_dtype(dw, wdt), db};
}

// ---------------------------------------------------------------------------------------------------------------
// (dq, dk, dv) of softmax(q k^T * scale) v over the last two dims, keys where key_mask is False excluded (a row
// without a valid key has P = 0); do is d out in the same (..., L, head_dim) layout.
std::tuple<Tensor, Tensor, Tensor> attention_grads(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& d_o, double scale, const OptTensor& key_mask) {
  Tensor s = mul(mm(q, torch::stable::transpose(k, -2, -1)), scale);
  if (key_mask.has_value())
    s = choose(*key_mask, s, scalar_like(s, -std::numeric_limits<double>::infinity()));
  Tensor p = call("aten::_softmax", "", s, int64_t{-1}, false);
  if (key_mask.has_value())
    p = call("aten::nan_to_num", "", p, std::optional<double>(0.0), std::optional<double>(), std::optional<double>());
  Tensor dv = mm(torch::stable::transpose(p, -2, -1), d_o);
  Tensor dp = mm(d_o, torch::stable::transpose(v, -2, -1));
  Tensor ds = mul(call("aten::_softmax_backward_data", "", dp, p, int64_t{-1}, ScalarType::Float), scale);
  return {mm(ds, k), mm(torch::stable::transpose(ds, -2, -1), q), dv};
}

void check_attention_bwd(const Tensor& dout, const Tensor& qkv, int64_t H, const char* op) {
  check_heads(qkv, H, op);
  STD_TORCH_CHECK(dout.dim() == qkv.dim(), op, ": dout must be ", qkv.dim(), "-D; got ", dout.dim(), "-D");
  for (int64_t i = 0; i + 1 < qkv.dim(); ++i)
    STD_TORCH_CHECK(dout.size(i) == qkv.size(i), op, ": dout must have qkv's leading dims");
  STD_TORCH_CHECK(dout.size(dout.dim() - 1) * 3 == qkv.size(qkv.dim() - 1), op,
                  ": dout's last dim must be D = qkv's last dim / 3");
}

Tensor attention_varlen_bwd(Tensor dout, Tensor qkv, Tensor cu_seqlens, Tensor out, Tensor lse, int64_t num_heads,
                            double scale) {
  const char* op = "fastvit::attention_varlen_bwd";
  check_dim(qkv, 2, op, "qkv");
  check_attention_bwd(dout, qkv, num_heads, op);
  (void)out;
  (void)lse;
  const int64_t T = qkv.size(0), D = qkv.size(1) / 3, H = num_heads, hd = D / H;
  std::vector<int64_t> cu = checked_cu_seqlens(cu_seqlens, T, op);
  Tensor qkv32 = f32(qkv), do32 = f32(dout);
  std::vector<Tensor> parts;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t start = cu[s], L = cu[s + 1] - cu[s];
    if (L == 0) continue;
    Tensor q5 = permuted(rshape(part(qkv32, 0, start, L), {L, 3, H, hd}), {1, 2, 0, 3});  // (3, H, L, hd)
    Tensor d_o = permuted(rshape(part(do32, 0, start, L), {L, H, hd}), {1, 0, 2});       // (H, L, hd)
    auto [dq, dk, dv] = attention_grads(torch::stable::select(q5, 0, 0), torch::stable::select(q5, 0, 1),
                                        torch::stable::select(q5, 0, 2), d_o, scale, std::nullopt);
    Tensor g = call("aten::stack", "", std::vector<Tensor>{dq, dk, dv}, int64_t{0});  // (3, H, L, hd)
    parts.push_back(rshape(contig(permuted(g, {2, 0, 1, 3})), {L, 3 * D}));
  }
  if (parts.empty()) return torch::stable::new_zeros(qkv, {T, 3 * D});
  return contig(to_dtype(concat(parts, 0), qkv.scalar_type()));
}

Tensor attention_masked_bwd(Tensor dout, Tensor qkv, Tensor key_valid, Tensor out, Tensor lse, int64_t num_heads,
                            double scale) {
  const char* op = "fastvit::attention_masked_bwd";
  check_dim(qkv, 3, op, "qkv");
  check_attention_bwd(dout, qkv, num_heads, op);
  (void)out;
  (void)lse;
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, H = num_heads, hd = D / H;
  check_dim(key_valid, 2, op, "key_valid");
  check_dtype(key_valid, ScalarType::Bool, op, "key_valid", "bool");
  STD_TORCH_CHECK(key_valid.size(0) == B && key_valid.size(1) == N, op, ": key_valid must be (B, N) = (", B, ", ",
                  N, ")");
  Tensor q5 = permuted(rshape(f32(qkv), {B, N, 3, H, hd}), {2, 0, 3, 1, 4});  // (3, B, H, N, hd)
  // invalid queries' outputs are constant 0: their gradient reaches nothing
  Tensor do32 = choose(rshape(key_valid, {B, N, 1}), f32(dout), scalar_like(q5, 0.0));
  Tensor d_o = permuted(rshape(do32, {B, N, H, hd}), {0, 2, 1, 3});
  auto [dq, dk, dv] = attention_grads(torch::stable::select(q5, 0, 0), torch::stable::select(q5, 0, 1),
                                      torch::stable::select(q5, 0, 2), d_o, scale,
                                      OptTensor(rshape(key_valid, {B, 1, 1, N})));
  Tensor g = call("aten::stack", "", std::vector<Tensor>{dq, dk, dv}, int64_t{0});  // (3, B, H, N, hd)
  return contig(to_dtype(rshape(contig(permuted(g, {1, 3, 0, 2, 4})), {B, N, 3 * D}), qkv.scalar_type()));
}

// ---------------------------------------------------------------------------------------------------------------
// out = zeros(rows, width) with rows of src (M, width) added at the row indices idx (M,) int64.
Tensor scatter_rows(const Tensor& src, const Tensor& idx, int64_t rows) {
  const int64_t M = src.size(0), width = src.size(1);
  Tensor index = call("aten::expand", "", torch::stable::unsqueeze(idx, 1), std::vector<int64_t>{M, width}, false);
  return call("aten::scatter_add", "", torch::stable::new_zeros(src, {rows, width}), int64_t{0}, index, src);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_tokens_bwd(
    Tensor dout, Tensor patches, Tensor weight, int64_t pos_rows, OptTensor pos_index, OptTensor ids_keep,
    OptTensor mask, int64_t n_prefix, OptTensor cu_seqlens, std::vector<bool> needs) {
  const char* op = "fastvit::patch_embed_tokens_bwd";
  STD_TORCH_CHECK(needs.size() == 6, op, ": needs must be 6 booleans (patches, weight, bias, pos, mask_token, ",
                  "prefix); got ", needs.size());
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_pos = needs[3], need_tok = needs[4],
             need_pre = needs[5];
  STD_TORCH_CHECK(patches.dim() == 2 || patches.dim() == 3, op, ": patches must be (B, N, K) or (T, K); got ",
                  patches.dim(), "-D");
  const bool three_d = patches.dim() == 3;
  check_dim(weight, 2, op, "weight");
  const int64_t K = patches.size(patches.dim() - 1), rows_in = patches.size(patches.dim() - 2),
                D = weight.size(0);
  STD_TORCH_CHECK(weight.size(1) == K, op, ": weight must be (D, K=", K, ")");
  if (ids_keep.has_value()) {
    check_dim(*ids_keep, three_d ? 2 : 1, op, "ids_keep");
    check_index_range(*ids_keep, 0, rows_in, op, "ids_keep");
  }
  const int64_t B = three_d ? patches.size(0) : 1;
  const int64_t n_keep = ids_keep.has_value() ? ids_keep->size(three_d ? 1 : 0) : rows_in;  // per image / in all
  const int64_t M = B * n_keep;
  Tensor dy = f32(dout), kept, dpre32;
  if (three_d) {
    check_dim(dout, 3, op, "dout");
    STD_TORCH_CHECK(dout.size(0) == B && dout.size(1) == n_prefix + n_keep && dout.size(2) == D, op,
                    ": dout must be (B=", B, ", n_prefix + N_keep=", n_prefix + n_keep, ", D=", D, ")");
    kept = rshape(contig(part(dy, 1, n_prefix, n_keep)), {M, D});
    if (n_prefix) dpre32 = sum_dims(part(dy, 1, 0, n_prefix), {0});
  } else {
    std::vector<int64_t> cu{0, M};
    if (n_prefix) {
      STD_TORCH_CHECK(cu_seqlens.has_value(), op, ": n_prefix > 0 with packed (T, K) patches needs cu_seqlens");
      cu = checked_cu_seqlens(*cu_seqlens, M, op);
    }
    const int64_t S = static_cast<int64_t>(cu.size()) - 1, total = M + (n_prefix ? S * n_prefix : 0);
    check_dim(dout, 2, op, "dout");
    STD_TORCH_CHECK(dout.size(0) == total && dout.size(1) == D, op, ": dout must be (", total, ", D=", D, ")");
    if (!n_prefix) {
      kept = dy;
    } else {
      std::vector<Tensor> rows, pres;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t at = cu[s] + s * n_prefix;  // sequence s: its prefix rows, then its tokens
        pres.push_back(part(dy, 0, at, n_prefix));
        rows.push_back(part(dy, 0, at + n_prefix, cu[s + 1] - cu[s]));
      }
      kept = rows.empty() ? torch::stable::new_zeros(dy, {0, D}) : concat(rows, 0);
      dpre32 = pres.empty() ? torch::stable::new_zeros(dy, {n_prefix, D})
                            : sum_dims(call("aten::stack", "", pres, int64_t{0}), {0});
    }
  }
  Tensor flat_mask;
  if (mask.has_value()) {
    check_dtype(*mask, ScalarType::Bool, op, "mask", "bool");
    STD_TORCH_CHECK(mask->numel() == M, op, ": mask must have one entry per output token (", M, "); got ",
                    mask->numel());
    flat_mask = rshape(*mask, {M, 1});
  }
  Tensor zero = scalar_like(kept, 0.0);
  // masked tokens' embeddings were replaced by the mask token: no weight / bias / patch gradient
  Tensor gk = mask.has_value() ? choose(flat_mask, zero, kept) : kept;
  const ScalarType gdt = dout.scalar_type();
  Tensor none = empty_1d(dout, 0, gdt);
  Tensor dx = none, dw = none, db = none, dpos = none, dtok = none, dpre = none;
  if (need_w) {
    Tensor x = f32(patches);
    if (ids_keep.has_value()) x = keep_rows(x, *ids_keep, three_d);
    dw = to_dtype(mm(t(gk), rshape(x, {M, K})), weight.scalar_type());
  }
  if (need_b) db = to_dtype(sum_dims(gk, {0}), gdt);
  if (need_x) {
    Tensor dsel = mm(gk, f32(weight));  // (M, K)
    if (ids_keep.has_value() && three_d) {  // summed into the kept patches of each image (a repeat: twice)
      Tensor index = call("aten::expand", "", torch::stable::unsqueeze(*ids_keep, 2),
                          std::vector<int64_t>{B, n_keep, K}, false);
      dsel = call("aten::scatter_add", "", torch::stable::new_zeros(dsel, {B, rows_in, K}), int64_t{1}, index,
                  rshape(dsel, {B, n_keep, K}));
    } else if (ids_keep.has_value()) {
      dsel = scatter_rows(dsel, *ids_keep, rows_in);
    }
    dx = to_dtype(rshape(dsel, std::vector<int64_t>(patches.sizes().begin(), patches.sizes().end())),
                  patches.scalar_type());
  }
  if (need_pos) {
    STD_TORCH_CHECK(pos_index.has_value(), op, ": the pos gradient needs pos_index");
    check_index_range(*pos_index, -1, pos_rows, op, "pos_index");
    Tensor idx = ids_keep.has_value() ? keep_rows(*pos_index, *ids_keep, three_d) : *pos_index;
    idx = rshape(idx, {M});
    Tensor has_row = call("aten::ge", "Tensor", idx, scalar_like(idx, 0.0));
    Tensor vals = choose(rshape(has_row, {M, 1}), kept, zero);
    dpos = to_dtype(scatter_rows(vals, choose(has_row, idx, scalar_like(idx, 0.0)), pos_rows), gdt);
  }
  if (need_tok) {
    STD_TORCH_CHECK(mask.has_value(), op, ": the mask_token gradient needs mask");
    dtok = to_dtype(sum_dims(choose(flat_mask, kept, zero), {0}), gdt);
  }
  if (need_pre) dpre = n_prefix ? to_dtype(dpre32, gdt) : torch::stable::new_zeros(dout, {0, D});
  return {dx, dw, db, dpos, dtok, dpre};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("swiglu_mlp_bwd", TORCH_BOX(&swiglu_mlp_bwd));
  m.impl("layernorm_linear_rope_bwd", TORCH_BOX(&layernorm_linear_rope_bwd));
  m.impl("attention_varlen_bwd", TORCH_BOX(&attention_varlen_bwd));
  m.impl("attention_masked_bwd", TORCH_BOX(&attention_masked_bwd));
  m.impl("patch_embed_tokens_bwd", TORCH_BOX(&patch_embed_tokens_bwd));
}

}  // namespace fastvit
