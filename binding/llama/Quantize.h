// quantize(src, dst, type, threads) -> Promise<void>: llama.cpp's model quantizer, off the main thread.
#pragma once

#include <napi.h>

namespace kvstash {

Napi::Value Quantize(const Napi::CallbackInfo& info);

}  // namespace kvstash
