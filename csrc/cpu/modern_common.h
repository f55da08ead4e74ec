// Shared pieces of the modern ops' CPU kernels (modern.cpp forward, modern_bwd.cpp backward): the 2-D RoPE
// rotation (reference.rope_ref), argument checks and token selection.
#pragma once

#include "../fastvit.h"

namespace fastvit {
namespace modern {

inline Tensor silu(const Tensor& x) { return call("aten::silu", "", x); }

// theta (M, 1, Hr, P) fp32: coords[m % Nc] . freqs[h, j] per token row m (the 1 broadcasts over q and k).
inline Tensor rope_angles(const Tensor& coords, const Tensor& freqs, int64_t M) {
  const int64_t Nc = coords.size(0);
  Tensor c = f32(coords);
  if (M != Nc) c = part(call("aten::repeat", "", c, std::vector<int64_t>{(M + Nc - 1) / Nc, 1}), 0, 0, M);
  Tensor f = f32(freqs);  // (Hr, P, 2)
  auto axis = [&](int64_t i) {
    return mul(rshape(torch::stable::select(c, 1, i), {M, 1, 1}),
               torch::stable::unsqueeze(torch::stable::select(f, 2, i), 0));
  };
  Tensor theta = add(axis(0), axis(1));  // (M, Hr, P)
  return torch::stable::unsqueeze(theta, 1);
}

// qkv32 (M, 3 * D) fp32 with its q and k columns rotated by theta (M, 1, Hr, P) (a new tensor; v passes through):
// pairs (2j, 2j + 1) ("interleaved") or (j, j + head_dim / 2) ("half") of every head. The rotation by -theta is
// its inverse and its transpose (the backward's un-rotation of d(qkv)).
inline Tensor rope_rotate(const Tensor& qkv32, const Tensor& theta, int64_t H, bool half) {
  const int64_t M = qkv32.size(0), D = qkv32.size(1) / 3, hd = D / H, P = hd / 2;
  Tensor cosv = call("aten::cos", "", theta), sinv = call("aten::sin", "", theta);
  Tensor qk = rshape(part(qkv32, 1, 0, 2 * D), {M, 2, H, hd});
  Tensor rotated;
  if (half) {
    Tensor a = part(qk, 3, 0, P), b = part(qk, 3, P, P);
    rotated = concat({sub(mul(a, cosv), mul(b, sinv)), add(mul(b, cosv), mul(a, sinv))}, 3);
  } else {
    Tensor pairs = rshape(qk, {M, 2, H, P, 2});
    Tensor a = torch::stable::select(pairs, 4, 0), b = torch::stable::select(pairs, 4, 1);
    rotated = call("aten::stack", "",
                   std::vector<Tensor>{sub(mul(a, cosv), mul(b, sinv)), add(mul(b, cosv), mul(a, sinv))},
                   int64_t{4});
  }
  return concat({rshape(rotated, {M, 2 * D}), part(qkv32, 1, 2 * D, D)}, 1);
}

inline void check_rope(const Tensor& weight, const Tensor& coords, const Tensor& freqs, int64_t H, const char* op) {
  check_dim(weight, 2, op, "weight");
  const int64_t N_out = weight.size(0);
  STD_TORCH_CHECK(H > 0 && N_out % (3 * H) == 0 && (N_out / (3 * H)) % 2 == 0, op,
                  ": weight must have 3 * num_heads * head_dim rows with head_dim even (num_heads=", H, "); got ",
                  N_out);
  const int64_t P = N_out / (3 * H) / 2;
  check_dim(coords, 2, op, "coords");
  STD_TORCH_CHECK(coords.size(0) >= 1 && coords.size(1) == 2, op, ": coords must be (Nc >= 1, 2) (y, x); got (",
                  coords.size(0), ", ", coords.size(1), ")");
  check_dtype(coords, ScalarType::Float, op, "coords", "float32");
  check_dim(freqs, 3, op, "freqs");
  STD_TORCH_CHECK((freqs.size(0) == 1 || freqs.size(0) == H) && freqs.size(1) == P && freqs.size(2) == 2, op,
                  ": freqs must be (1 or num_heads=", H, ", head_dim/2=", P, ", 2); got (", freqs.size(0), ", ",
                  freqs.size(1), ", ", freqs.size(2), ")");
  check_dtype(freqs, ScalarType::Float, op, "freqs", "float32");
}

inline void check_heads(const Tensor& qkv, int64_t H, const char* op) {
  const int64_t width = qkv.size(qkv.dim() - 1);
  STD_TORCH_CHECK(H > 0 && width % (3 * H) == 0, op, ": qkv's last dim must be 3 * num_heads * head_dim ",
                  "(num_heads=", H, "); got ", width);
}

// The rows of t (3-D form: (B, N, ...) per image along dim 1; 2-D: (T, ...) along dim 0) that ids_keep selects.
inline Tensor keep_rows(const Tensor& t, const Tensor& ids_keep, bool three_d) {
  if (!three_d) return call("aten::index_select", "", t, int64_t{0}, ids_keep);
  Tensor idx = ids_keep;
  if (t.dim() == 3) {
    idx = call("aten::expand", "", torch::stable::unsqueeze(ids_keep, 2),
               std::vector<int64_t>{ids_keep.size(0), ids_keep.size(1), t.size(2)}, false);
  }
  return call("aten::gather", "", t, int64_t{1}, idx, false);
}

}  // namespace modern
}  // namespace fastvit
