// CRC-32C (Castagnoli: reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF),
// the chunk digest of entry format 3. Chosen because x86-64 (SSE4.2) and ARMv8 (the CRC32
// extension, present on RK3588's Cortex-A76/A55) compute it in hardware at about 8 bytes per cycle
// when three streams run interleaved: about 3 times our XXH64 on one core. A restore hashes every
// byte of a multi-megabyte state on two cores, so the hash was a third of its CPU time.
// Like XXH64 it detects corruption, not tampering; per 64 KiB chunk it misses a random
// corruption with probability 2^-32 (what ext4, btrfs and iSCSI accept for the same purpose).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvstash {

// Continues a CRC-32C: `crc` is the value of the bytes so far (0 for none), the result that of
// those bytes followed by [data, data + size).
uint32_t Crc32cExtend(uint32_t crc, const uint8_t* data, size_t size);

// Which implementation Crc32cExtend uses here: "sse4.2", "armv8-crc" or "table" (portable, about
// 15 times slower). KVSTASH_PORTABLE_CRC32C=1 in the environment forces "table", so the tests can
// compare it with the hardware one.
const char* Crc32cImplementation();

}  // namespace kvstash
