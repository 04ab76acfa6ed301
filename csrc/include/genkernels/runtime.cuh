// Host-side helpers shared by the .cu files: device properties, device selection, launch checks.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace genkernels {

struct DeviceInfo {
  int sms;         // streaming multiprocessors
  int l2_bytes;    // L2 cache size
  int smem_optin;  // largest dynamic shared memory one block may opt in to
};

// Properties of `device`, queried once and cached (no synchronization involved).
DeviceInfo device_info(int device);

// Makes `device` current for this module's (static) CUDA runtime. torch has already made the
// same primary context current; this keeps our runtime's own notion in step with it.
void use_device(int device);

// Raises (as a Python RuntimeError through pybind11) when the last launch failed.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("genkernels: launching ") + kernel + " failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace genkernels
