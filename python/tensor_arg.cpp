#include "tensor_arg.h"

#include <sstream>

#include "common/device.h"
#include "dlpack_abi.h"

#if defined(CM3RT_EMU)
#include <sys/mman.h>

#include <cstring>

#include "emu.h"
#endif

namespace cm3rt::py_binding {

namespace {

DType convert_dtype(const dlpack::DataType& t, const std::string& name) {
  if (t.lanes == 1) {
    switch (t.code) {
      case dlpack::kFloat:
        if (t.bits == 32) return DType::kFloat32;
        if (t.bits == 16) return DType::kFloat16;
        if (t.bits == 64) return DType::kFloat64;
        break;
      case dlpack::kBfloat:
        if (t.bits == 16) return DType::kBFloat16;
        break;
      case dlpack::kInt:
        if (t.bits == 8) return DType::kInt8;
        if (t.bits == 32) return DType::kInt32;
        if (t.bits == 64) return DType::kInt64;
        break;
      case dlpack::kUInt:
        if (t.bits == 8) return DType::kUInt8;
        break;
      case dlpack::kBool:
        if (t.bits == 8) return DType::kBool;
        break;
    }
  }
  std::ostringstream s;
  s << "argument '" << name << "' has an element type cm3rt does not handle (DLPack code "
    << int(t.code) << ", " << int(t.bits) << " bits, " << t.lanes << " lanes)";
  throw py::type_error(s.str());
}

#if defined(CM3RT_EMU)
// The emulated device's memory for one tensor argument: its bytes (the extent its shape and
// strides reach) copied into a mapping of their own, between unmapped gaps, for the call.
// The copy is registered with the emulator as the one buffer this argument may reach, so an
// access past its ends hits nothing else (memcheck names it); it keeps the host pointer's
// alignment mod 256 (the launchers pick vector widths from it). When the call ends, bytes
// the kernels changed are copied back to the tensor.
struct EmuDeviceCopy {
  char* host;
  char* dev;
  size_t bytes;
  void* map;
  size_t map_bytes;
  int id;
  bool read_only;
  ~EmuDeviceCopy() {
    emu::unregister_buffer(id);
    if (!read_only && std::memcmp(host, dev, bytes) != 0) std::memcpy(host, dev, bytes);
    munmap(map, map_bytes);
  }
};

constexpr size_t kEmuGap = 64 * 1024;

void emu_device_copy(TensorArg& t) {
  int64_t lo = 0, hi = 0;
  for (int i = 0; i < t.rank(); ++i) {
    if (t.shape[i] == 0) return;  // no element: nothing to reach
    const int64_t span = (t.shape[i] - 1) * t.strides[i];
    (span < 0 ? lo : hi) += span;
  }
  const int64_t es = dtype_size(t.dtype);
  char* host = static_cast<char*>(t.data) + lo * es;
  const size_t bytes = size_t((hi - lo + 1) * es);
  const size_t inner = (bytes + 256 + 4095) & ~size_t(4095);
  const size_t map_bytes = inner + 2 * kEmuGap;
  void* m = mmap(nullptr, map_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("cm3rt._emu: cannot map device memory");
  mprotect(static_cast<char*>(m) + kEmuGap, inner, PROT_READ | PROT_WRITE);
  char* dev = static_cast<char*>(m) + kEmuGap + (reinterpret_cast<uintptr_t>(host) % 256);
  std::memcpy(dev, host, bytes);
  auto* copy = new EmuDeviceCopy{host, dev, bytes, m, map_bytes,
                                 emu::register_buffer(dev, bytes, t.name), t.read_only};
  t.data = dev - lo * es;
  py::capsule owner(copy, [](void* p) { delete static_cast<EmuDeviceCopy*>(p); });
  t.keep_alive = py::make_tuple(t.keep_alive, owner);
}
#endif

TensorArg from_dl(const dlpack::Tensor& dl, bool read_only, py::object keep,
                  const std::string& name) {
  TensorArg t;
  t.name = name;
  t.dtype = convert_dtype(dl.dtype, name);
  t.data = static_cast<char*>(dl.data) + dl.byte_offset;
#if defined(CM3RT_EMU)
  // cm3rt._emu: host memory is the emulated device's memory, so CPU tensors take the CUDA
  // path of every binding (validation, planning, launch) unchanged.
  if (dl.device.device_type != dlpack::kCPU)
    throw py::type_error("argument '" + name + "': the CUDA emulator (cm3rt._emu) takes CPU "
                         "tensors (its device memory is host memory)");
  t.device = DeviceKind::kCUDA;
#else
  switch (dl.device.device_type) {
    case dlpack::kCPU:
    case dlpack::kCUDAHost: t.device = DeviceKind::kCPU; break;
    case dlpack::kCUDA:
    case dlpack::kCUDAManaged: t.device = DeviceKind::kCUDA; break;
    default:
      throw py::type_error("argument '" + name + "' lives on an unsupported device (DLPack type " +
                           std::to_string(dl.device.device_type) + "); cm3rt takes CPU or CUDA");
  }
#endif
  t.device_id = dl.device.device_id;
  t.read_only = read_only;
  t.shape.assign(dl.shape, dl.shape + dl.ndim);
  t.strides.resize(dl.ndim);
  if (dl.strides) {
    t.strides.assign(dl.strides, dl.strides + dl.ndim);
  } else {
    int64_t s = 1;
    for (int i = dl.ndim - 1; i >= 0; --i) { t.strides[i] = s; s *= dl.shape[i]; }
  }
  t.keep_alive = std::move(keep);
#if defined(CM3RT_EMU)
  emu_device_copy(t);
#endif
  return t;
}

}  // namespace

int64_t TensorArg::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

bool TensorArg::contiguous() const {
  int64_t s = 1;
  for (int i = rank() - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != s) return false;
    s *= shape[i];
  }
  return true;
}

std::string TensorArg::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string TensorArg::device_str() const {
  return is_cuda() ? "cuda:" + std::to_string(device_id) : "cpu";
}

TensorArg import_tensor(py::handle obj, const std::string& name) {
  py::object capsule;
  if (PyCapsule_CheckExact(obj.ptr())) {
    capsule = py::reinterpret_borrow<py::object>(obj);
  } else if (py::hasattr(obj, "__dlpack__")) {
    capsule = obj.attr("__dlpack__")();
  } else {
    throw py::type_error("argument '" + name + "' must be a tensor (torch, numpy, cupy or a "
                         "DLPack capsule), got " + std::string(py::str(py::type::of(obj))));
  }
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, "dltensor")) {
    auto* mt = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
    // Keep the producer alive too: the capsule alone does not own the memory once consumed.
    return from_dl(mt->dl_tensor, false, capsule, name);
  }
  if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    auto* mt = static_cast<dlpack::ManagedTensorVersioned*>(
        PyCapsule_GetPointer(cap, "dltensor_versioned"));
    if (mt->version.major != 1)
      throw py::type_error("argument '" + name + "': unsupported DLPack major version " +
                           std::to_string(mt->version.major));
    return from_dl(mt->dl_tensor, (mt->flags & dlpack::kFlagReadOnly) != 0, capsule, name);
  }
  throw py::type_error("argument '" + name + "': not a usable DLPack capsule (already consumed?)");
}

