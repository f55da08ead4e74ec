// The CUDA driver API, resolved at run time.
//
// fastvit_kernels._C must build and load on machines without the NVIDIA driver (CPU-only CI, the CPU kernels), and
// setup.py links with -Wl,--no-undefined, so nothing here may reference a driver symbol at link time and cuda.h is
// not included: the handful of types, enum values and prototypes the launcher uses are declared below with the
// values the CUDA driver API documents (they are part of its stable ABI), and the functions are looked up in
// libcuda.so.1 on first use (driver()).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fastvit::cuda {

// ---- driver API types (cuda.h spells them the same; only what the launcher touches) --------------------------------
using CUresult = int;  // an enum in cuda.h; 0 is CUDA_SUCCESS
using CUdevice = int;
using CUdeviceptr = unsigned long long;  // 64-bit builds only
struct CUctx_st;
using CUcontext = CUctx_st*;
struct CUmod_st;
using CUmodule = CUmod_st*;
struct CUfunc_st;
using CUfunction = CUfunc_st*;
struct CUstream_st;
using CUstream = CUstream_st*;  // the same handle as the CUDA runtime's cudaStream_t

constexpr CUresult CUDA_SUCCESS = 0;

// CUtensorMap: an opaque 128-byte TMA descriptor encoded on the host and passed by value. CUDA 12 headers align it
// to 64 bytes, CUDA 13 to 128; the kernel parameter it is copied into is 64-aligned (kernels.json), and the
// encoder only needs a 64-aligned destination.
struct alignas(64) CUtensorMap {
  unsigned long long opaque[16];
};
static_assert(sizeof(CUtensorMap) == 128 && alignof(CUtensorMap) == 64, "CUtensorMap is 128 bytes aligned to 64");

// CUfunction_attribute values
constexpr int CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;
// CUdevice_attribute values
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;
constexpr int CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;
constexpr int CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14;

// CUlaunchAttributeID values
constexpr int CU_LAUNCH_ATTRIBUTE_COOPERATIVE = 2;
constexpr int CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4;
constexpr int CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6;

// CUtensorMapDataType values (the host enum; Triton's compile metadata uses a device numbering that differs for
// 8 / 9 / 10, see tma.cpp)
constexpr int CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0;
constexpr int CU_TENSOR_MAP_DATA_TYPE_FLOAT32 = 7;
constexpr int CU_TENSOR_MAP_DATA_TYPE_TFLOAT32 = 11;
// CUtensorMapInterleave / L2promotion / FloatOOBfill values
constexpr int CU_TENSOR_MAP_INTERLEAVE_NONE = 0;
constexpr int CU_TENSOR_MAP_L2_PROMOTION_L2_128B = 2;
constexpr int CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0;
constexpr int CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA = 1;

// CUlaunchAttributeValue is a 64-byte union in cuda.h; the launcher sets only the cluster dimension or a flag.
union CUlaunchAttributeValue {
  char pad[64];
  struct {
    unsigned x, y, z;
  } clusterDim;
  int cooperative;
  int programmaticStreamSerializationAllowed;
};
struct CUlaunchAttribute {
  int id;  // CUlaunchAttributeID
  char pad[8 - sizeof(int)];
  CUlaunchAttributeValue value;
};
static_assert(sizeof(CUlaunchAttribute) == 72, "CUlaunchAttribute layout of the driver API");
struct CUlaunchConfig {
  unsigned gridDimX, gridDimY, gridDimZ;
  unsigned blockDimX, blockDimY, blockDimZ;
  unsigned sharedMemBytes;
  CUstream hStream;
  CUlaunchAttribute* attrs;
  unsigned numAttrs;
};

// The driver entry points the launcher calls (signatures as documented in the CUDA driver API reference).
struct Driver {
  CUresult (*cuInit)(unsigned flags);
  CUresult (*cuDriverGetVersion)(int* version);
  CUresult (*cuGetErrorString)(CUresult error, const char** text);
  CUresult (*cuDeviceGet)(CUdevice* device, int ordinal);
  CUresult (*cuDeviceGetAttribute)(int* value, int attribute, CUdevice device);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext* ctx, CUdevice device);
  CUresult (*cuCtxGetCurrent)(CUcontext* ctx);
  CUresult (*cuCtxSetCurrent)(CUcontext ctx);
  CUresult (*cuModuleLoadData)(CUmodule* module, const void* image);
  CUresult (*cuModuleGetFunction)(CUfunction* function, CUmodule module, const char* name);
  CUresult (*cuFuncSetAttribute)(CUfunction function, int attribute, int value);
  CUresult (*cuLaunchKernel)(CUfunction f, unsigned gridDimX, unsigned gridDimY, unsigned gridDimZ,
                             unsigned blockDimX, unsigned blockDimY, unsigned blockDimZ, unsigned sharedMemBytes,
                             CUstream stream, void** kernelParams, void** extra);
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig* config, CUfunction f, void** kernelParams, void** extra);
  CUresult (*cuTensorMapEncodeTiled)(CUtensorMap* tensorMap, int dataType, unsigned rank, void* globalAddress,
                                     const unsigned long long* globalDim, const unsigned long long* globalStrides,
                                     const unsigned* boxDim, const unsigned* elementStrides, int interleave,
                                     int swizzle, int l2Promotion, int oobFill);
  int version = 0;  // cuDriverGetVersion: 1000 * major + 10 * minor
};

// The loaded driver with cuInit(0) done (once per process, thread-safe). Throws std::runtime_error (a Python
// RuntimeError through the stable ABI) when libcuda.so.1 cannot be opened, lacks an entry point, or cuInit fails.
const Driver& driver();

// Throws std::runtime_error "fastvit_kernels._C: <op>: <call> failed: <CUDA error name and text> (CUresult N)"
// unless result is CUDA_SUCCESS.
void check(CUresult result, const char* call, const std::string& op);

}  // namespace fastvit::cuda
