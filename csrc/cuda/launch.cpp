// Module registry, streams, TMA descriptors and the launch itself (launch.h).
#include "launch.h"

#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <tuple>

namespace fastvit::cuda {

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("fastvit_kernels._C: " + msg); }

struct Loaded {
  CUmodule module = nullptr;
  CUfunction function = nullptr;
};

std::string read_file(const std::string& path, const std::string& op) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(op + ": cannot read the cubin '" + path + "'");
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

CUcontext primary_context(int device, const std::string& op) {
  // One retain per device for the life of the process: the primary context is the one PyTorch's runtime uses, and
  // releasing it while PyTorch holds tensors there would be wrong anyway.
  static std::mutex mutex;
  static std::map<int, CUcontext> contexts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = contexts.find(device);
  if (it != contexts.end()) return it->second;
  const Driver& d = driver();
  CUdevice dev = 0;
  check(d.cuDeviceGet(&dev, device), "cuDeviceGet", op);
  CUcontext ctx = nullptr;
  check(d.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain", op);
  contexts[device] = ctx;
  return ctx;
}

void make_current(int device, const std::string& op) {
  const Driver& d = driver();
  CUcontext want = primary_context(device, op), have = nullptr;
  check(d.cuCtxGetCurrent(&have), "cuCtxGetCurrent", op);
  if (have != want) check(d.cuCtxSetCurrent(want), "cuCtxSetCurrent", op);
}

// Host CUtensorMapDataType of Triton's compile-time element type: Triton numbers FLOAT64 / BFLOAT16 /
// FLOAT32_FTZ as 8 / 9 / 10 on the device side where the host enum has them at 10 / 8 / 9 (its launcher remaps
// the same three); every other value is the same in both.
int host_tma_dtype(int device_type) {
  switch (device_type) {
    case 8: return 10;
    case 9: return 8;
    case 10: return 9;
    default: return device_type;
  }
}

}  // namespace

CUfunction function_for(const KernelEntry& entry, int device, const std::string& op) {
  make_current(device, op);
  static std::mutex mutex;
  static std::map<std::pair<int, std::string>, Loaded> loaded;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(device, entry.symbol);
  auto it = loaded.find(key);
  if (it != loaded.end()) return it->second.function;
  const Driver& d = driver();
  std::string image;
  const void* data = entry.cubin_data;
  if (data == nullptr) {
    image = read_file(entry.cubin_path, op);
    data = image.data();
  }
  Loaded l;
  std::string where = op + " (" + entry.symbol + ")";
  check(d.cuModuleLoadData(&l.module, data), "cuModuleLoadData", where);
  check(d.cuModuleGetFunction(&l.function, l.module, entry.entry.c_str()), "cuModuleGetFunction", where);
  if (entry.needs_shared_optin)
    check(d.cuFuncSetAttribute(l.function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                               static_cast<int>(entry.shared_bytes)),
          "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)", where);
  if (entry.num_ctas == 16)  // a cluster of 16 is above the portable limit of 8
    check(d.cuFuncSetAttribute(l.function, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
          "cuFuncSetAttribute(NON_PORTABLE_CLUSTER_SIZE_ALLOWED)", where);
  loaded[key] = l;
  return l.function;
}

CUstream current_stream(int device, const std::string& op) {
  using GetStream = int32_t (*)(int32_t, void**);
  static GetStream get = [] {
    // RTLD_NOLOAD: only a libtorch_cuda that PyTorch already loaded (a CUDA tensor exists, so it is); its symbols
    // need not be global, which is why RTLD_DEFAULT is only the fallback.
    void* lib = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD);
    void* sym = lib ? dlsym(lib, "aoti_torch_get_current_cuda_stream") : nullptr;
    if (sym == nullptr) sym = dlsym(RTLD_DEFAULT, "aoti_torch_get_current_cuda_stream");
    return reinterpret_cast<GetStream>(sym);
  }();
  if (get == nullptr)
    fail(op + ": PyTorch's CUDA library (libtorch_cuda, aoti_torch_get_current_cuda_stream) is not loaded; the "
         "C++ CUDA launcher needs a CUDA build of PyTorch");
  void* stream = nullptr;
  if (get(device, &stream) != 0) fail(op + ": aoti_torch_get_current_cuda_stream(" + std::to_string(device) + ") failed");
  return static_cast<CUstream>(stream);
}

