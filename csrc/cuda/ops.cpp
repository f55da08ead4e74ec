// The private fastvit_csrc::* ops of the CUDA launch layer: a way for Python (tests, and later the package's
// dispatch) to reach the C++ launcher. They live outside the fastvit namespace because they are not model ops: their
// schemas are this library's internals and may change with it.
//
// Argument convention shared by pack_params and launch: the table's parameters are filled in order from three
// lists, each consumed front to back: `tensors` for pointer parameters (the tensor's data_ptr) and for each tensor
// descriptor's base tensor, `ints` for integer parameters (a descriptor's shape and strides included, as Triton's
// launcher expands them), `floats` for floating-point parameters. Every list must be used up exactly.
#include "../fastvit.h"
#include "launch.h"
#include "ops.h"
#include "table.h"

#include <cstring>
#include <stdexcept>

namespace fastvit::cuda {

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("fastvit_kernels._C: " + msg); }

bool is_scratch(const ParamSpec& s) { return s.role == "global_scratch" || s.role == "profile_scratch"; }

// The values of `entry`'s parameters from the op's lists. Scratch pointers come from `ints` when `scratch_from_ints`
// (pack_params: the caller states them) and are left 0 otherwise (launch fills them). Descriptor parameters are left
// empty; their base tensors are returned in `desc_bases` in order.
std::vector<ParamValue> collect(const KernelEntry& entry, const std::vector<Tensor>& tensors,
                                const std::vector<int64_t>& ints, const std::vector<double>& floats,
                                bool scratch_from_ints, std::vector<Tensor>& desc_bases, const std::string& op) {
  size_t ti = 0, ii = 0, fi = 0;
  std::vector<ParamValue> values;
  auto need = [&](size_t have, size_t used, const char* list, const ParamSpec& s) {
    if (used >= have)
      fail(op + " (" + entry.symbol + "): " + list + " has " + std::to_string(have) + " entries, too few for "
           "parameter " + s.name + " (" + s.type + ")");
  };
  for (const ParamSpec& s : entry.params) {
    if (is_scratch(s)) {
      if (scratch_from_ints) {
        need(ints.size(), ii, "ints", s);
        values.push_back(ParamValue::ptr(static_cast<uint64_t>(ints[ii++])));
      } else {
        values.push_back(ParamValue::ptr(0));
      }
      continue;
    }
    switch (s.kind) {
      case ParamKind::Pointer:
        need(tensors.size(), ti, "tensors", s);
        values.push_back(ParamValue::ptr(reinterpret_cast<uint64_t>(tensors[ti++].data_ptr())));
        break;
      case ParamKind::TmaDesc:
        need(tensors.size(), ti, "tensors", s);
        desc_bases.push_back(tensors[ti++]);
        values.push_back(ParamValue{});
        break;
      case ParamKind::Int:
        need(ints.size(), ii, "ints", s);
        values.push_back(ParamValue::i(ints[ii++]));
        break;
      case ParamKind::Float:
        need(floats.size(), fi, "floats", s);
        values.push_back(ParamValue::f(floats[fi++]));
        break;
    }
  }
  if (ti != tensors.size() || ii != ints.size() || fi != floats.size())
    fail(op + " (" + entry.symbol + "): the kernel takes " + std::to_string(ti) + " tensors, " + std::to_string(ii) +
         " ints and " + std::to_string(fi) + " floats; got " + std::to_string(tensors.size()) + ", " +
         std::to_string(ints.size()) + " and " + std::to_string(floats.size()));
  return values;
}

// The shape and strides Triton's launcher passes after descriptor parameter `i` (Triton's expansion: rank i32
// sizes, then rank i64 strides), read back from the collected values.
void desc_shape(const KernelEntry& entry, const std::vector<ParamValue>& values, size_t i,
                std::vector<int64_t>& shape, std::vector<int64_t>& strides, const std::string& op) {
  size_t rank = entry.params[i].desc->block_size.size();
  if (i + 2 * rank >= entry.params.size())
    fail(op + " (" + entry.symbol + "): descriptor " + entry.params[i].name + " is not followed by its shape and "
         "strides");
  std::string arg = entry.params[i].name.substr(0, entry.params[i].name.rfind(".desc"));
  for (size_t r = 0; r < rank; ++r) {
    const std::string& sn = entry.params[i + 1 + r].name;
    const std::string& tn = entry.params[i + 1 + rank + r].name;
    if (sn != arg + ".shape[" + std::to_string(r) + "]" || tn != arg + ".stride[" + std::to_string(r) + "]")
      fail(op + " (" + entry.symbol + "): descriptor " + entry.params[i].name + " is followed by " + sn + " and " +
           tn + "; expected its shape and strides");
    shape.push_back(values[i + 1 + r].integer);
    strides.push_back(values[i + 1 + rank + r].integer);
  }
}

