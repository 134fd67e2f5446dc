// placeholder
#include "ops.h"
namespace fastgen::cuda {
}
