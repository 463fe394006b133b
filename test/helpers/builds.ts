/**
 * The two builds of the addon the benchmark compares, as this tree has them: the source build in
 * build/Release and the prebuilt binaries in prebuilds/<platform>-<arch>/ (only after
 * `npm run prebuild`). The bench tests demand a measurement from each build that exists and, from
 * each that does not, the one reason its absence gives; KVSTASH_EXPECT_PREBUILDS=1 (CI, after
 * `npm run prebuild`) makes a missing prebuilds/ a failure, so the prebuilt path is really exercised.
 */
import fs from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from '../../lib/binding.js';

export interface Builds {
  source: boolean;
  prebuilt: boolean;
  /** KVSTASH_EXPECT_PREBUILDS=1: prebuilds/ must exist. */
  expectPrebuilt: boolean;
  /** The CPU levels prebuilt for this architecture (scripts/cpu-variants.js): what a prebuilt child may report. */
  variants: string[];
}

export function builds(): Builds {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { CPU_VARIANTS } = require(path.join(PACKAGE_ROOT, 'scripts', 'cpu-variants.js')) as { CPU_VARIANTS: Record<string, Array<{ name: string }>> };
  return {
    source: fs.existsSync(path.join(PACKAGE_ROOT, 'build', 'Release', 'kvstash.node')),
    prebuilt: fs.existsSync(path.join(PACKAGE_ROOT, 'prebuilds', `${process.platform}-${process.arch}`, 'kvstash.node')),
    expectPrebuilt: process.env.KVSTASH_EXPECT_PREBUILDS === '1',
    variants: (CPU_VARIANTS[process.arch] ?? []).map((v) => v.name),
  };
}

/** Why a child of `build` cannot measure in a tree with `have`: the message it must fail with. */
export function absenceReason(build: 'prebuilt' | 'source', have: Builds): RegExp {
  if (build === 'prebuilt') return new RegExp(`no prebuilt binary for ${process.platform}-${process.arch}`);
  // Without build/Release, node-gyp-build falls back to the prebuilt binary, which the check refuses.
  return have.prebuilt ? /no source build in build\/Release: without PREBUILDS_ONLY the child loaded the prebuilt binary/ : /no usable local build in /;
}