int64_t cuda_driver_version() { return driver().version; }

// The cuTensorMapEncodeTiled arguments launch would use for descriptor parameter `param` of `symbol` with base address
// `base`, flattened: [data type, rank, global dims (5), global strides in bytes (5), box (5), element strides (5),
// interleave, swizzle, L2 promotion, OOB fill]; entries past the rank are 0. No driver needed.
std::vector<int64_t> tma_encode_args_op(std::string table, std::string symbol, std::string param, int64_t base,
                                        std::vector<int64_t> shape, std::vector<int64_t> strides) {
  const std::string op = "fastvit_csrc::tma_encode_args";
  const KernelEntry& entry = find_entry(load_table(table), symbol, table);
  for (const ParamSpec& s : entry.params) {
    if (s.name != param) continue;
    STD_TORCH_CHECK(s.kind == ParamKind::TmaDesc, op, ": parameter ", param, " of ", symbol, " is ", s.type,
                    ", not a tensor descriptor");
    TmaEncodeArgs a = tma_encode_args(*s.desc, static_cast<uint64_t>(base), shape, strides, false,
                                      op + " (" + symbol + ", " + param + ")");
    std::vector<int64_t> out{a.data_type, a.rank};
    for (auto v : a.global_dim) out.push_back(static_cast<int64_t>(v));
    for (auto v : a.global_strides) out.push_back(static_cast<int64_t>(v));
    for (auto v : a.box_dim) out.push_back(v);
    for (auto v : a.element_strides) out.push_back(v);
    out.insert(out.end(), {a.interleave, a.swizzle, a.l2_promotion, a.oob_fill});
    return out;
  }
  fail(op + ": " + symbol + " has no parameter " + param);
}

Tensor pack_params_op(std::string table, std::string symbol, std::vector<Tensor> tensors, std::vector<int64_t> ints,
                      std::vector<double> floats, std::vector<Tensor> descriptors) {
  const std::string op = "fastvit_csrc::pack_params";
  const KernelEntry& entry = find_entry(load_table(table), symbol, table);
  std::vector<Tensor> bases;
  std::vector<ParamValue> values = collect(entry, tensors, ints, floats, true, bases, op);
  size_t di = 0;
  for (size_t i = 0; i < entry.params.size(); ++i) {
    if (entry.params[i].kind != ParamKind::TmaDesc) continue;
    if (di >= descriptors.size())
      fail(op + " (" + symbol + "): descriptors has " + std::to_string(descriptors.size()) + " entries, too few "
           "for " + entry.params[i].name);
    const Tensor& d = descriptors[di++];
    STD_TORCH_CHECK(d.is_cpu() && d.scalar_type() == ScalarType::Byte && d.dim() == 1 && d.is_contiguous(), op,
                    ": descriptors must be contiguous 1-D uint8 CPU tensors (the encoded CUtensorMap bytes)");
    const auto* p = static_cast<const uint8_t*>(d.data_ptr());
    values[i] = ParamValue::raw(std::vector<uint8_t>(p, p + d.numel()));
  }
  STD_TORCH_CHECK(di == descriptors.size(), op, " (", symbol, "): the kernel takes ", di, " descriptors; got ",
                  descriptors.size());
  std::vector<uint8_t> image = pack_params(entry.params, values, op + " (" + symbol + ")");
  Tensor out = torch::stable::empty({static_cast<int64_t>(image.size())}, ScalarType::Byte);
  if (!image.empty()) std::memcpy(out.mutable_data_ptr(), image.data(), image.size());
  return out;
}

void launch_op(std::string table, std::string symbol, std::vector<int64_t> grid, std::vector<Tensor> tensors,
               std::vector<int64_t> ints, std::vector<double> floats) {
  const std::string op = "fastvit_csrc::launch";
  STD_TORCH_CHECK(grid.size() >= 1 && grid.size() <= 3, op, ": grid must have 1 to 3 extents; got ", grid.size());
  std::array<int64_t, 3> g{1, 1, 1};
  for (size_t i = 0; i < grid.size(); ++i) g[i] = grid[i];
  launch_entry(find_entry(load_table(table), symbol, table), g, tensors, ints, floats, op);
}

}  // namespace

