#!/usr/bin/env node
// The build command prebuildify runs in place of node-gyp (`prebuildify --node-gyp <this file>`).
// prebuildify calls it as `<this> rebuild --target=<node> --arch=<arch> --release ...` in its working
// directory, then takes build/Release/*.node there as the prebuild and copies build/Release/*.so
// next to it (stripping both). So this builds, for the requested architecture, every CPU variant of
// the addon with cmake-js (scripts/build-native.js) into build/Release/kvstash-<variant>.so, and the
// loader that picks one of them at run time into build/Release/kvstash.node. The --target is
// ignored: the addon uses N-API only, so one binary serves every Node version.
'use strict';

const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const { buildNative } = require('./build-native.js');
const { CPU_VARIANTS } = require('./cpu-variants.js');

const root = path.resolve(__dirname, '..');

/** How to compile for each architecture from this host. */
const TOOLCHAINS = {
  x64: { host: 'x64', cc: 'cc', cmake: [] },
  arm64: {
    host: 'x64',
    cc: 'aarch64-linux-gnu-gcc',
    cmake: [`--CDCMAKE_TOOLCHAIN_FILE=${path.join(root, 'cmake', 'aarch64-linux-gnu.cmake')}`],
  },
};

function option(argv, name) {
  const prefix = `--${name}=`;
  const found = argv.find((a) => a.startsWith(prefix));
  return found ? found.slice(prefix.length) : undefined;
}

function buildVariants(arch) {
  const variants = CPU_VARIANTS[arch];
  const toolchain = TOOLCHAINS[arch];
  if (!variants || !toolchain) throw new Error(`no prebuilt CPU variants are defined for ${arch}`);
  if (toolchain.host !== process.arch) {
    throw new Error(`${arch} prebuilds are built on an ${toolchain.host} host, this is ${process.arch}`);
  }
  const release = path.resolve('build', 'Release');
  fs.rmSync(release, { recursive: true, force: true });
  fs.mkdirSync(release, { recursive: true });
  for (const variant of variants) {
    const out = path.join(root, 'build-prebuild', `linux-${arch}`, variant.name);
    process.stderr.write(`[kvstash] building the ${arch} ${variant.name} addon in ${path.relative(root, out)}\n`);
    buildNative(['--portable', '--out', out, ...toolchain.cmake, ...variant.cmake]);
    const built = path.join(out, 'Release', 'kvstash.node');
    const needed = execFileSync('readelf', ['-d', built], { encoding: 'utf8' });
    // OpenMP stays off (CMakeLists.txt): a prebuild must not need libgomp on the user's machine.
    if (/NEEDED.*libgomp/.test(needed)) throw new Error(`${built} needs libgomp: OpenMP must stay off`);
    fs.copyFileSync(built, path.join(release, `kvstash-${variant.name}.so`));
  }
  execFileSync(
    toolchain.cc,
    [
      '-std=c11', '-O2', '-Wall', '-Wextra', '-Werror', '-fPIC', '-shared',
      '-I', path.join(path.dirname(require.resolve('node-api-headers/package.json')), 'include'),
      path.join(__dirname, 'cpu-variant-loader.c'),
      '-o', path.join(release, 'kvstash.node'),
      '-ldl', '-lpthread',
    ],
    { stdio: 'inherit' },
  );
}

if (require.main === module) {
  const argv = process.argv.slice(2);
  try {
    buildVariants(option(argv, 'arch') || process.env.PREBUILD_ARCH || process.arch);
  } catch (err) {
    process.stderr.write(`[kvstash] prebuild failed: ${err.message}\n`);
    process.exit(1);
  }
}
