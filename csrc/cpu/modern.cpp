// CPU kernels of the forward ops of the modern ViT families: the SwiGLU MLP (EVA-02, SigLIP-2 / AIMv2 style),
// LayerNorm + qkv Linear + 2-D RoPE (EVA-02, DINOv3, PE), attention over packed variable-length sequences
// (cu_seqlens: NaViT packing) and over a padded batch with a key-padding mask (timm NaFlex), and the patch
// embedding of already-patchified tokens (NaFlex collator form, MAE token selection, iBOT mask token).
//
// They compute the math of fastvit_kernels/reference.py (swiglu_mlp_ref, layernorm_linear_ref + rope_ref,
// attention_varlen_ref, attention_masked_ref, patch_embed_tokens_ref) with ATen ops, and return what the Python
// ops' Triton implementations return, auxiliaries and empty placeholders included (the fakes in
// fastvit_kernels/ops/*.py give the shapes), so a graph exported with these ops runs on a CPU process that loads
// only this library. Norm statistics, GEMM accumulation, RoPE angles, softmax and log-sum-exp are fp32; like the
// Triton epilogues, each output is rounded once to the input's dtype from its fp32 value (the SwiGLU hidden is
// rounded before fc2, as the Triton op stores it).
#include "modern_common.h"

#include <cmath>
#include <limits>

