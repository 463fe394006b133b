// The CPU levels kvstash ships prebuilt, per architecture, fastest first, with the llama.cpp (ggml)
// options that build each. One addon is built per level (see scripts/cpu-variant-loader.c for why
// and for how the loader picks; its names must match these). Every level turns llama.cpp's
// -march=native off, so only the listed instruction sets reach the kernels; the rest of the addon
// is compiled for the architecture's baseline.
'use strict';

const x86 = (levels) =>
  Object.entries({
    GGML_SSE42: 'ON',
    GGML_AVX: 'OFF',
    GGML_AVX2: 'OFF',
    GGML_FMA: 'OFF',
    GGML_F16C: 'OFF',
    GGML_BMI2: 'OFF',
    GGML_AVX_VNNI: 'OFF',
    GGML_AVX512: 'OFF',
    GGML_AVX512_VBMI: 'OFF',
    GGML_AVX512_VNNI: 'OFF',
    GGML_AVX512_BF16: 'OFF',
    ...levels,
  }).map(([option, value]) => `--CD${option}=${value}`);

const AVX2 = { GGML_AVX: 'ON', GGML_AVX2: 'ON', GGML_FMA: 'ON', GGML_F16C: 'ON', GGML_BMI2: 'ON' };
const AVX512 = { ...AVX2, GGML_AVX512: 'ON' };

const CPU_VARIANTS = {
  x64: [
    { name: 'x86-64-v4+vnni', cmake: x86({ ...AVX512, GGML_AVX512_VBMI: 'ON', GGML_AVX512_VNNI: 'ON' }) },
    { name: 'x86-64-v4', cmake: x86(AVX512) },
    { name: 'x86-64-v3', cmake: x86(AVX2) },
    { name: 'x86-64-v2', cmake: x86({}) },
  ],
  arm64: [
    { name: 'armv8.2-a+dotprod+fp16', cmake: ['--CDGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16'] },
    { name: 'armv8-a', cmake: ['--CDGGML_CPU_ARM_ARCH=armv8-a'] },
  ],
};

module.exports = { CPU_VARIANTS };
