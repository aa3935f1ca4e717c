// A Python module with no functions: importing it loads the shared library, whose static
// initialisers register the ops with the PyTorch dispatcher (torch.ops.anydepth.*).
#pragma once
#include <Python.h>

#define ANYDEPTH_PY_MODULE(name)                                                  \
  static struct PyModuleDef name##_def = {PyModuleDef_HEAD_INIT, #name,           \
                                          "anydepth compiled ops", -1, nullptr};  \
  PyMODINIT_FUNC PyInit_##name(void) { return PyModule_Create(&name##_def); }
