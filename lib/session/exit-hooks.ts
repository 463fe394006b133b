/**
 * Opt-in work before the process goes away: on SIGTERM, SIGINT or beforeExit, every registered
 * hook runs (bounded in time), then the signal is re-raised so the process ends as it would have.
 */
const hooks = new Set<() => Promise<void>>();
const SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT'];
const HOOK_TIMEOUT_MS = 10_000;
let installed = false;
let running: Promise<void> | undefined;

function runHooks(): Promise<void> {
  running ??= Promise.race([
    Promise.allSettled([...hooks].map((hook) => hook())).then(() => undefined),
    new Promise<void>((resolve) => setTimeout(resolve, HOOK_TIMEOUT_MS).unref()),
  ]);
  return running;
}

function onSignal(signal: NodeJS.Signals): void {
  void runHooks().then(() => {
    uninstall();
    // Re-raised with our listener gone: with no other listener the default action ends the
    // process by this signal, as it would have ended without us. Other listeners see the signal
    // a second time; deciding "someone else handles it" instead leaves a process that nobody
    // ends when those listeners (signal-exit, say) defer to ours in turn.
    process.kill(process.pid, signal);
  });
}

function onBeforeExit(): void {
  if (running) return; // the hooks ran already; let the process exit
  void runHooks();
}

function install(): void {
  if (installed) return;
  installed = true;
  for (const signal of SIGNALS) process.on(signal, onSignal);
  process.on('beforeExit', onBeforeExit);
}

function uninstall(): void {
  if (!installed) return;
  installed = false;
  for (const signal of SIGNALS) process.off(signal, onSignal);
  process.off('beforeExit', onBeforeExit);
}

/** Registers `hook`; returns its removal. */
export function onProcessExit(hook: () => Promise<void>): () => void {
  hooks.add(hook);
  install();
  return () => {
    hooks.delete(hook);
    if (hooks.size === 0) uninstall();
  };
}
