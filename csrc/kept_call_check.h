// sparsekern._C's Python functions and constants (kept_call_check.cpp).
#pragma once
#include <Python.h>

namespace sparsekern {
PyMethodDef* python_methods();
int add_python_constants(PyObject* module);  // 0, or -1 with a Python exception set
}  // namespace sparsekern
