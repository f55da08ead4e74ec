// Run-time loading of the CUDA driver (driver.h says why there is no link-time dependency).
#include "driver.h"

#include <dlfcn.h>

#include <mutex>
#include <stdexcept>

namespace fastvit::cuda {

namespace {

constexpr const char* kNoDriver =
    "; the C++ CUDA launcher needs the NVIDIA driver (CPU tensors run the CPU kernels)";

struct Loaded {
  Driver driver{};
  std::string error;  // non-empty: loading failed, every driver() call rethrows it
};

// Looks up one entry point. Plain dlsym on the unversioned name is correct for every function used here: none of
// them has a _v2 ABI that cuda.h would redirect the name to, so the exported name is the documented signature.
template <typename Fn>
bool resolve(void* lib, const char* name, Fn& out, std::string& error) {
  out = reinterpret_cast<Fn>(dlsym(lib, name));
  if (out == nullptr) {
    const char* why = dlerror();
    error = std::string("fastvit_kernels._C: no CUDA driver: libcuda.so.1 has no ") + name + " (" +
            (why ? why : "symbol not found") + ")" + kNoDriver;
    return false;
  }
  return true;
}

void load(Loaded& state) {
  // RTLD_LOCAL: the driver's symbols stay out of the global namespace, where they could shadow another copy
  // that PyTorch or Triton resolved themselves. The handle is never closed: function pointers outlive any caller.
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    state.error = std::string("fastvit_kernels._C: no CUDA driver: dlopen(libcuda.so.1) failed: ") +
                  (why ? why : "unknown error") + kNoDriver;
    return;
  }
  Driver& d = state.driver;
  std::string& e = state.error;
  bool ok = resolve(lib, "cuInit", d.cuInit, e) && resolve(lib, "cuDriverGetVersion", d.cuDriverGetVersion, e) &&
            resolve(lib, "cuGetErrorString", d.cuGetErrorString, e) &&
            resolve(lib, "cuDeviceGet", d.cuDeviceGet, e) &&
            resolve(lib, "cuDeviceGetAttribute", d.cuDeviceGetAttribute, e) &&
            resolve(lib, "cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain, e) &&
            resolve(lib, "cuCtxGetCurrent", d.cuCtxGetCurrent, e) &&
            resolve(lib, "cuCtxSetCurrent", d.cuCtxSetCurrent, e) &&
            resolve(lib, "cuModuleLoadData", d.cuModuleLoadData, e) &&
            resolve(lib, "cuModuleGetFunction", d.cuModuleGetFunction, e) &&
            resolve(lib, "cuFuncSetAttribute", d.cuFuncSetAttribute, e) &&
            resolve(lib, "cuLaunchKernel", d.cuLaunchKernel, e) &&
            resolve(lib, "cuLaunchKernelEx", d.cuLaunchKernelEx, e) &&
            resolve(lib, "cuTensorMapEncodeTiled", d.cuTensorMapEncodeTiled, e);
  if (!ok) return;
  // cuInit is idempotent and PyTorch's runtime has usually called it already; an error here (no device, driver
  // older than the runtime) is reported as it is, since nothing can launch then.
  CUresult r = d.cuInit(0);
  if (r == CUDA_SUCCESS) r = d.cuDriverGetVersion(&d.version);
  if (r != CUDA_SUCCESS) {
    const char* text = nullptr;
    if (d.cuGetErrorString(r, &text) != CUDA_SUCCESS || text == nullptr) text = "unknown CUDA error";
    e = std::string("fastvit_kernels._C: cuInit(0) failed: ") + text + " (CUresult " + std::to_string(r) + ")" +
        kNoDriver;
  }
}

}  // namespace

const Driver& driver() {
  static Loaded state;
  static std::once_flag once;
  std::call_once(once, [] { load(state); });
  if (!state.error.empty()) throw std::runtime_error(state.error);
  return state.driver;
}

void check(CUresult result, const char* call, const std::string& op) {
  if (result == CUDA_SUCCESS) return;
  const char* text = nullptr;
  if (driver().cuGetErrorString(result, &text) != CUDA_SUCCESS || text == nullptr) text = "unknown CUDA error";
  throw std::runtime_error("fastvit_kernels._C: " + op + ": " + call + " failed: " + text + " (CUresult " +
                           std::to_string(result) + ")");
}

}  // namespace fastvit::cuda
