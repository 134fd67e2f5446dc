// PLACEHOLDER (to be replaced by the real attention kernels)
#include <c10/util/Exception.h>
#include "ops.h"
namespace fastgen::cpu {
void attention(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, std::optional<int64_t>, std::optional<int64_t>) { TORCH_CHECK(false, "not implemented yet"); }
}  // namespace fastgen::cpu
