// Process-wide llama.cpp set-up: backend initialisation and the log sink.
#pragma once

#include <napi.h>

namespace kvstash {

// Initialises the llama.cpp backend once per process and installs the log sink.
void InitLlamaBackend();

// setLogLevel(level): 0 silent, 1 error, 2 warn, 3 info, 4 debug. Lines at or above the level go to
// stderr. Error lines are always recorded for error messages, whatever the level.
void SetLogLevel(const Napi::CallbackInfo& info);

// systemInfo(): llama.cpp's description of the CPU features it was built for and uses.
Napi::Value SystemInfo(const Napi::CallbackInfo& info);

}  // namespace kvstash