std::vector<uint8_t> pack_entry(const KernelEntry& entry, const std::vector<Tensor>& tensors,
                                const std::vector<int64_t>& ints, const std::vector<double>& floats,
                                const std::string& op) {
  std::vector<Tensor> bases;
  std::vector<ParamValue> values = collect(entry, tensors, ints, floats, false, bases, op);
  for (size_t i = 0; i < entry.params.size(); ++i)
    if (entry.params[i].kind == ParamKind::TmaDesc) values[i] = ParamValue::raw(std::vector<uint8_t>(128, 0));
  return pack_params(entry.params, values, op);
}

void launch_entry(const KernelEntry& entry, const std::array<int64_t, 3>& g, const std::vector<Tensor>& tensors,
                  const std::vector<int64_t>& ints, const std::vector<double>& floats, const std::string& op) {
  const std::string& symbol = entry.symbol;
  STD_TORCH_CHECK(!tensors.empty(), op, " (", symbol, "): no tensor argument gives the device to launch on");
  // the lists first (counts and ranges, on any device), so a wrongly bound launch fails the same way everywhere
  std::vector<Tensor> bases;
  std::vector<ParamValue> values = collect(entry, tensors, ints, floats, false, bases, op);
  int device = tensors[0].get_device_index();
  for (size_t i = 0; i < tensors.size(); ++i)
    STD_TORCH_CHECK(tensors[i].is_cuda() && tensors[i].get_device_index() == device, op, " (", symbol,
                    "): every tensor must be on CUDA device ", device, "; tensor ", i, " is not");
  size_t bi = 0;
  for (size_t i = 0; i < entry.params.size(); ++i) {
    if (entry.params[i].kind != ParamKind::TmaDesc) continue;
    std::vector<int64_t> shape, strides;
    desc_shape(entry, values, i, shape, strides, op);
    std::string what = op + " (" + symbol + ", " + entry.params[i].name + ")";
    auto base = reinterpret_cast<uint64_t>(bases[bi++].data_ptr());
    function_for(entry, device, op);  // the encoder needs a current context on the device
    values[i] = ParamValue::raw(encode_tma(tma_encode_args(*entry.params[i].desc, base, shape, strides, false, what),
                                           what));
  }
  // Triton's scratch buffers: grid size * num_ctas * bytes per program, kept alive until the op returns; the
  // caching allocator orders their reuse after this launch on the same stream.
  std::vector<Tensor> scratch;
  int64_t programs = g[0] * g[1] * g[2] * entry.num_ctas;
  for (size_t i = 0; i < entry.params.size(); ++i) {
    const ParamSpec& s = entry.params[i];
    uint32_t bytes = s.role == "global_scratch" ? entry.global_scratch_bytes
                     : s.role == "profile_scratch" ? entry.profile_scratch_bytes : 0;
    if (bytes == 0 || programs == 0) continue;
    scratch.push_back(torch::stable::new_empty(tensors[0], {programs * static_cast<int64_t>(bytes)},
                                               ScalarType::Byte));
    values[i] = ParamValue::ptr(reinterpret_cast<uint64_t>(scratch.back().data_ptr()));
  }
  launch(entry, device, g, values, current_stream(device, op), op);
}

}  // namespace fastvit::cuda

STABLE_TORCH_LIBRARY(fastvit_csrc, m) {
  m.def("cuda_driver_version() -> int");
  m.def("pack_params(str table, str symbol, Tensor[] tensors, int[] ints, float[] floats, Tensor[] descriptors) "
        "-> Tensor");
  m.def("tma_encode_args(str table, str symbol, str param, int base, int[] shape, int[] strides) -> int[]");
  m.def("launch(str table, str symbol, int[] grid, Tensor(a!)[] tensors, int[] ints, float[] floats) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(fastvit_csrc, CompositeExplicitAutograd, m) {
  m.impl("cuda_driver_version", TORCH_BOX(&fastvit::cuda::cuda_driver_version));
  m.impl("pack_params", TORCH_BOX(&fastvit::cuda::pack_params_op));
  m.impl("tma_encode_args", TORCH_BOX(&fastvit::cuda::tma_encode_args_op));
  m.impl("launch", TORCH_BOX(&fastvit::cuda::launch_op));
}
