// The checksums of kvstash cache entries (lib/cache/entry.ts has the format). A restore verifies
// every byte of a multi-megabyte state before llama.cpp sees it, so the check must cost less than
// reading the file. Both detect corruption, not tampering.
//
// Entries of format 2 and 3 hash fixed-size chunks separately, so that a restore verifies them on
// several cores at once: one hash stream cannot be split, and on two cores its single pass was
// most of a verified restore. Each chunk's digest depends on its index, so chunks swapped along
// with their digests do not pass.
//
// - Formats 1 and 2: XXH64, written from the published xxHash specification (chunk i with seed i).
//   8 GB/s on one core here, with no special instructions.
// - Format 3: CRC-32C of the chunk's index (u64 LE) followed by its bytes (common/Crc32c.h):
//   computed by a CPU instruction, about 3 times faster.
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvstash {

class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0);
  void Update(const uint8_t* data, size_t size);
  uint64_t Digest() const;

 private:
  uint64_t acc_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t pending_[32];
  size_t pendingSize_ = 0;
};

enum class DigestScheme { kXxh64, kCrc32c };

struct ByteSpan {
  const uint8_t* data;
  size_t size;
};

// The digest of each `chunkBytes`-long chunk of the spans concatenated (the last chunk may be
// shorter), stored little-endian at digests + 8 * i; the caller sizes `digests` for ChunkCount()
// chunks. Chunks are hashed on up to four threads (the caller's among them). With XXH64 and
// chunkBytes >= the total, this is one XXH64 with seed 0: format 1's checksum.
void ChunkDigests(const std::vector<ByteSpan>& spans, uint64_t chunkBytes, DigestScheme scheme, uint8_t* digests);
uint64_t ChunkCount(uint64_t totalBytes, uint64_t chunkBytes);

// The digest of chunk `index` over bytes [begin, end) of the spans concatenated, as the entry
// format defines it (a CRC-32C fills the low 32 bits). ChunkDigests and the restore's read gate
// both use it, so writer and reader cannot disagree on how the index enters.
uint64_t ChunkDigest(const ByteSpan* spans, size_t spanCount, uint64_t begin, uint64_t end, uint64_t index,
                     DigestScheme scheme);
// Digest `index` of a table of little-endian u64 digests, as stored in an entry.
uint64_t LoadDigest(const uint8_t* table, uint64_t index);
void StoreDigest(uint8_t* table, uint64_t index, uint64_t digest);

// The scheme named by a JS argument ('xxh64' | 'crc32c'); throws a TypeError for anything else.
DigestScheme DigestSchemeArg(Napi::Env env, const Napi::Value& value, const char* caller);

// checksum(parts: Uint8Array[], scheme) -> Promise<bigint>: the XXH64 (seed 0) or the CRC-32C of
// the parts concatenated: an entry's table checksum.
Napi::Value Checksum(const Napi::CallbackInfo& info);
// chunkChecksums(parts: Uint8Array[], chunkBytes: number, scheme) -> Promise<Buffer>: ChunkDigests().
Napi::Value ChunkChecksums(const Napi::CallbackInfo& info);
// crc32cImplementation() -> 'sse4.2' | 'armv8-crc' | 'table': how CRC-32C is computed here.
Napi::Value Crc32cImplementationName(const Napi::CallbackInfo& info);

}  // namespace kvstash
