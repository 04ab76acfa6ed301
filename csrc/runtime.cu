// Version and device queries of the statically linked CUDA runtime.
#include <mutex>
#include <string>
#include <unordered_map>

#include "genkernels/api.h"
#include "genkernels/runtime.cuh"

namespace genkernels {

std::string cuda_version() { return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10); }

std::string runtime_error() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it, or the next launch check would report it
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  if (count == 0) return "no CUDA device visible";
  return "";
}

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info{};
  const cudaError_t errs[3] = {
      cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device),
      cudaDeviceGetAttribute(&info.l2_bytes, cudaDevAttrL2CacheSize, device),
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
  };
  for (const cudaError_t err : errs) {
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error(std::string("genkernels: querying CUDA device ") + std::to_string(device) +
                               " failed: " + cudaGetErrorString(err));
    }
  }
  cache.emplace(device, info);
  return info;
}

void use_device(int device) {
  const cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("genkernels: selecting CUDA device ") + std::to_string(device) +
                             " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace genkernels
