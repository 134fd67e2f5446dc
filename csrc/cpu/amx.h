// Intel AMX on the CPU: whether the processor has the tile instructions and Linux has granted this
// process their state (a per-process request, made once here). The kernels that use them
// (cpu/quant.cpp's AMX-INT8 GEMV, attention/prefill_bf16.cpp's AMX-BF16 products) are compiled
// for those targets by function attribute, whatever -march says, and chosen at run time.
#pragma once

#include <cstdint>

namespace fastgen::cpu {

// AMX-TILE and AMX-INT8, granted.
bool cpu_has_amx_int8();
// AMX-TILE and AMX-BF16, granted.
bool cpu_has_amx_bf16();

// A tile configuration (palette 1) with every one of the 8 tiles `rows` x `colsb` bytes, the
// layout LDTILECFG reads. Kernels adjust the few that differ.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig(int all_rows, int all_colsb) {
    for (int t = 0; t < 8; ++t) rows[t] = static_cast<uint8_t>(all_rows), colsb[t] = static_cast<uint16_t>(all_colsb);
  }
};

}  // namespace fastgen::cpu

// LDTILECFG of a TileConfig, in a function compiled for amx-tile. The empty asm with a memory
// clobber keeps GCC from dropping the stores that fill the config: its builtin does not tell the
// optimizer that it reads the memory (GCC 12 kept only the palette byte, and the load faulted).
#define FASTGEN_LOAD_TILE_CONFIG(config)                 \
  do {                                                    \
    asm volatile("" : : "r"(&(config)) : "memory");       \
    _tile_loadconfig(&(config));                          \
  } while (0)