bool import_optional(py::handle obj, const std::string& name, TensorArg& out) {
  if (obj.is_none()) return false;
  out = import_tensor(obj, name);
  return true;
}

void fail_value(const std::string& op, const std::string& msg) {
  throw py::value_error(op + ": " + msg);
}
void fail_type(const std::string& op, const std::string& msg) {
  throw py::type_error(op + ": " + msg);
}

void check_dtype(const std::string& op, const TensorArg& t, std::initializer_list<DType> ok) {
  std::string names;
  for (DType d : ok) {
    if (d == t.dtype) return;
    names += (names.empty() ? "" : " or ") + std::string(dtype_name(d));
  }
  fail_type(op, "argument '" + t.name + "' must be " + names + ", got " + dtype_name(t.dtype));
}

void check_rank(const std::string& op, const TensorArg& t, int rank, const char* layout) {
  if (t.rank() != rank)
    fail_value(op, "argument '" + t.name + "' must have " + std::to_string(rank) + " dims " +
                       layout + ", got shape " + t.shape_str());
}

void check_shape(const std::string& op, const TensorArg& t, std::vector<int64_t> expected,
                 const char* layout) {
  bool ok = t.rank() == int(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] < 0 || expected[i] == t.shape[i];
  if (ok) return;
  std::string e = "[";
  for (size_t i = 0; i < expected.size(); ++i)
    e += (i ? ", " : "") + (expected[i] < 0 ? std::string("*") : std::to_string(expected[i]));
  fail_value(op, "argument '" + t.name + "' must have shape " + layout + " = " + e + "], got " +
                     t.shape_str());
}

void check_last_dim_contiguous(const std::string& op, const TensorArg& t) {
  if (t.rank() > 0 && t.shape.back() > 1 && t.strides.back() != 1)
    fail_value(op, "argument '" + t.name + "' must have a contiguous last dimension (stride 1), got "
                   "stride " + std::to_string(t.strides.back()));
}

void check_contiguous(const std::string& op, const TensorArg& t) {
  if (!t.contiguous())
    fail_value(op, "argument '" + t.name + "' must be contiguous (shape " + t.shape_str() + ")");
}

void check_writable(const std::string& op, const TensorArg& t) {
  if (t.read_only) fail_value(op, "argument '" + t.name + "' is read-only but is written by the op");
}

void check_same_device(const std::string& op, const TensorArg& a, const TensorArg& b) {
  if (a.device != b.device || a.device_id != b.device_id)
    fail_value(op, "arguments '" + a.name + "' and '" + b.name + "' must be on the same device, got " +
                       a.device_str() + " and " + b.device_str());
}

void check_same_dtype(const std::string& op, const TensorArg& a, const TensorArg& b) {
  if (a.dtype != b.dtype)
    fail_type(op, "arguments '" + a.name + "' and '" + b.name + "' must have the same dtype, got " +
                      dtype_name(a.dtype) + " and " + dtype_name(b.dtype));
}

int checked_int(const std::string& op, const TensorArg& t, int dim) {
  const int64_t v = t.shape.at(dim);
  if (v > INT32_MAX)
    fail_value(op, "argument '" + t.name + "' dim " + std::to_string(dim) + " = " +
                       std::to_string(v) + " exceeds the int32 range the kernels index with");
  return int(v);
}

void check_device_supported(const std::string& op, const TensorArg& t) {
  if (t.is_cuda() && !built_with_cuda())
    fail_value(op, "argument '" + t.name + "' is a CUDA tensor but cm3rt was built without CUDA "
                   "(rebuild with nvcc on PATH and without CM3RT_CPU_ONLY)");
}

}  // namespace cm3rt::py_binding
