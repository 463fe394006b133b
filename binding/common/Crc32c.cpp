#include "common/Crc32c.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#elif defined(__aarch64__)
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
#endif

namespace kvstash {

namespace {

constexpr uint32_t kPolynomial = 0x82F63B78u;  // reflected: bit 31 is x^0, bit 0 is x^31

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// a · b mod P, both polynomials in the reflected bit order of the CRC register.
uint32_t MultiplyModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t bit = 1u << 31; bit != 0; bit >>= 1) {
    if (a & bit) product ^= b;
    b = (b & 1) ? (b >> 1) ^ kPolynomial : b >> 1;  // b · x
  }
  return product;
}

// x^(8 · bytes) mod P: what appending `bytes` zero bytes multiplies a CRC register by.
uint32_t ZeroBytesOperator(uint64_t bytes) {
  uint32_t result = 1u << 31;  // x^0
  uint32_t power = 1u << 23;   // x^8
  for (; bytes != 0; bytes >>= 1) {
    if (bytes & 1) result = MultiplyModP(result, power);
    power = MultiplyModP(power, power);
  }
  return result;
}

// The raw register update (no initial or final XOR), 8 bits at a time per table: slicing by 8.
struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t r = i;
      for (int k = 0; k < 8; ++k) r = (r & 1) ? (r >> 1) ^ kPolynomial : r >> 1;
      t[0][i] = r;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
    }
  }
};
const Tables kTables;

uint32_t RegisterByTable(uint32_t reg, const uint8_t* p, size_t n) {
  const auto& t = kTables.t;
  for (; n >= 8; p += 8, n -= 8) {
    const uint64_t v = Load64(p) ^ reg;
    reg = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^ t[4][(v >> 24) & 0xff] ^
          t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^ t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
  }
  for (; n > 0; ++p, --n) reg = t[0][(reg ^ *p) & 0xff] ^ (reg >> 8);
  return reg;
}

#if defined(__x86_64__)
#define KVSTASH_CRC_TARGET __attribute__((target("sse4.2")))
KVSTASH_CRC_TARGET inline uint32_t Step64(uint32_t reg, uint64_t v) { return static_cast<uint32_t>(_mm_crc32_u64(reg, v)); }
KVSTASH_CRC_TARGET inline uint32_t Step8(uint32_t reg, uint8_t v) { return _mm_crc32_u8(reg, v); }
bool HardwareAvailable() { return __builtin_cpu_supports("sse4.2"); }
constexpr const char* kHardwareName = "sse4.2";
#elif defined(__aarch64__)
#define KVSTASH_CRC_TARGET __attribute__((target("+crc")))
KVSTASH_CRC_TARGET inline uint32_t Step64(uint32_t reg, uint64_t v) { return __crc32cd(reg, v); }
KVSTASH_CRC_TARGET inline uint32_t Step8(uint32_t reg, uint8_t v) { return __crc32cb(reg, v); }
bool HardwareAvailable() { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
constexpr const char* kHardwareName = "armv8-crc";
#endif

#ifdef KVSTASH_CRC_TARGET
KVSTASH_CRC_TARGET uint32_t RegisterByInstruction(uint32_t reg, const uint8_t* p, size_t n) {
  for (; n >= 8; p += 8, n -= 8) reg = Step64(reg, Load64(p));
  for (; n > 0; ++p, --n) reg = Step8(reg, *p);
  return reg;
}

// The CRC instruction takes 3 cycles but can start every cycle, so one stream uses a third of it.
// Three streams over the thirds of the range run at full rate; their registers are joined with
// the zero-bytes operators, since register(r, A‖B) = register(r, A) · x^(8|B|) ⊕ register(0, B).
KVSTASH_CRC_TARGET uint32_t RegisterThreeWay(uint32_t reg, const uint8_t* p, size_t n) {
  const size_t third = n / 24 * 8, last = n - 2 * third;
  // Chunks repeat the same length, so each thread keeps the operators of the last one.
  thread_local size_t cachedLength = 0;
  thread_local uint32_t afterSecond = 0, afterThird = 0;
  if (cachedLength != n) {
    afterSecond = ZeroBytesOperator(third);
    afterThird = ZeroBytesOperator(last);
    cachedLength = n;
  }
  uint32_t a = reg, b = 0, c = 0;
  const uint8_t *pa = p, *pb = p + third, *pc = p + 2 * third;
  for (size_t i = 0; i < third; i += 8) {
    a = Step64(a, Load64(pa + i));
    b = Step64(b, Load64(pb + i));
    c = Step64(c, Load64(pc + i));
  }
  c = RegisterByInstruction(c, pc + third, last - third);
  return MultiplyModP(MultiplyModP(a, afterSecond) ^ b, afterThird) ^ c;
}
#endif

enum class Implementation { kTable, kInstruction };

Implementation Choose() {
  const char* forced = std::getenv("KVSTASH_PORTABLE_CRC32C");
  if (forced != nullptr && std::strcmp(forced, "1") == 0) return Implementation::kTable;
#ifdef KVSTASH_CRC_TARGET
  if (HardwareAvailable()) return Implementation::kInstruction;
#endif
  return Implementation::kTable;
}

const Implementation kImplementation = Choose();

// Below this the operators' two multiplications cost more than the third of a stream they save.
constexpr size_t kThreeWayMinBytes = 2048;

}  // namespace

uint32_t Crc32cExtend(uint32_t crc, const uint8_t* data, size_t size) {
  uint32_t reg = ~crc;
#ifdef KVSTASH_CRC_TARGET
  if (kImplementation == Implementation::kInstruction) {
    reg = size >= kThreeWayMinBytes ? RegisterThreeWay(reg, data, size) : RegisterByInstruction(reg, data, size);
    return ~reg;
  }
#endif
  return ~RegisterByTable(reg, data, size);
}

const char* Crc32cImplementation() {
#ifdef KVSTASH_CRC_TARGET
  if (kImplementation == Implementation::kInstruction) return kHardwareName;
#endif
  return "table";
}

}  // namespace kvstash
