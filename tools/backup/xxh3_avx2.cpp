// SPDX-License-Identifier: MIT
// XXH3-128 compiled for AVX2 (about 3x the SSE2 build Debian ships in
// libxxhash), used only when the CPU has AVX2 (pull.cpp checks).
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstddef>
#include <cstdint>

#include "backup/pull.hpp"

namespace fleece::backup::detail {

void xxh3_128_avx2(const void* data, size_t length, uint64_t* high, uint64_t* low) {
  const XXH128_hash_t h = XXH3_128bits(data, length);
  *high = h.high64;
  *low = h.low64;
}

}  // namespace fleece::backup::detail
