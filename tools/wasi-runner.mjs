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
// Not `exit()`: ending the process while V8 still compiles the module's hot functions in the
// background crashed Node 20 now and then (SIGSEGV after every test had passed). Setting the exit
// code lets Node shut down in order; the runner's flags (.cargo/config.toml) also keep V8 from
// tiering up in the background at all.
process.exitCode = code ?? 0;
