// run_pt2: runs an AOTInductor package of an exported FastViT from C++, in a process with no Python, where the
// only fastvit_kernels code is the op library _C (README, "Deployment"). Not part of _C (setup.py builds
// csrc/ without csrc/tools/); tests/csrc/test_run_pt2.py compiles it against libtorch and runs it.
//
//   run_pt2 LIBRARY PACKAGE BATCH IMG
//
// LIBRARY: path of fastvit_kernels' _C; PACKAGE: the .pt2; the input is (BATCH, 3, IMG, IMG) float32 with pixel
// i (row-major) = sin(0.001 * i), so a caller can rebuild it. Prints the logits, one image per line.
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s LIBRARY PACKAGE BATCH IMG\n", argv[0]);
    return 2;
  }
  // the package calls fastvit::* ops through the dispatcher: their schemas and kernels come from _C, whose
  // static registrations run when it is loaded
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "run_pt2: cannot load %s: %s\n", argv[1], dlerror());
    return 1;
  }
  const int64_t batch = std::atoll(argv[3]), img = std::atoll(argv[4]);
  at::Tensor x = at::sin(at::arange(batch * 3 * img * img, at::kFloat).mul(0.001)).reshape({batch, 3, img, img});
  torch::inductor::AOTIModelPackageLoader loader(argv[2]);
  std::vector<at::Tensor> out = loader.run({x});
  at::Tensor logits = out.at(0).contiguous();
  for (int64_t b = 0; b < logits.size(0); ++b) {
    for (int64_t j = 0; j < logits.size(1); ++j)
      std::printf("%s%.9g", j ? " " : "", logits[b][j].item<float>());
    std::printf("\n");
  }
  return 0;
}
