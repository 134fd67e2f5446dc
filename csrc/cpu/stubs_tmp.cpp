#include "ops.h"
#include <c10/util/Exception.h>
namespace fastgen::cpu {
void silu_and_mul(at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "todo"); }
void rotary_embedding(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, const at::Tensor&, bool) { TORCH_CHECK(false, "todo"); }
void reshape_and_cache(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "todo"); }
void attention(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, std::optional<int64_t>, std::optional<int64_t>) { TORCH_CHECK(false, "todo"); }
}
#ifdef FASTGEN_WITH_CUDA
namespace fastgen::cuda {
void silu_and_mul(at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "todo"); }
void rotary_embedding(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, const at::Tensor&, bool) { TORCH_CHECK(false, "todo"); }
void reshape_and_cache(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) { TORCH_CHECK(false, "todo"); }
void attention(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, std::optional<int64_t>, std::optional<int64_t>) { TORCH_CHECK(false, "todo"); }
}
#endif
