#include "common/Checksum.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "common/Crc32c.h"
#include "common/PromiseWorker.h"

namespace kvstash {

namespace {

constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kPrime3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kPrime4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t kPrime5 = 0x27D4EB2F165667C5ULL;

inline uint64_t RotateLeft(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// Little-endian loads; memcpy compiles to a plain load and is safe for unaligned input.
inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline uint64_t Round(uint64_t acc, uint64_t lane) {
  acc += lane * kPrime2;
  acc = RotateLeft(acc, 31);
  return acc * kPrime1;
}

inline uint64_t MergeRound(uint64_t acc, uint64_t value) {
  acc ^= Round(0, value);
  return acc * kPrime1 + kPrime4;
}

}  // namespace

Xxh64::Xxh64(uint64_t seed) : seed_(seed) {
  acc_[0] = seed + kPrime1 + kPrime2;
  acc_[1] = seed + kPrime2;
  acc_[2] = seed;
  acc_[3] = seed - kPrime1;
}

void Xxh64::Update(const uint8_t* data, size_t size) {
  total_ += size;
  if (pendingSize_ > 0) {
    const size_t take = std::min(size, sizeof(pending_) - pendingSize_);
    std::memcpy(pending_ + pendingSize_, data, take);
    pendingSize_ += take;
    data += take;
    size -= take;
    if (pendingSize_ < sizeof(pending_)) return;
    for (int lane = 0; lane < 4; ++lane) acc_[lane] = Round(acc_[lane], Load64(pending_ + 8 * lane));
    pendingSize_ = 0;
  }
  // Four independent lanes: the multiplications of one 32-byte stripe overlap in the pipeline.
  uint64_t a0 = acc_[0], a1 = acc_[1], a2 = acc_[2], a3 = acc_[3];
  while (size >= 32) {
    a0 = Round(a0, Load64(data));
    a1 = Round(a1, Load64(data + 8));
    a2 = Round(a2, Load64(data + 16));
    a3 = Round(a3, Load64(data + 24));
    data += 32;
    size -= 32;
  }
  acc_[0] = a0, acc_[1] = a1, acc_[2] = a2, acc_[3] = a3;
  std::memcpy(pending_, data, size);
  pendingSize_ = size;
}

uint64_t Xxh64::Digest() const {
  uint64_t h;
  if (total_ >= 32) {
    h = RotateLeft(acc_[0], 1) + RotateLeft(acc_[1], 7) + RotateLeft(acc_[2], 12) + RotateLeft(acc_[3], 18);
    for (int lane = 0; lane < 4; ++lane) h = MergeRound(h, acc_[lane]);
  } else {
    h = seed_ + kPrime5;
  }
  h += total_;
  const uint8_t* p = pending_;
  size_t left = pendingSize_;
  while (left >= 8) {
    h ^= Round(0, Load64(p));
    h = RotateLeft(h, 27) * kPrime1 + kPrime4;
    p += 8;
    left -= 8;
  }
  if (left >= 4) {
    h ^= static_cast<uint64_t>(Load32(p)) * kPrime1;
    h = RotateLeft(h, 23) * kPrime2 + kPrime3;
    p += 4;
    left -= 4;
  }
  while (left > 0) {
    h ^= (*p) * kPrime5;
    h = RotateLeft(h, 11) * kPrime1;
    ++p;
    --left;
  }
  h ^= h >> 33;
  h *= kPrime2;
  h ^= h >> 29;
  h *= kPrime3;
  h ^= h >> 32;
  return h;
}

uint64_t ChunkCount(uint64_t totalBytes, uint64_t chunkBytes) {
  return totalBytes == 0 ? 0 : (totalBytes + chunkBytes - 1) / chunkBytes;
}

namespace {

// XXH64 with `seed`, or the CRC-32C continuing `crc`, of bytes [begin, end) of the spans
// concatenated: what both a chunk's digest and a whole-buffer checksum compute.
uint64_t DigestOfRange(const ByteSpan* spans, size_t spanCount, uint64_t begin, uint64_t end, DigestScheme scheme,
                       uint64_t seed, uint32_t crc) {
  Xxh64 xxh64(seed);
  uint64_t spanStart = 0;
  for (size_t s = 0; s < spanCount; ++s) {
    const uint64_t spanEnd = spanStart + spans[s].size;
    const uint64_t from = std::max(begin, spanStart), to = std::min(end, spanEnd);
    if (from < to) {
      const uint8_t* data = spans[s].data + (from - spanStart);
      const size_t size = static_cast<size_t>(to - from);
      if (scheme == DigestScheme::kCrc32c) {
        crc = Crc32cExtend(crc, data, size);
      } else {
        xxh64.Update(data, size);
      }
    }
    spanStart = spanEnd;
  }
  return scheme == DigestScheme::kCrc32c ? crc : xxh64.Digest();
}

}  // namespace

uint64_t ChunkDigest(const ByteSpan* spans, size_t spanCount, uint64_t begin, uint64_t end, uint64_t index,
                     DigestScheme scheme) {
  // XXH64 takes the index as its seed; a CRC-32C has none, so the index comes first as 8 bytes.
  uint32_t crc = 0;
  if (scheme == DigestScheme::kCrc32c) {
    uint8_t indexBytes[8];
    for (int byte = 0; byte < 8; ++byte) indexBytes[byte] = static_cast<uint8_t>(index >> (8 * byte));
    crc = Crc32cExtend(0, indexBytes, sizeof(indexBytes));
  }
  return DigestOfRange(spans, spanCount, begin, end, scheme, index, crc);
}

uint64_t LoadDigest(const uint8_t* table, uint64_t index) {
  uint64_t digest = 0;
  for (int byte = 7; byte >= 0; --byte) digest = (digest << 8) | table[index * 8 + byte];
  return digest;
}

void StoreDigest(uint8_t* table, uint64_t index, uint64_t digest) {
  for (int byte = 0; byte < 8; ++byte) table[index * 8 + byte] = static_cast<uint8_t>(digest >> (8 * byte));
}

void ChunkDigests(const std::vector<ByteSpan>& spans, uint64_t chunkBytes, DigestScheme scheme, uint8_t* digests) {
  uint64_t total = 0;
  for (const ByteSpan& span : spans) total += span.size;
  const uint64_t chunks = ChunkCount(total, chunkBytes);
  auto hashChunk = [&](uint64_t index) {
    const uint64_t begin = index * chunkBytes, end = std::min(total, begin + chunkBytes);
    StoreDigest(digests, index, ChunkDigest(spans.data(), spans.size(), begin, end, index, scheme));
  };
  // Chunks are handed out one at a time, so a thread that started late still takes its share.
  // Four threads saturate memory bandwidth on the machines this targets (2-core x86 servers,
  // RK3588's four big cores); thread start-up (tens of microseconds) is small beside a chunk.
  std::atomic<uint64_t> next{0};
  auto work = [&]() {
    for (uint64_t index = next++; index < chunks; index = next++) hashChunk(index);
  };
  const uint64_t threads = std::min<uint64_t>({chunks, 4, std::max(1u, std::thread::hardware_concurrency())});
  std::vector<std::thread> helpers;
  for (uint64_t t = 1; t < threads; ++t) {
    try {
      helpers.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no thread to spare: the calling thread hashes the rest
    }
  }
  work();
  for (std::thread& helper : helpers) helper.join();
}

namespace {

// Uint8Array parts that a worker thread reads in place: pinned until the worker is destroyed.
class PinnedParts {
 public:
  PinnedParts(Napi::Env env, const Napi::Array& parts, const char* caller) {
    for (uint32_t i = 0; i < parts.Length(); ++i) {
      Napi::Value part = parts.Get(i);
      if (!part.IsTypedArray() || part.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
        throw Napi::TypeError::New(env, std::string(caller) + ": every part must be a Uint8Array");
      }
      Napi::Uint8Array bytes = part.As<Napi::Uint8Array>();
      spans_.push_back({bytes.Data(), bytes.ByteLength()});
      total_ += bytes.ByteLength();
      pins_.push_back(Napi::Persistent(static_cast<Napi::Object>(bytes)));
    }
  }

