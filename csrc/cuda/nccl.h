// Tensor-parallel collectives on CUDA through NCCL (nccl.cu): a communicator per group, made
// from a unique id that rank 0 creates and the group's process group carries to the others.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace fastgen::cuda {

int64_t nccl_version();                 // NCCL's version code, e.g. 23007 for 2.30.7
at::Tensor nccl_unique_id();            // uint8 [128] CPU tensor
// On the current CUDA device; collective over the group's world_size processes. Returns a handle.
int64_t nccl_init(const at::Tensor& unique_id, int64_t world_size, int64_t rank);
void nccl_destroy(int64_t comm);
// On torch's current stream; x float32 / float16 / bfloat16, contiguous, on the comm's device.
void nccl_all_reduce(at::Tensor& x, int64_t comm);
// out [world_size * x.numel()] of x's dtype: rank r's x at r * x.numel().
void nccl_all_gather(at::Tensor& out, const at::Tensor& x, int64_t comm);

}  // namespace fastgen::cuda
