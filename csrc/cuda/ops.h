// The CUDA launch layer's entry point for C++ callers (the fastvit_csrc::launch op and the plan kernels of
// plans.cpp): one launch of a table row, with the argument convention of ops.cpp.
#pragma once

#include "../fastvit.h"
#include "table.h"

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace fastvit::cuda {

// Launches the table row `entry` (load_table / find_entry) with grid `grid` on PyTorch's current stream of the
// tensors' CUDA device. The parameters are filled from `tensors` (pointers and descriptor bases), `ints` and `floats`
// in table order (ops.cpp's convention); Triton's scratch buffers are allocated here. Throws (naming `op`) on a list
// that does not fit the row, tensors not all on one CUDA device, no driver, or a driver error.
void launch_entry(const KernelEntry& entry, const std::array<int64_t, 3>& grid, const std::vector<Tensor>& tensors,
                  const std::vector<int64_t>& ints, const std::vector<double>& floats, const std::string& op);

// The parameter buffer launch_entry would hand cuLaunchKernel for these lists (tensor descriptors as 128 zero bytes:
// encoding one needs the driver; scratch pointers 0): everything a launch does on the host before the driver
// call, for measuring that cost where no GPU is (the plan kernels' dry run). Throws as launch_entry does for lists
// that do not fit the row.
std::vector<uint8_t> pack_entry(const KernelEntry& entry, const std::vector<Tensor>& tensors,
                                const std::vector<int64_t>& ints, const std::vector<double>& floats,
                                const std::string& op);

}  // namespace fastvit::cuda
