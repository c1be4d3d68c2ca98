// The one Python function of sparsekern._C: the check a layer's cached call (sparsekern/nn.py,
// _KeptCall) passes before each eval forward, in one C call. Written in Python it read five
// attributes and each weight tensor's version counter, about 1 us a layer, which on the small
// layers of the demo's MLP was most of what separated a SparseLinear from an nn.Linear (issue
// 31: a fixed cost near F.linear's). It decides exactly what the Python check decides; nn.py
// keeps that one for a build without this file and tests compare the two.
#include <Python.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/grad_mode.h>

#include "kept_call_check.h"

namespace sparsekern {
namespace {

// The fields of nn.py's _KeptCall that the check reads, by position. nn.py uses this function
// only when _KeptCall._fields starts with KEPT_CALL_FIELDS (a test asserts that it does).
enum KeptField { kCall, kDtype, kDevice, kTensors, kVersions, kHasBias, kFieldCount };
constexpr const char* kFieldNames[kFieldCount] = {"call", "dtype", "device", "tensors", "versions", "has_bias"};

bool versions_unchanged(PyObject* tensors, PyObject* versions) {
  if (!PyTuple_Check(tensors) || !PyTuple_Check(versions) || PyTuple_GET_SIZE(tensors) != PyTuple_GET_SIZE(versions))
    return false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tensors); ++i) {
    PyObject* t = PyTuple_GET_ITEM(tensors, i);
    if (!THPVariable_Check(t)) return false;
    const long long kept_version = PyLong_AsLongLong(PyTuple_GET_ITEM(versions, i));
    if (kept_version == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    try {
      if (THPVariable_Unpack(t)._version() != kept_version) return false;
    } catch (const c10::Error&) {  // an inference tensor counts no versions: never kept
      return false;
    }
  }
  return true;
}

// kept_call_fresh(kept, x, bias) -> bool: True when `kept` may run x now: x has the dtype and
// device the call was made for, no weight tensor was edited in place since, and no gradient is
// wanted (grad mode on and x or the bias needing one). The shape is the cache's key.
PyObject* kept_call_fresh(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "kept_call_fresh(kept, x, bias) takes 3 arguments");
    return nullptr;
  }
  PyObject* kept = args[0];
  PyObject* x = args[1];
  PyObject* bias = args[2];
  if (!PyTuple_Check(kept) || PyTuple_GET_SIZE(kept) < kFieldCount) {
    PyErr_SetString(PyExc_TypeError, "kept_call_fresh: kept must be a _KeptCall");
    return nullptr;
  }
  if (!THPVariable_Check(x)) Py_RETURN_FALSE;
  const at::Tensor& xt = THPVariable_Unpack(x);
  PyObject* dtype = PyTuple_GET_ITEM(kept, kDtype);
  PyObject* device = PyTuple_GET_ITEM(kept, kDevice);
  if (!THPDtype_Check(dtype) || reinterpret_cast<THPDtype*>(dtype)->scalar_type != xt.scalar_type())
    Py_RETURN_FALSE;
  if (!THPDevice_Check(device) || reinterpret_cast<THPDevice*>(device)->device != xt.device()) Py_RETURN_FALSE;
  if (!versions_unchanged(PyTuple_GET_ITEM(kept, kTensors), PyTuple_GET_ITEM(kept, kVersions))) Py_RETURN_FALSE;
  if (at::GradMode::is_enabled()) {
    if (xt.requires_grad()) Py_RETURN_FALSE;
    if (PyObject_IsTrue(PyTuple_GET_ITEM(kept, kHasBias)) == 1 && bias != Py_None) {
      if (!THPVariable_Check(bias) || THPVariable_Unpack(bias).requires_grad()) Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"kept_call_fresh", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(kept_call_fresh)),
     METH_FASTCALL, "kept_call_fresh(kept, x, bias) -> bool: may the layer's cached call run x now"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* python_methods() { return methods; }

int add_python_constants(PyObject* module) {
  PyObject* fields = PyTuple_New(kFieldCount);
  if (fields == nullptr) return -1;
  for (int i = 0; i < kFieldCount; ++i) PyTuple_SET_ITEM(fields, i, PyUnicode_FromString(kFieldNames[i]));
  return PyModule_AddObject(module, "KEPT_CALL_FIELDS", fields);  // steals the reference on success
}

}  // namespace sparsekern
