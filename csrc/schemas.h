// The fastvit::* op schemas: the one list that csrc/schemas.cpp defines the ops from and that the CUDA kernels
// (csrc/cuda/plans.cpp) read their argument types from. They are the schemas the Python package registers without
// this library; tests/csrc/test_library.py compares the two lists.
#pragma once

namespace fastvit {

inline constexpr const char* kSchemas[] = {
    "attention_block_bwd(Tensor dout, Tensor x, Tensor qkv, Tensor o, Tensor lse, Tensor mean, Tensor rstd, Tensor norm_weight, Tensor norm_bias, Tensor qkv_weight, Tensor proj_weight, bool has_qkv_bias, bool has_proj_bias, SymInt num_heads, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "attention_block_fwd(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor qkv_weight, Tensor? qkv_bias, Tensor proj_weight, Tensor? proj_bias, SymInt num_heads, float scale, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "attention_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, SymInt num_heads, float scale) -> Tensor",
    "attention_fwd(Tensor qkv, SymInt num_heads, float scale) -> (Tensor, Tensor)",
    "attention_masked_bwd(Tensor dout, Tensor qkv, Tensor key_valid, Tensor out, Tensor lse, SymInt num_heads, float scale) -> Tensor",
    "attention_masked_fwd(Tensor qkv, Tensor key_valid, SymInt num_heads, float scale) -> (Tensor, Tensor)",
    "attention_varlen_bwd(Tensor dout, Tensor qkv, Tensor cu_seqlens, Tensor out, Tensor lse, SymInt num_heads, float scale) -> Tensor",
    "attention_varlen_fwd(Tensor qkv, Tensor cu_seqlens, SymInt num_heads, float scale) -> (Tensor, Tensor)",
    "layernorm_linear_bwd(Tensor dout, Tensor x, Tensor mean, Tensor rstd, Tensor norm_weight, Tensor? norm_bias, Tensor weight, bool has_bias, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "layernorm_linear_fwd(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor weight, Tensor? bias, float eps, bool rms=False) -> (Tensor, Tensor, Tensor)",
    "layernorm_linear_rope_bwd(Tensor dout, Tensor x, Tensor mean, Tensor rstd, Tensor norm_weight, Tensor? norm_bias, Tensor weight, bool has_bias, Tensor coords, Tensor freqs, SymInt num_heads, bool half, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "layernorm_linear_rope_fwd(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor weight, Tensor? bias, float eps, Tensor coords, Tensor freqs, SymInt num_heads, bool half, bool rms=False) -> (Tensor, Tensor, Tensor)",
    "layernorm_mlp_bwd(Tensor dout, Tensor x, Tensor preact, Tensor mean, Tensor rstd, Tensor norm_weight, Tensor? norm_bias, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, bool add_residual, bool recompute, str approximate, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "layernorm_mlp_fwd(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, float eps, bool add_residual, bool recompute, str approximate, bool rms=False) -> (Tensor, Tensor, Tensor, Tensor)",
    "linear_residual_bwd(Tensor dout, Tensor x, Tensor weight, bool has_bias) -> (Tensor, Tensor, Tensor)",
    "linear_residual_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor residual) -> Tensor",
    "patch_embed_bwd(Tensor dout, Tensor images, Tensor weight, Tensor? norm, SymInt num_cls, SymInt num_reg, bool no_embed_class, bool needs_weight_grad, bool needs_images_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, Tensor pos_embed, Tensor? cls_token, Tensor? reg_token, Tensor? norm, bool no_embed_class) -> Tensor",
    "patch_embed_tokens_bwd(Tensor dout, Tensor patches, Tensor weight, SymInt pos_rows, Tensor? pos_index, Tensor? ids_keep, Tensor? mask, SymInt n_prefix, Tensor? cu_seqlens, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "patch_embed_tokens_fwd(Tensor patches, Tensor weight, Tensor? bias, Tensor? pos, Tensor? pos_index, Tensor? ids_keep, Tensor? mask, Tensor? mask_token, Tensor? prefix, Tensor? cu_seqlens) -> Tensor",
    "swiglu_mlp_bwd(Tensor dout, Tensor x, Tensor preact, Tensor mean, Tensor rstd, Tensor hmean, Tensor hrstd, Tensor norm_weight, Tensor? norm_bias, Tensor gate_weight, Tensor? up_weight, Tensor fc2_weight, Tensor? hidden_norm_weight, Tensor? hidden_norm_bias, bool rms, bool add_residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "swiglu_mlp_fwd(Tensor x, Tensor norm_weight, Tensor? norm_bias, Tensor gate_weight, Tensor? gate_bias, Tensor? up_weight, Tensor? up_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor? hidden_norm_weight, Tensor? hidden_norm_bias, float eps, float hidden_norm_eps, bool rms, bool add_residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
};

inline constexpr int kNumSchemas = static_cast<int>(sizeof(kSchemas) / sizeof(kSchemas[0]));

}  // namespace fastvit
