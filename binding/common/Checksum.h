// XXH64, written from the published xxHash specification: the checksum of kvstash cache entries.
// Chosen for speed (several GB/s on one core, x86-64 and aarch64 alike, no special instructions):
// a restore verifies every byte of a multi-megabyte state before llama.cpp sees it, and the check
// must cost less than reading the file. It detects corruption, not tampering.
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace kvstash {

class Xxh64 {
 public:
  explicit Xxh64(uint64_t seed = 0);
  void Update(const uint8_t* data, size_t size);
  // Update() of `size` bytes from `source` that also stores them to `target`, in the same pass.
  // What is hashed is exactly what is stored, even if `source` changes meanwhile (a file mapping
  // another process writes to): checking `target` afterwards needs no second read.
  void UpdateCopy(const uint8_t* source, uint8_t* target, size_t size);
  uint64_t Digest() const;

 private:
  uint64_t acc_[4];
  uint64_t seed_;
  uint64_t total_ = 0;
  uint8_t pending_[32];
  size_t pendingSize_ = 0;
};

// checksum(parts: Uint8Array[]) -> Promise<bigint>: XXH64 (seed 0) of the parts concatenated.
Napi::Value Checksum(const Napi::CallbackInfo& info);

}  // namespace kvstash
