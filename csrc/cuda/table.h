// The AOT launch table in C++: one KernelEntry per cubin of `python -m fastvit_kernels.aot build`
// (fastvit_kernels/aot/build.py: its kernels.json, format "fastvit_kernels.aot.build/1"), and the parameter buffer
// image a launch passes to the kernel (pack_params).
//
// Launch convention (Triton's own launcher's; kernels.json "launch_abi"): block (32 * num_warps, 1, 1); grid
// (grid_x * num_ctas, grid_y, grid_z) with a cluster of num_ctas when above 1; sharedMemBytes = shared_bytes; the
// parameters in table order, the last two being Triton's global- and profile-scratch pointers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fastvit::cuda {

constexpr const char* kTableFormat = "fastvit_kernels.aot.build/1";

// How a parameter's value is written into the buffer.
enum class ParamKind {
  Pointer,  // a device address, 8 bytes
  Int,      // a two's-complement integer of `bytes` bytes (i1 .. i64, u1 .. u64)
  Float,    // an IEEE float of `bytes` bytes (fp16, bf16, fp32, fp64)
  TmaDesc,  // a 128-byte CUtensorMap
};

// What Triton compiled a host tensor descriptor argument for (kernels.json "tensordesc_meta").
struct TensorDescMeta {
  int swizzle = 0;                  // CUtensorMapSwizzle value
  int elem_size = 0;                // bytes per element
  int elem_type = 0;                // Triton's device-side numbering of CUtensorMapDataType (see tma.cpp)
  std::vector<int64_t> block_size;  // box, outermost dimension first
  bool fp4_padded = false;
  bool is_im2col = false;
};

struct ParamSpec {
  std::string name;   // argument name, "<arg>.desc" / "<arg>.shape[i]" / "<arg>.stride[i]", or "<kind>_scratch"
  std::string type;   // Triton type: "*fp16", "i32", "fp32", "nvTmaDesc", ...
  std::string role;   // "argument", "tensor_descriptor", "global_scratch" or "profile_scratch"
  ParamKind kind = ParamKind::Int;
  bool is_signed = true;  // Int only: i* (signed) or u* (unsigned)
  uint32_t bytes = 0;     // size in the buffer
  uint32_t align = 1;
  uint32_t offset = 0;    // from the start of the buffer
  std::shared_ptr<TensorDescMeta> desc;  // TmaDesc only
};

// Classifies a Triton parameter type; throws std::runtime_error for a type without a known size.
ParamSpec param_spec(const std::string& name, const std::string& type, const std::string& role, uint32_t offset);

struct KernelEntry {
  std::string symbol;  // unique: kernel, arch, hash (kernels.json "symbol")
  std::string entry;   // cuModuleGetFunction name
  std::string cubin_path;                      // read on first launch when cubin_data is null
  const unsigned char* cubin_data = nullptr;   // an embedded image, when the caller has one
  size_t cubin_size = 0;
  int cc = 0;  // compute capability: 80, 90
  int num_warps = 4;
  int num_ctas = 1;
  uint32_t shared_bytes = 0;  // dynamic
  uint32_t static_shared_bytes = 0;
  bool needs_shared_optin = false;  // dynamic shared memory above 48 KiB: MAX_DYNAMIC_SHARED_SIZE_BYTES first
  bool launch_cooperative_grid = false;
  bool launch_pdl = false;
  std::vector<ParamSpec> params;
  uint32_t param_buffer_bytes = 0;
  uint32_t global_scratch_bytes = 0, global_scratch_align = 1;  // per program; 0: the pointer is NULL
  uint32_t profile_scratch_bytes = 0, profile_scratch_align = 1;
};

// Parses the text of a kernels.json; cubin paths are made relative to `dir`. Throws std::runtime_error naming the
// table and the field when the format is not kTableFormat or a row is malformed (offsets that do not follow each
// parameter's size and alignment, a buffer size that disagrees, an unknown parameter type).
std::vector<KernelEntry> parse_table(const std::string& text, const std::string& dir, const std::string& what);

// The table in the file at `path`, parsed once per path and kept for the process (thread-safe).
const std::vector<KernelEntry>& load_table(const std::string& path);

// The entry named `symbol` of a table; throws std::runtime_error naming the symbol when absent.
const KernelEntry& find_entry(const std::vector<KernelEntry>& table, const std::string& symbol,
                              const std::string& what);

// One parameter's value (set the member of its spec's kind).
struct ParamValue {
  uint64_t pointer = 0;  // Pointer
  int64_t integer = 0;   // Int (an unsigned u64 above INT64_MAX is passed as its two's-complement bits)
  double real = 0.0;     // Float
  std::vector<uint8_t> bytes;  // TmaDesc: the 128-byte encoded descriptor

  static ParamValue ptr(uint64_t p) { ParamValue v; v.pointer = p; return v; }
  static ParamValue i(int64_t x) { ParamValue v; v.integer = x; return v; }
  static ParamValue f(double x) { ParamValue v; v.real = x; return v; }
  static ParamValue raw(std::vector<uint8_t> b) { ParamValue v; v.bytes = std::move(b); return v; }
};

// The parameter buffer image of one launch: each value little-endian at its spec's offset with its spec's size,
// padding bytes zero; buffer size = the end of the last parameter. Integers must fit their type (i1 / u1: 0 or 1);
// fp16 is rounded to nearest even (a finite value beyond the fp16 range is an error); bf16 takes the upper half of the value rounded to fp32 (Triton's launcher,
// extractBF16, truncates the same way, so both launchers pass the same bits). Throws std::runtime_error naming
// `what` and the parameter on a count mismatch, an out-of-range integer or a descriptor that is not 128 bytes.
std::vector<uint8_t> pack_params(const std::vector<ParamSpec>& layout, const std::vector<ParamValue>& values,
                                 const std::string& what);

// IEEE binary16 bits of `x`, rounded to nearest even (overflow to infinity, NaN kept quiet).
uint16_t fp16_bits(double x);

}  // namespace fastvit::cuda
