/**
 * Native work that must be stopped when the process exits.
 *
 * process.exit() runs no finalizer and no cleanup hook, and does not wait for the threads the
 * native layer owns: a decode left running on a llama context's operation thread meets the
 * teardown exit() does and crashes the process (seen under qemu as SIGSEGV); an RKLLM run is
 * aborted here first, then destroyed by the native atexit handler (binding/rkllm/RkllmRuntime.cpp).
 * Each handle registered here gets its `stop` called on 'exit'. Weak references: an undisposed
 * handle can still be garbage-collected.
 */
const registered = new Map<WeakRef<object>, () => void>();
let listening = false;

/** Registers `stop` to run on 'exit' while `handle` lives; returns the call that unregisters it. */
export function stopAtExit<T extends object>(handle: T, stop: (handle: T) => void): () => void {
  if (!listening) {
    listening = true;
    process.on('exit', () => {
      for (const run of registered.values()) {
        try {
          run();
        } catch {
          // exiting anyway; the next handle still gets stopped
        }
      }
    });
  }
  const ref = new WeakRef(handle);
  registered.set(ref, () => {
    const live = ref.deref();
    if (live !== undefined) stop(live);
  });
  return () => registered.delete(ref);
}