namespace fastvit {
namespace {
using namespace modern;

constexpr double kLog2e = 1.4426950408889634;

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU MLP: x + fc2(hnorm(silu(gate) * up)), (gate | up) = fc1(norm(x))
// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> swiglu_mlp_fwd(
    Tensor x, Tensor norm_weight, OptTensor norm_bias, Tensor gate_weight, OptTensor gate_bias, OptTensor up_weight,
    OptTensor up_bias, Tensor fc2_weight, OptTensor fc2_bias, OptTensor hidden_norm_weight,
    OptTensor hidden_norm_bias, double eps, double hidden_norm_eps, bool rms, bool add_residual) {
  const char* op = "fastvit::swiglu_mlp_fwd";
  check_dim(x, 2, op, "x");
  check_dim(gate_weight, 2, op, "gate_weight");
  check_dim(fc2_weight, 2, op, "fc2_weight");
  const int64_t D = x.size(1), Dh = fc2_weight.size(1);
  const ScalarType dt = x.scalar_type();
  STD_TORCH_CHECK(fc2_weight.size(0) == D, op, ": fc2_weight must be (D=", D, ", D_hidden); got (",
                  fc2_weight.size(0), ", ", Dh, ")");
  const int64_t gate_rows = up_weight.has_value() ? Dh : 2 * Dh;
  STD_TORCH_CHECK(gate_weight.size(0) == gate_rows && gate_weight.size(1) == D, op, ": gate_weight must be (",
                  up_weight.has_value() ? "D_hidden=" : "2 * D_hidden=", gate_rows, ", D=", D, "); got (",
                  gate_weight.size(0), ", ", gate_weight.size(1), ")");
  STD_TORCH_CHECK(up_weight.has_value() || !up_bias.has_value(), op,
                  ": up_bias must be None when up_weight is None (the packed fc1)");
  STD_TORCH_CHECK(hidden_norm_weight.has_value() || !hidden_norm_bias.has_value(), op,
                  ": hidden_norm_bias needs hidden_norm_weight");

  auto [normed, mean, rstd] = norm_rows_f32(x, norm_weight, norm_bias, eps, rms);
  Tensor pre32 = linear(normed, f32(gate_weight), opt_f32(gate_bias));  // packed: (M, 2 Dh), gate columns first
  if (up_weight.has_value()) pre32 = concat({pre32, linear(normed, f32(*up_weight), opt_f32(up_bias))}, 1);
  Tensor hidden = to_dtype(mul(silu(part(pre32, 1, 0, Dh)), part(pre32, 1, Dh, Dh)), dt);
  Tensor z, hmean, hrstd;
  if (hidden_norm_weight.has_value()) {
    std::tie(z, hmean, hrstd) = norm_rows_f32(hidden, hidden_norm_weight, hidden_norm_bias, hidden_norm_eps, false);
  } else {
    z = f32(hidden);
    hmean = empty_1d(x, 0, ScalarType::Float);  // two tensors: outputs may not alias
    hrstd = empty_1d(x, 0, ScalarType::Float);
  }
  Tensor out = linear(z, f32(fc2_weight), opt_f32(fc2_bias));
  if (add_residual) out = add(out, f32(x));
  return {to_dtype(out, dt), to_dtype(pre32, dt), mean, rstd, hmean, hrstd};
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm + Linear + 2-D RoPE of the q and k sections (reference.rope_ref)
// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> layernorm_linear_rope_fwd(Tensor x, Tensor norm_weight, OptTensor norm_bias,
                                                             Tensor weight, OptTensor bias, double eps,
                                                             Tensor coords, Tensor freqs, int64_t num_heads,
                                                             bool half, bool rms) {
  const char* op = "fastvit::layernorm_linear_rope_fwd";
  check_dim(x, 2, op, "x");
  check_rope(weight, coords, freqs, num_heads, op);
  auto [normed, mean, rstd] = norm_rows_f32(x, norm_weight, norm_bias, eps, rms);
  Tensor qkv32 = linear(normed, f32(weight), opt_f32(bias));
  Tensor out = rope_rotate(qkv32, rope_angles(coords, freqs, x.size(0)), num_heads, half);
  return {to_dtype(out, x.scalar_type()), mean, rstd};
}

// ---------------------------------------------------------------------------------------------------------------
// attention over packed sequences (cu_seqlens) and over a padded batch with a key mask (key_valid)
// ---------------------------------------------------------------------------------------------------------------
Tensor logsumexp_log2(const Tensor& s) {
  return mul(call("aten::logsumexp", "", s, std::vector<int64_t>{-1}, false), kLog2e);
}

std::tuple<Tensor, Tensor> attention_varlen_fwd(Tensor qkv, Tensor cu_seqlens, int64_t num_heads, double scale) {
  const char* op = "fastvit::attention_varlen_fwd";
  check_dim(qkv, 2, op, "qkv");
  check_heads(qkv, num_heads, op);
  const int64_t T = qkv.size(0), D = qkv.size(1) / 3, H = num_heads, hd = D / H;
  std::vector<int64_t> cu = checked_cu_seqlens(cu_seqlens, T, op);
  Tensor qkv32 = f32(qkv);
  std::vector<Tensor> outs, lses;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t start = cu[s], L = cu[s + 1] - cu[s];
    if (L == 0) continue;
    Tensor q5 = permuted(rshape(part(qkv32, 0, start, L), {L, 3, H, hd}), {1, 2, 0, 3});  // (3, H, L, hd)
    Tensor q = torch::stable::select(q5, 0, 0), k = torch::stable::select(q5, 0, 1);
    Tensor v = torch::stable::select(q5, 0, 2);
    Tensor sc = mul(mm(q, torch::stable::transpose(k, -2, -1)), scale);  // (H, L, L)
    lses.push_back(logsumexp_log2(sc));
    Tensor p = call("aten::_softmax", "", sc, int64_t{-1}, false);
    outs.push_back(rshape(contig(permuted(mm(p, v), {1, 0, 2})), {L, D}));
  }
  if (outs.empty()) return {torch::stable::new_empty(qkv, {0, D}), torch::stable::new_empty(qkv, {H, 0},
                                                                                             ScalarType::Float)};
  return {to_dtype(concat(outs, 0), qkv.scalar_type()), concat(lses, 1)};
}

