// Tensor-parallel collectives on CUDA through NCCL's C API: the GPU backend of fastgen's
// tensor-parallel group (python/fastgen/distributed.py).
//
// libnccl.so.2 is opened at run time (dlopen; torch's own wheel ships it and torch has usually
// loaded it already, so this finds the same copy), never linked: a build, or a CPU-only machine,
// needs no NCCL. The few types the calls use are declared here as NCCL's ABI defines them
// (nccl.h: ncclUniqueId is 128 bytes, ncclComm_t an opaque pointer, the enums' values fixed since
// NCCL 2.0; ncclBfloat16 since 2.10).
//
// Bootstrap: rank 0 makes a unique id (nccl_unique_id), the group's process group carries its
// 128 bytes to the others, and every rank calls nccl_init with it on its own device. The
// collectives run on torch's current stream, so they order with the model's kernels and can be
// captured in a CUDA graph (NCCL >= 2.9; every rank must capture the same calls).
#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "cuda/nccl.h"

namespace fastgen::cuda {

namespace {

// NCCL's ABI (nccl.h).
struct ncclUniqueId {
  char internal[128];
};
using ncclComm_t = struct ncclComm*;
using ncclResult_t = int;  // ncclSuccess = 0
constexpr ncclResult_t kNcclSuccess = 0;
constexpr int kNcclSum = 0;
constexpr int kNcclFloat16 = 6, kNcclFloat32 = 7, kNcclBfloat16 = 9, kNcclUint8 = 1;

struct Nccl {
  ncclResult_t (*get_version)(int*);
  ncclResult_t (*get_unique_id)(ncclUniqueId*);
  ncclResult_t (*comm_init_rank)(ncclComm_t*, int, ncclUniqueId, int);
  ncclResult_t (*all_reduce)(const void*, void*, size_t, int, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*all_gather)(const void*, void*, size_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*comm_destroy)(ncclComm_t);
  const char* (*get_error_string)(ncclResult_t);
};

template <typename F>
void resolve(void* library, const char* name, F*& fn) {
  fn = reinterpret_cast<F*>(dlsym(library, name));
  TORCH_CHECK(fn != nullptr, "NCCL: libnccl.so.2 has no ", name);
}

const Nccl& nccl() {
  static const Nccl api = [] {
    void* library = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
    TORCH_CHECK(library != nullptr, "NCCL: cannot load libnccl.so.2 (", dlerror(),
                "); it comes with torch's CUDA wheels (nvidia-nccl-cu13)");
    Nccl n{};
    resolve(library, "ncclGetVersion", n.get_version);
    resolve(library, "ncclGetUniqueId", n.get_unique_id);
    resolve(library, "ncclCommInitRank", n.comm_init_rank);
    resolve(library, "ncclAllReduce", n.all_reduce);
    resolve(library, "ncclAllGather", n.all_gather);
    resolve(library, "ncclCommDestroy", n.comm_destroy);
    resolve(library, "ncclGetErrorString", n.get_error_string);
    return n;
  }();
  return api;
}

void check(ncclResult_t result, const char* what) {
  TORCH_CHECK(result == kNcclSuccess, "NCCL ", what, " failed: ", nccl().get_error_string(result));
}

int nccl_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kNcclFloat32;
    case at::kHalf: return kNcclFloat16;
    case at::kBFloat16: return kNcclBfloat16;
    default: TORCH_CHECK(false, "NCCL collectives take float32, float16 or bfloat16, got ", type);
  }
}

struct Communicator {
  ncclComm_t comm;
  int world_size, rank, device;
};

std::mutex registry_mutex;
std::vector<std::unique_ptr<Communicator>>& registry() {
  static std::vector<std::unique_ptr<Communicator>> comms;
  return comms;
}

Communicator& comm_at(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& comms = registry();
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(comms.size()) && comms[handle],
              "NCCL communicator ", handle, " does not exist (destroyed, or never made)");
  return *comms[handle];
}

void check_on_device(const char* op, const at::Tensor& t, const Communicator& c) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), op, ": tensors must be contiguous CUDA tensors");
  TORCH_CHECK(t.get_device() == c.device, op, ": the communicator is on cuda:", c.device,
              ", the tensor on cuda:", t.get_device());
}

}  // namespace

int64_t nccl_version() {
  int version = 0;
  check(nccl().get_version(&version), "ncclGetVersion");
  return version;
}

at::Tensor nccl_unique_id() {
  ncclUniqueId id;
  check(nccl().get_unique_id(&id), "ncclGetUniqueId");
  at::Tensor out = at::empty({static_cast<int64_t>(sizeof(id))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(out.data_ptr(), &id, sizeof(id));
  return out;
}

int64_t nccl_init(const at::Tensor& unique_id, int64_t world_size, int64_t rank) {
  TORCH_CHECK(unique_id.device().is_cpu() && unique_id.scalar_type() == at::kByte &&
                  unique_id.numel() == static_cast<int64_t>(sizeof(ncclUniqueId)) && unique_id.is_contiguous(),
              "nccl_init: unique_id must be nccl_unique_id()'s uint8 [128] CPU tensor");
  TORCH_CHECK(world_size >= 1 && rank >= 0 && rank < world_size, "nccl_init: rank ", rank,
              " is outside a group of ", world_size);
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data_ptr(), sizeof(id));
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  auto c = std::make_unique<Communicator>(Communicator{nullptr, static_cast<int>(world_size), static_cast<int>(rank), device});
  check(nccl().comm_init_rank(&c->comm, c->world_size, id, c->rank), "ncclCommInitRank");
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry().push_back(std::move(c));
  return static_cast<int64_t>(registry().size()) - 1;
}

void nccl_destroy(int64_t handle) {
  std::unique_ptr<Communicator> c;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& comms = registry();
    TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(comms.size()) && comms[handle],
                "NCCL communicator ", handle, " does not exist (destroyed, or never made)");
    c = std::move(comms[handle]);
  }
  check(nccl().comm_destroy(c->comm), "ncclCommDestroy");
}

void nccl_all_reduce(at::Tensor& x, int64_t handle) {
  Communicator& c = comm_at(handle);
  check_on_device("nccl_all_reduce", x, c);
  const c10::cuda::CUDAGuard guard(x.device());
  check(nccl().all_reduce(x.data_ptr(), x.data_ptr(), static_cast<size_t>(x.numel()), nccl_dtype(x.scalar_type()),
                          kNcclSum, c.comm, c10::cuda::getCurrentCUDAStream()),
        "ncclAllReduce");
}

void nccl_all_gather(at::Tensor& out, const at::Tensor& x, int64_t handle) {
  Communicator& c = comm_at(handle);
  check_on_device("nccl_all_gather", x, c);
  check_on_device("nccl_all_gather", out, c);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "nccl_all_gather: out dtype ", out.scalar_type(),
              " != x dtype ", x.scalar_type());
  TORCH_CHECK(out.numel() == c.world_size * x.numel(), "nccl_all_gather: out must hold ", c.world_size, " x ",
              x.numel(), " elements, got ", out.numel());
  const c10::cuda::CUDAGuard guard(x.device());
  // Bytes: any dtype gathers, rank r's x at r * x.nbytes().
  check(nccl().all_gather(x.data_ptr(), out.data_ptr(), static_cast<size_t>(x.nbytes()), kNcclUint8, c.comm,
                          c10::cuda::getCurrentCUDAStream()),
        "ncclAllGather");
}

}  // namespace fastgen::cuda
