// The fastvit::* op schemas, defined here so that a process that loads only this library (an AOTInductor
// package run from C++ or from Python without fastvit_kernels) finds every op an exported FastViT calls.
// They are the schemas the Python package registers without this library; tests/csrc/test_library.py
// compares the two lists. When this library is loaded, fastvit_kernels attaches its fake (shape) functions,
// autograd formulas and Triton launchers to these definitions instead of defining the ops itself.
#include "fastvit.h"
#include "schemas.h"

STABLE_TORCH_LIBRARY(fastvit, m) {
  for (const char* schema : fastvit::kSchemas) m.def(schema);
}
