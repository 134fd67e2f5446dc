// See amx.h.
#include "cpu/amx.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace fastgen::cpu {

namespace {

// CPUID.(EAX=7, ECX=0):EDX bit `bit`.
bool cpuid7_edx(int bit) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && ((edx >> bit) & 1);
}

bool tiles_granted() {
  static const bool granted = [] {
    if (!cpuid7_edx(24)) return false;  // AMX-TILE
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

}  // namespace

bool cpu_has_amx_int8() {
  static const bool has = cpuid7_edx(25) && tiles_granted();
  return has;
}

bool cpu_has_amx_bf16() {
  static const bool has = cpuid7_edx(22) && tiles_granted();
  return has;
}

}  // namespace fastgen::cpu
