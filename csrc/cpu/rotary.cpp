// placeholder: implemented by the rotary kernel work
#include "ops.h"
#include <c10/util/Exception.h>
namespace fastgen::cpu {
}