  const std::vector<ByteSpan>& spans() const { return spans_; }
  uint64_t total() const { return total_; }

 private:
  std::vector<ByteSpan> spans_;
  std::vector<Napi::ObjectReference> pins_;
  uint64_t total_ = 0;
};

class ChecksumWorker : public PromiseWorker {
 public:
  ChecksumWorker(Napi::Env env, const Napi::Array& parts, DigestScheme scheme)
      : PromiseWorker(env, "kvstash.checksum"), parts_(env, parts, "checksum"), scheme_(scheme) {}

 protected:
  void Run() override {
    digest_ = DigestOfRange(parts_.spans().data(), parts_.spans().size(), 0, parts_.total(), scheme_, 0, 0);
  }

  Napi::Value Result(Napi::Env env) override { return Napi::BigInt::New(env, digest_); }

 private:
  PinnedParts parts_;
  DigestScheme scheme_;
  uint64_t digest_ = 0;
};

class ChunkChecksumsWorker : public PromiseWorker {
 public:
  ChunkChecksumsWorker(Napi::Env env, const Napi::Array& parts, uint64_t chunkBytes, DigestScheme scheme)
      : PromiseWorker(env, "kvstash.chunkChecksums"), parts_(env, parts, "chunkChecksums"), chunkBytes_(chunkBytes), scheme_(scheme) {
    digests_.resize(ChunkCount(parts_.total(), chunkBytes_) * 8);
  }

