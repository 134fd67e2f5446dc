// Tensor-parallel collectives between the processes of one host through POSIX shared memory: the
// CPU backend of fastgen's tensor-parallel group (python/fastgen/distributed.py). A gloo
// all-reduce costs about a millisecond even for a few KB on a small machine; this is a memcpy, a
// flag, and a sum.
//
// One segment per group, created by rank 0 and mapped by every rank: a header (the ranks' pids),
// then per rank a 64-byte-aligned stamp and two data buffers of buffer_bytes. A collective copies
// the rank's chunk into its buffer (alternating between the two), publishes the call's number in
// its stamp, waits for every peer's stamp to reach it, then reads all ranks' buffers. The double
// buffer makes this safe without a second barrier: a rank writes a buffer again two calls later,
// after it has seen every peer start the call in between, which they do only after reading it.
// Larger tensors go through in chunks of buffer_bytes.
//
// all_reduce sums in float32 over the ranks in rank order on every rank, so all ranks hold
// bitwise the same result (what keeps their greedy choices and caches identical). Waits are
// bounded: a peer whose process has exited, or that does not arrive within timeout_s, gives a
// clear error on every rank still waiting, never a hang.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/core/Tensor.h>

namespace fastgen::cpu {

// Ops on a group made by shm_group_init (its handle). The collectives are collective: every rank
// calls them in the same order with tensors of the same shape and dtype.
int64_t shm_group_init(std::string_view name, int64_t world_size, int64_t rank, int64_t buffer_bytes,
                       double timeout_s);
void shm_group_destroy(int64_t group);
// x: float32 / float16 / bfloat16, contiguous; summed in place.
void shm_all_reduce(at::Tensor& x, int64_t group);
// out: [world_size * x.numel()] elements of x's dtype, contiguous: rank r's x at r * x.numel().
void shm_all_gather(at::Tensor& out, const at::Tensor& x, int64_t group);
void shm_barrier(int64_t group);
// Rank 0's payload (uint8 [n]; the others pass any, e.g. an empty one) on every rank. patient:
// the other ranks wait for rank 0 without a time limit (a worker waiting for the next step).
at::Tensor shm_broadcast_bytes(const at::Tensor& payload, int64_t group, bool patient);

}  // namespace fastgen::cpu
