// The scan under lib/memory/vector-index.ts: dot products of one query with many rows held in
// ggml's Q8_0 format, by ggml's own SIMD kernel for this CPU (AVX2/AVX-512/NEON, scalar elsewhere).
// Mechanism only: the rows, their order, top-k selection and exact re-scoring belong to lib/.
#pragma once

#include <napi.h>

namespace kvstash {

// vectorQuantizeQ8(rows: Float32Array, count, stride, out: Uint8Array, residuals: Float32Array)
// Quantizes `count` rows of `stride` floats (stride a multiple of 32) into `out` (Q8_0 rows) and
// writes each row's residual norm ‖x − dequant(q8(x))‖ (what bounds the quantized score's error).
void VectorQuantizeQ8(const Napi::CallbackInfo& info);

// vectorScanQ8(rows: Uint8Array, count, stride, query: Float32Array, scores: Float32Array) -> number
// scores[i] = q8(query) · rows[i]; returns the query's residual norm ‖q − dequant(q8(q))‖.
Napi::Value VectorScanQ8(const Napi::CallbackInfo& info);

}  // namespace kvstash
