// Runs a wasm32-wasip1 test binary under Node's built-in WASI, so the core's unit tests run
// compiled to wasm32: 32-bit usize, wasm floats and the WASI clock are exercised, not assumed.
// Cargo calls this as the target runner: `node tools/wasi-runner.mjs <file.wasm> [test args...]`.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';
import process, { argv, env, exit } from 'node:process';

const [, , wasmPath, ...args] = argv;
if (!wasmPath) {
  console.error('usage: wasi-runner.mjs <file.wasm> [args...]');
  exit(2);
}
const wasi = new WASI({
  version: 'preview1',
  args: [wasmPath, ...args],
  env,
  // Proptest may persist failing cases; give it the working directory.
  preopens: { '.': '.' },
  returnOnExit: true,
});
const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
let code;
try {
  code = wasi.start(instance);
} catch (error) {
  // A panic under panic=abort traps with `unreachable`; report it as a failed run.
  console.error(`wasm trap: ${error}`);
  code = 101;
}
// Node 20 crashed now and then (SIGSEGV, or "Invalid bytecode") after every test had passed, in
// the test binary whose wasm memory grows largest (a 200,000-key shared store): a V8 background
// thread racing the process's end. The runner runs Node `--single-threaded`
// (.cargo/config.toml), which ended it (0 crashes in 20 runs against 19 in 20 without), and the
// exit code is set rather than `exit()` called, so Node shuts down in order.
process.exitCode = code ?? 0;