TmaEncodeArgs tma_encode_args(const TensorDescMeta& meta, uint64_t base, const std::vector<int64_t>& shape,
                              const std::vector<int64_t>& strides, bool nan_padding, const std::string& what) {
  size_t rank = meta.block_size.size();
  if (meta.is_im2col || meta.fp4_padded)
    fail(what + ": im2col and fp4-padded tensor descriptors are not supported by the C++ launcher");
  if (rank < 1 || rank > 5) fail(what + ": a tensor descriptor has rank 1 to 5; got " + std::to_string(rank));
  if (shape.size() != rank || strides.size() != rank)
    fail(what + ": the descriptor's block has rank " + std::to_string(rank) + " but shape has " +
         std::to_string(shape.size()) + " and strides " + std::to_string(strides.size()) + " dimensions");
  if (strides[rank - 1] != 1)
    fail(what + ": the innermost stride of a tensor descriptor must be 1; got " + std::to_string(strides[rank - 1]));
  if (meta.elem_size <= 0) fail(what + ": elem_size must be positive; got " + std::to_string(meta.elem_size));
  if (base % 16 != 0) fail(what + ": the base address of a tensor descriptor must be 16-byte aligned");
  TmaEncodeArgs a;
  a.data_type = host_tma_dtype(meta.elem_type);
  a.rank = static_cast<unsigned>(rank);
  a.global_address = base;
  a.swizzle = meta.swizzle;
  a.oob_fill = nan_padding ? CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA : CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE;
  for (size_t i = 0; i < rank; ++i) {  // the driver takes the innermost dimension first
    if (shape[i] < 1 || meta.block_size[i] < 1 || meta.block_size[i] > 256)
      fail(what + ": dimension " + std::to_string(i) + " has size " + std::to_string(shape[i]) + " and box " +
           std::to_string(meta.block_size[i]) + "; sizes must be >= 1 and boxes in [1, 256]");
    a.global_dim[rank - 1 - i] = static_cast<unsigned long long>(shape[i]);
    a.box_dim[rank - 1 - i] = static_cast<unsigned>(meta.block_size[i]);
    a.element_strides[i] = 1;
  }
  for (size_t i = 0; i + 1 < rank; ++i) {
    int64_t bytes = strides[i] * meta.elem_size;
    if (strides[i] < 1 || bytes % 16 != 0)
      fail(what + ": stride " + std::to_string(i) + " is " + std::to_string(strides[i]) + " elements (" +
           std::to_string(bytes) + " bytes); a tensor descriptor needs positive strides that are multiples of 16 "
           "bytes");
    a.global_strides[rank - 2 - i] = static_cast<unsigned long long>(bytes);
  }
  return a;
}

std::vector<uint8_t> encode_tma(const TmaEncodeArgs& a, const std::string& op) {
  const Driver& d = driver();
  CUtensorMap map;
  check(d.cuTensorMapEncodeTiled(&map, a.data_type, a.rank, reinterpret_cast<void*>(a.global_address),
                                 a.global_dim.data(), a.global_strides.data(), a.box_dim.data(),
                                 a.element_strides.data(), a.interleave, a.swizzle, a.l2_promotion, a.oob_fill),
        "cuTensorMapEncodeTiled", op);
  std::vector<uint8_t> out(sizeof map);
  std::memcpy(out.data(), &map, sizeof map);
  return out;
}

void launch(const KernelEntry& entry, int device, const std::array<int64_t, 3>& grid,
            const std::vector<ParamValue>& values, CUstream stream, const std::string& op) {
  for (int i = 0; i < 3; ++i)
    if (grid[i] < 0 || grid[i] > (i == 0 ? 0x7FFFFFFFll : 65535ll))
      fail(op + ": grid axis " + std::to_string(i) + " = " + std::to_string(grid[i]) + " is outside CUDA's limit");
  if (grid[0] * entry.num_ctas > 0x7FFFFFFFll)
    fail(op + ": grid axis 0 = " + std::to_string(grid[0]) + " programs of " + std::to_string(entry.num_ctas) +
         " CTAs is outside CUDA's limit");
  std::string where = op + " (" + entry.symbol + ")";
  std::vector<uint8_t> image = pack_params(entry.params, values, where);
  if (grid[0] * grid[1] * grid[2] == 0) return;
  const Driver& d = driver();
  CUfunction fn = function_for(entry, device, op);
  // kernelParams[i] points at parameter i's bytes; the driver copies as many bytes as the cubin declares for it,
  // so pointing into the packed image passes exactly the values pack_params wrote. The copy is 128-byte aligned
  // because a CUtensorMap parameter must be read from an address aligned like the type.
  struct alignas(128) Chunk { unsigned char b[128]; };
  std::vector<Chunk> aligned((image.size() + sizeof(Chunk) - 1) / sizeof(Chunk) + 1);
  auto* base = reinterpret_cast<unsigned char*>(aligned.data());
  std::memcpy(base, image.data(), image.size());
  std::vector<void*> params(entry.params.size());
  for (size_t i = 0; i < params.size(); ++i) params[i] = base + entry.params[i].offset;
  unsigned gx = static_cast<unsigned>(grid[0] * entry.num_ctas), gy = static_cast<unsigned>(grid[1]),
           gz = static_cast<unsigned>(grid[2]), block = 32u * static_cast<unsigned>(entry.num_warps);
  if (entry.num_ctas == 1 && !entry.launch_cooperative_grid && !entry.launch_pdl) {
    check(d.cuLaunchKernel(fn, gx, gy, gz, block, 1, 1, entry.shared_bytes, stream, params.data(), nullptr),
          "cuLaunchKernel", where);
    return;
  }
  CUlaunchAttribute attrs[3];
  std::memset(attrs, 0, sizeof attrs);
  unsigned n = 0;
  if (entry.num_ctas > 1) {
    attrs[n].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attrs[n].value.clusterDim.x = static_cast<unsigned>(entry.num_ctas);
    attrs[n].value.clusterDim.y = attrs[n].value.clusterDim.z = 1;
    ++n;
  }
  if (entry.launch_cooperative_grid) {
    attrs[n].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attrs[n++].value.cooperative = 1;
  }
  if (entry.launch_pdl) {
    attrs[n].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[n++].value.programmaticStreamSerializationAllowed = 1;
  }
  CUlaunchConfig config;
  std::memset(&config, 0, sizeof config);
  config.gridDimX = gx;
  config.gridDimY = gy;
  config.gridDimZ = gz;
  config.blockDimX = block;
  config.blockDimY = config.blockDimZ = 1;
  config.sharedMemBytes = entry.shared_bytes;
  config.hStream = stream;
  config.attrs = attrs;
  config.numAttrs = n;
  check(d.cuLaunchKernelEx(&config, fn, params.data(), nullptr), "cuLaunchKernelEx", where);
}

}  // namespace fastvit::cuda
