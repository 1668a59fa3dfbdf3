// The extension module sbfast._C. It exposes no Python functions: importing it runs the
// static TORCH_LIBRARY_IMPL registrations that live beside each kernel (csrc/cpu, csrc/cuda).
// The op schemas themselves are defined in Python (sbfast/registry.py) so that the ops exist
// even where this module failed to build.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "sbfast C++/CUDA kernels (registered with the PyTorch dispatcher on import)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