std::tuple<Tensor, Tensor> attention_masked_fwd(Tensor qkv, Tensor key_valid, int64_t num_heads, double scale) {
  const char* op = "fastvit::attention_masked_fwd";
  check_dim(qkv, 3, op, "qkv");
  check_heads(qkv, num_heads, op);
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, H = num_heads, hd = D / H;
  check_dim(key_valid, 2, op, "key_valid");
  check_dtype(key_valid, ScalarType::Bool, op, "key_valid", "bool");
  STD_TORCH_CHECK(key_valid.size(0) == B && key_valid.size(1) == N, op, ": key_valid must be (B, N) = (", B, ", ",
                  N, "); got (", key_valid.size(0), ", ", key_valid.size(1), ")");
  Tensor q5 = permuted(rshape(f32(qkv), {B, N, 3, H, hd}), {2, 0, 3, 1, 4});  // (3, B, H, N, hd)
  Tensor q = torch::stable::select(q5, 0, 0), k = torch::stable::select(q5, 0, 1);
  Tensor v = torch::stable::select(q5, 0, 2);
  Tensor sc = mul(mm(q, torch::stable::transpose(k, -2, -1)), scale);  // (B, H, N, N)
  sc = choose(rshape(key_valid, {B, 1, 1, N}), sc, scalar_like(sc, -std::numeric_limits<double>::infinity()));
  // The Triton kernel computes rows up to the image's last valid key (kv_end) and leaves lse 0 past it (also for
  // an image without valid keys); the rows before it, valid or not, get the log-sum-exp over the valid keys.
  Tensor zero = scalar_like(sc, 0.0);
  Tensor flipped = call("aten::flip", "", to_dtype(key_valid, ScalarType::Int), std::vector<int64_t>{1});
  Tensor later = call("aten::flip", "", call("aten::cumsum", "", flipped, int64_t{1}, std::optional<ScalarType>()),
                      std::vector<int64_t>{1});  // valid keys at or after each row
  Tensor before_end = call("aten::gt", "Tensor", later, scalar_like(later, 0.0));
  Tensor lse = choose(rshape(before_end, {B, 1, N}), logsumexp_log2(sc), zero);
  Tensor p = call("aten::_softmax", "", sc, int64_t{-1}, false);
  p = call("aten::nan_to_num", "", p, std::optional<double>(0.0), std::optional<double>(),
           std::optional<double>());  // rows without a valid key
  Tensor o = rshape(contig(permuted(mm(p, v), {0, 2, 1, 3})), {B, N, D});
  o = choose(rshape(key_valid, {B, N, 1}), o, zero);  // invalid queries: zero rows
  return {to_dtype(o, qkv.scalar_type()), lse};
}

