#include "common/VectorScan.h"

#include <cmath>
#include <mutex>
#include <string>
#include <vector>

#include "ggml-cpu.h"
#include "ggml.h"

namespace kvstash {

namespace {

// ggml's CPU kernels read fp16 conversion tables that ggml_cpu_init fills.
void EnsureCpuKernels() {
  static std::once_flag once;
  std::call_once(once, [] { ggml_cpu_init(); });
}

template <typename T>
T TypedArg(const Napi::CallbackInfo& info, size_t index, napi_typedarray_type type, const char* what) {
  Napi::Value value = info[index];
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != type) {
    throw Napi::TypeError::New(info.Env(), std::string(what) + " has the wrong typed-array type");
  }
  return value.As<T>();
}

size_t CountArg(const Napi::CallbackInfo& info, size_t index, const char* what) {
  if (!info[index].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a number");
  double n = info[index].As<Napi::Number>().DoubleValue();
  if (!(n >= 0 && n <= 4294967295.0) || n != std::floor(n)) {
    throw Napi::RangeError::New(info.Env(), std::string(what) + " must be a non-negative integer");
  }
  return static_cast<size_t>(n);
}

// The stride in floats; a whole number of Q8_0 blocks, so rows never share a block.
size_t StrideArg(const Napi::CallbackInfo& info, size_t index) {
  size_t stride = CountArg(info, index, "stride");
  const size_t block = static_cast<size_t>(ggml_blck_size(GGML_TYPE_Q8_0));
  if (stride == 0 || stride % block != 0 || stride > (1u << 20)) {
    throw Napi::RangeError::New(info.Env(), "stride must be a positive multiple of " + std::to_string(block));
  }
  return stride;
}

void RequireLength(const Napi::CallbackInfo& info, size_t have, size_t need, const char* what) {
  if (have < need) {
    throw Napi::RangeError::New(info.Env(), std::string(what) + " holds " + std::to_string(have) + " elements, " +
                                                std::to_string(need) + " are needed");
  }
}

double ResidualNorm(const float* x, const void* quantized, size_t n, std::vector<float>& scratch) {
  ggml_get_type_traits(GGML_TYPE_Q8_0)->to_float(quantized, scratch.data(), static_cast<int64_t>(n));
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - scratch[i];
    sum += d * d;
  }
  return std::sqrt(sum);
}

}  // namespace

void VectorQuantizeQ8(const Napi::CallbackInfo& info) {
  EnsureCpuKernels();
  auto rows = TypedArg<Napi::Float32Array>(info, 0, napi_float32_array, "rows");
  const size_t count = CountArg(info, 1, "count");
  const size_t stride = StrideArg(info, 2);
  auto out = TypedArg<Napi::Uint8Array>(info, 3, napi_uint8_array, "out");
  auto residuals = TypedArg<Napi::Float32Array>(info, 4, napi_float32_array, "residuals");
  const size_t rowBytes = ggml_row_size(GGML_TYPE_Q8_0, static_cast<int64_t>(stride));
  RequireLength(info, rows.ElementLength(), count * stride, "rows");
  RequireLength(info, out.ElementLength(), count * rowBytes, "out");
  RequireLength(info, residuals.ElementLength(), count, "residuals");

  const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
  std::vector<float> scratch(stride);
  for (size_t r = 0; r < count; ++r) {
    const float* x = rows.Data() + r * stride;
    uint8_t* q = out.Data() + r * rowBytes;
    quantize(x, q, static_cast<int64_t>(stride));
    residuals[r] = static_cast<float>(ResidualNorm(x, q, stride, scratch));
  }
}

Napi::Value VectorScanQ8(const Napi::CallbackInfo& info) {
  EnsureCpuKernels();
  auto rows = TypedArg<Napi::Uint8Array>(info, 0, napi_uint8_array, "rows");
  const size_t count = CountArg(info, 1, "count");
  const size_t stride = StrideArg(info, 2);
  auto query = TypedArg<Napi::Float32Array>(info, 3, napi_float32_array, "query");
  auto scores = TypedArg<Napi::Float32Array>(info, 4, napi_float32_array, "scores");
  const size_t rowBytes = ggml_row_size(GGML_TYPE_Q8_0, static_cast<int64_t>(stride));
  RequireLength(info, rows.ElementLength(), count * rowBytes, "rows");
  RequireLength(info, query.ElementLength(), stride, "query");
  RequireLength(info, scores.ElementLength(), count, "scores");

  const ggml_type_traits_cpu* traits = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0);
  // Q8_0's dot product takes its other operand in its vec_dot_type (Q8_0 itself).
  std::vector<uint8_t> q(ggml_row_size(traits->vec_dot_type, static_cast<int64_t>(stride)));
  traits->from_float(query.Data(), q.data(), static_cast<int64_t>(stride));
  std::vector<float> scratch(stride);
  const double queryResidual = ResidualNorm(query.Data(), q.data(), stride, scratch);

  const int n = static_cast<int>(stride);
  const uint8_t* base = rows.Data();
  float* out = scores.Data();
  for (size_t r = 0; r < count; ++r) traits->vec_dot(n, out + r, 0, base + r * rowBytes, 0, q.data(), 0, 1);
  return Napi::Number::New(info.Env(), queryResidual);
}

}  // namespace kvstash
