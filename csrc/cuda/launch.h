// Launching AOT-compiled Triton cubins (table.h) through the run-time-loaded driver (driver.h).
//
// Per (device, symbol) the cubin is loaded into the device's primary context once (cuModuleLoadData +
// cuModuleGetFunction, plus cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) when its dynamic shared memory needs
// the opt-in above 48 KiB) and cached for the process. A launch makes the primary context of the tensors' device
// current (the context PyTorch's CUDA runtime uses, so pointers and streams are shared) and launches on the given
// stream, normally PyTorch's current stream of that device (current_stream).
#pragma once

#include "driver.h"
#include "table.h"

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace fastvit::cuda {

// The loaded function of `entry` on device `device` (loading it on first use); the primary context of the device is
// current on return. Throws std::runtime_error naming `op` and the failing driver call.
CUfunction function_for(const KernelEntry& entry, int device, const std::string& op);

// PyTorch's current CUDA stream of `device` (aoti_torch_get_current_cuda_stream, resolved in the already-loaded
// libtorch_cuda at run time: the stable shim declares it only for CUDA builds, and a link-time reference would tie
// this library to libtorch_cuda). Throws std::runtime_error when PyTorch has no CUDA support loaded.
CUstream current_stream(int device, const std::string& op);

// The arguments of cuTensorMapEncodeTiled for one host tensor descriptor, computed as Triton's host-side
// TensorDescriptor encoder does: dimensions, box and strides reversed to innermost-first, strides in bytes without
// the innermost (which must be 1 element), element strides 1, no interleave, 128-byte L2 promotion, and the
// compile's swizzle. Pure: testable without a driver.
struct TmaEncodeArgs {
  int data_type = 0;  // the host CUtensorMapDataType
  unsigned rank = 0;
  uint64_t global_address = 0;
  std::array<unsigned long long, 5> global_dim{};
  std::array<unsigned long long, 5> global_strides{};  // rank - 1 used, bytes
  std::array<unsigned, 5> box_dim{};
  std::array<unsigned, 5> element_strides{};
  int interleave = CU_TENSOR_MAP_INTERLEAVE_NONE;
  int swizzle = 0;
  int l2_promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
  int oob_fill = CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE;
};

// Throws std::runtime_error (naming `what`) for a rank outside [1, 5], a shape / strides / box of another rank,
// an innermost stride other than 1, a byte stride that is not a multiple of 16, a base address not 16-byte
// aligned, or an im2col / fp4-padded descriptor (not produced by this package's kernels, so not encoded here).
TmaEncodeArgs tma_encode_args(const TensorDescMeta& meta, uint64_t base, const std::vector<int64_t>& shape,
                              const std::vector<int64_t>& strides, bool nan_padding, const std::string& what);

// Encodes a descriptor with the driver: the 128 bytes the kernel parameter takes.
std::vector<uint8_t> encode_tma(const TmaEncodeArgs& args, const std::string& op);

// Launches `entry` with grid (grid[0], grid[1], grid[2]) programs on `stream` of `device` (launch convention:
// table.h). `values` are the parameters in table order, the scratch pointers included (the caller allocates
// grid size * num_ctas * scratch bytes, or passes 0 when the table's size is 0). An empty grid launches nothing.
void launch(const KernelEntry& entry, int device, const std::array<int64_t, 3>& grid,
            const std::vector<ParamValue>& values, CUstream stream, const std::string& op);

}  // namespace fastvit::cuda
