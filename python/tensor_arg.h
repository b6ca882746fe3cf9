// Tensor arguments of the bindings: any DLPack producer (a capsule, or an object with
// __dlpack__: torch, numpy, cupy) imported as a TensorArg, plus the validation helpers that
// turn a wrong argument into a ValueError / TypeError naming it, the expectation and what
// came. Nothing here takes ownership: the producer keeps the memory alive for the call.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace cm3rt::py_binding {

namespace py = pybind11;

enum class DeviceKind { kCPU, kCUDA };

struct TensorArg {
  std::string name;           // the argument's name, for messages
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  DeviceKind device = DeviceKind::kCPU;
  int device_id = 0;
  bool read_only = false;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // elements
  py::object keep_alive;         // the capsule (or the producer) for the call's duration

  int64_t dim(int i) const { return shape.at(i); }
  int rank() const { return int(shape.size()); }
  int64_t numel() const;
  bool is_cuda() const { return device == DeviceKind::kCUDA; }
  bool contiguous() const;
  std::string shape_str() const;
  std::string device_str() const;
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
};

// Imports `obj` (a DLPack capsule, or an object with __dlpack__). Raises TypeError if `obj`
// is neither, and for element types cm3rt has no kernel type for.
TensorArg import_tensor(py::handle obj, const std::string& name);
// None -> false (no tensor); otherwise imports into `out` and returns true.
bool import_optional(py::handle obj, const std::string& name, TensorArg& out);

// ---- validation; each raises ValueError / TypeError with `op: argument 'name' ...` ----
[[noreturn]] void fail_value(const std::string& op, const std::string& msg);
[[noreturn]] void fail_type(const std::string& op, const std::string& msg);

void check_dtype(const std::string& op, const TensorArg& t, std::initializer_list<DType> ok);
void check_rank(const std::string& op, const TensorArg& t, int rank, const char* layout);
// -1 in `expected` = any size; `layout` like "[T, H, D]" names the dims for the message.
void check_shape(const std::string& op, const TensorArg& t, std::vector<int64_t> expected,
                 const char* layout);
void check_last_dim_contiguous(const std::string& op, const TensorArg& t);
void check_contiguous(const std::string& op, const TensorArg& t);
void check_writable(const std::string& op, const TensorArg& t);
void check_same_device(const std::string& op, const TensorArg& a, const TensorArg& b);
void check_same_dtype(const std::string& op, const TensorArg& a, const TensorArg& b);
// A dimension that must fit an int32 index.
int checked_int(const std::string& op, const TensorArg& t, int dim);

// The CUDA stream for a call on `t`: the given handle (0 = legacy default stream).
inline void* stream_ptr(std::uintptr_t handle) { return reinterpret_cast<void*>(handle); }

// Raises if `t` is a CUDA tensor but the module was built without CUDA.
void check_device_supported(const std::string& op, const TensorArg& t);

}  // namespace cm3rt::py_binding
