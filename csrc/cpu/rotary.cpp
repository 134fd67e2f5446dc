// PLACEHOLDER (to be replaced by the real rotary kernels)
#include <c10/util/Exception.h>
#include "ops.h"
namespace fastgen::cpu {
void rotary_embedding(const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, const at::Tensor&, bool) { TORCH_CHECK(false, "not implemented yet"); }
}  // namespace fastgen::cpu
