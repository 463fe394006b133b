// XXH64, written from the published xxHash specification: the checksum of kvstash cache entries.
// Chosen for speed (several GB/s on one core, x86-64 and aarch64 alike, no special instructions):
// a restore verifies every byte of a multi-megabyte state before llama.cpp sees it, and the check
// must cost less than reading the file. It detects corruption, not tampering.
//
// Entries of format 2 hash fixed-size chunks separately (chunk i with seed i), so that a restore
// verifies them on several cores at once: one XXH64 stream cannot be split, and on two cores its
// single pass was most of a verified restore (lib/cache/entry.ts has the format).
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

struct ByteSpan {
  const uint8_t* data;
  size_t size;
};

// The XXH64 of each `chunkBytes`-long chunk of the spans concatenated (the last chunk may be
// shorter), chunk i hashed with seed i, stored little-endian at digests + 8 * i; the caller sizes
// `digests` for ChunkCount() chunks. Chunks are hashed on up to four threads (the caller's among
// them). With chunkBytes >= the total, this is one XXH64 with seed 0: format 1's checksum.
void ChunkDigests(const std::vector<ByteSpan>& spans, uint64_t chunkBytes, uint8_t* digests);
uint64_t ChunkCount(uint64_t totalBytes, uint64_t chunkBytes);

// The digest of chunk `index`, as entry format 2 defines it: XXH64 seeded with the chunk's index,
// over bytes [begin, end) of the spans concatenated. ChunkDigests and the restore's read gate both
// use it, so writer and reader cannot disagree on the seed.
uint64_t ChunkDigest(const ByteSpan* spans, size_t spanCount, uint64_t begin, uint64_t end, uint64_t index);
// Digest `index` of a table of little-endian u64 digests, as stored in an entry.
uint64_t LoadDigest(const uint8_t* table, uint64_t index);
void StoreDigest(uint8_t* table, uint64_t index, uint64_t digest);

// checksum(parts: Uint8Array[]) -> Promise<bigint>: XXH64 (seed 0) of the parts concatenated.
Napi::Value Checksum(const Napi::CallbackInfo& info);
// chunkChecksums(parts: Uint8Array[], chunkBytes: number) -> Promise<Buffer>: ChunkDigests().
Napi::Value ChunkChecksums(const Napi::CallbackInfo& info);

}  // namespace kvstash