// ---------------------------------------------------------------------------------------------------------------
// patch embedding of pre-patchified tokens (reference.patch_embed_tokens_ref)
// ---------------------------------------------------------------------------------------------------------------
Tensor patch_embed_tokens_fwd(Tensor patches, Tensor weight, OptTensor bias, OptTensor pos, OptTensor pos_index,
                              OptTensor ids_keep, OptTensor mask, OptTensor mask_token, OptTensor prefix,
                              OptTensor cu_seqlens) {
  const char* op = "fastvit::patch_embed_tokens_fwd";
  STD_TORCH_CHECK(patches.dim() == 2 || patches.dim() == 3, op, ": patches must be (B, N, K) or (T, K); got ",
                  patches.dim(), "-D");
  const bool three_d = patches.dim() == 3;
  const int64_t K = patches.size(patches.dim() - 1), rows_in = patches.size(patches.dim() - 2);
  check_dim(weight, 2, op, "weight");
  STD_TORCH_CHECK(weight.size(1) == K, op, ": weight must be (D, K=", K, "); got (", weight.size(0), ", ",
                  weight.size(1), ")");
  const int64_t D = weight.size(0);
  const ScalarType dt = patches.scalar_type();
  std::vector<int64_t> lead_in(patches.sizes().begin(), patches.sizes().end() - 1);
  std::vector<int64_t> lead_out = lead_in;
  Tensor x = f32(patches);
  if (ids_keep.has_value()) {
    check_dim(*ids_keep, three_d ? 2 : 1, op, "ids_keep");
    STD_TORCH_CHECK(!three_d || ids_keep->size(0) == lead_in[0], op, ": ids_keep must be (B=", lead_in[0],
                    ", N_keep); got ", ids_keep->size(0), " rows");
    check_index_range(*ids_keep, 0, rows_in, op, "ids_keep");
    lead_out = std::vector<int64_t>(ids_keep->sizes().begin(), ids_keep->sizes().end());
    x = keep_rows(x, *ids_keep, three_d);
  }
  Tensor out = linear(x, f32(weight), opt_f32(bias));  // (lead_out..., D)
  std::vector<int64_t> lead_1 = lead_out;
  lead_1.push_back(1);
  if (mask.has_value() || mask_token.has_value()) {
    STD_TORCH_CHECK(mask.has_value() && mask_token.has_value(), op, ": mask and mask_token go together; got only ",
                    mask.has_value() ? "mask" : "mask_token");
    check_dtype(*mask, ScalarType::Bool, op, "mask", "bool");
    std::vector<int64_t> mshape(mask->sizes().begin(), mask->sizes().end());
    STD_TORCH_CHECK(mshape == lead_out, op, ": mask must have the output tokens' shape (", lead_out[0],
                    lead_out.size() > 1 ? ", N_out)" : ",)", "; got ", mask->dim(), "-D");
    STD_TORCH_CHECK(mask_token->numel() == D, op, ": mask_token must have D=", D, " elements; got ",
                    mask_token->numel());
    out = choose(rshape(*mask, lead_1), rshape(f32(*mask_token), {D}), out);
  }
  if (pos.has_value() || pos_index.has_value()) {
    STD_TORCH_CHECK(pos.has_value() && pos_index.has_value(), op, ": pos and pos_index go together; got only ",
                    pos.has_value() ? "pos" : "pos_index");
    check_dim(*pos, 2, op, "pos");
    STD_TORCH_CHECK(pos->size(1) == D, op, ": pos must be (R, D=", D, "); got (", pos->size(0), ", ", pos->size(1),
                    ")");
    std::vector<int64_t> ishape(pos_index->sizes().begin(), pos_index->sizes().end());
    STD_TORCH_CHECK(ishape == lead_in, op, ": pos_index must have patches' leading shape");
    check_index_range(*pos_index, -1, pos->size(0), op, "pos_index");
    Tensor idx = ids_keep.has_value() ? keep_rows(*pos_index, *ids_keep, three_d) : *pos_index;
    Tensor has_row = call("aten::ge", "Tensor", idx, scalar_like(idx, 0.0));
    Tensor rows = call("aten::index_select", "", f32(*pos), int64_t{0},
                       rshape(choose(has_row, idx, scalar_like(idx, 0.0)), {-1}));
    std::vector<int64_t> rows_shape = lead_out;
    rows_shape.push_back(D);
    rows = choose(rshape(has_row, lead_1), rshape(rows, rows_shape), scalar_like(out, 0.0));
    out = add(out, rows);
  }
  out = to_dtype(out, dt);
  STD_TORCH_CHECK(!(three_d && cu_seqlens.has_value()), op, ": cu_seqlens is for packed (T, K) patches; got 3-D ",
                  "patches");
  if (cu_seqlens.has_value() && !prefix.has_value()) checked_cu_seqlens(*cu_seqlens, lead_out[0], op);
  if (!prefix.has_value()) return contig(out);
  check_dim(*prefix, 2, op, "prefix");
  STD_TORCH_CHECK(prefix->size(1) == D, op, ": prefix must be (n_prefix, D=", D, "); got (", prefix->size(0), ", ",
                  prefix->size(1), ")");
  Tensor pre = to_dtype(*prefix, dt);
  if (three_d) {
    Tensor rep = call("aten::expand", "", torch::stable::unsqueeze(pre, 0),
                      std::vector<int64_t>{lead_out[0], -1, -1}, false);
    return contig(concat({rep, out}, 1));
  }
  STD_TORCH_CHECK(cu_seqlens.has_value(), op, ": prefix with packed (T, K) patches needs cu_seqlens");
  std::vector<int64_t> cu = checked_cu_seqlens(*cu_seqlens, lead_out[0], op);
  std::vector<Tensor> pieces;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    pieces.push_back(pre);
    pieces.push_back(part(out, 0, cu[s], cu[s + 1] - cu[s]));
  }
  return pieces.empty() ? contig(out) : concat(pieces, 0);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("swiglu_mlp_fwd", TORCH_BOX(&swiglu_mlp_fwd));
  m.impl("layernorm_linear_rope_fwd", TORCH_BOX(&layernorm_linear_rope_fwd));
  m.impl("attention_varlen_fwd", TORCH_BOX(&attention_varlen_fwd));
  m.impl("attention_masked_fwd", TORCH_BOX(&attention_masked_fwd));
  m.impl("patch_embed_tokens_fwd", TORCH_BOX(&patch_embed_tokens_fwd));
}

}  // namespace fastvit