 protected:
  void Run() override { ChunkDigests(parts_.spans(), chunkBytes_, scheme_, digests_.data()); }

  Napi::Value Result(Napi::Env env) override { return Napi::Buffer<uint8_t>::Copy(env, digests_.data(), digests_.size()); }

 private:
  PinnedParts parts_;
  uint64_t chunkBytes_;
  DigestScheme scheme_;
  std::vector<uint8_t> digests_;
};

}  // namespace

DigestScheme DigestSchemeArg(Napi::Env env, const Napi::Value& value, const char* caller) {
  const std::string name = value.IsString() ? value.As<Napi::String>().Utf8Value() : "";
  if (name == "xxh64") return DigestScheme::kXxh64;
  if (name == "crc32c") return DigestScheme::kCrc32c;
  throw Napi::TypeError::New(env, std::string(caller) + ": the digest scheme must be 'xxh64' or 'crc32c'");
}

Napi::Value ChunkChecksums(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray() || !info[1].IsNumber()) {
    throw Napi::TypeError::New(env, "chunkChecksums(parts: Uint8Array[], chunkBytes: number, scheme: 'xxh64' | 'crc32c')");
  }
  const DigestScheme scheme = DigestSchemeArg(env, info[2], "chunkChecksums");
  const double chunkBytes = info[1].As<Napi::Number>().DoubleValue();
  if (!(chunkBytes >= 1 && chunkBytes <= 9.0e15) || chunkBytes != static_cast<double>(static_cast<uint64_t>(chunkBytes))) {
    throw Napi::RangeError::New(env, "chunkChecksums: chunkBytes must be a positive integer");
  }
  return (new ChunkChecksumsWorker(env, info[0].As<Napi::Array>(), static_cast<uint64_t>(chunkBytes), scheme))->Start();
}

Napi::Value Checksum(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray()) throw Napi::TypeError::New(env, "checksum(parts: Uint8Array[], scheme: 'xxh64' | 'crc32c')");
  const DigestScheme scheme = DigestSchemeArg(env, info[1], "checksum");
  return (new ChecksumWorker(env, info[0].As<Napi::Array>(), scheme))->Start();
}

Napi::Value Crc32cImplementationName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), Crc32cImplementation());
}

}  // namespace kvstash
