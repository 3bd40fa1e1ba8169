//! The demo's upstream as a program of its own, so it can run in a container beside Envoy (the
//! compose demo): the harness's test upstream on `--listen`, driven through its control port on
//! `--control` (see `seawall_integration::remote`) the way `cargo xtask demo` drives it in-process.

use std::net::TcpListener;
use std::process::exit;
use std::sync::Arc;

use seawall_integration::remote::serve_control;
use seawall_integration::{Behaviour, Upstream};

const USAGE: &str = "usage: seawall-upstream [--listen ADDR] [--control ADDR] [--body TEXT]
  --listen   where requests are served (default 0.0.0.0:18080)
  --control  the control port (default 0.0.0.0:18081)
  --body     the default answer's body (default: hello from the demo upstream)";

fn main() {
    let mut listen = "0.0.0.0:18080".to_owned();
    let mut control = "0.0.0.0:18081".to_owned();
    let mut body = "hello from the demo upstream\n".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let slot = match flag.as_str() {
            "--listen" => &mut listen,
            "--control" => &mut control,
            "--body" => &mut body,
            _ => fail(&format!("unknown argument {flag:?}")),
        };
        *slot = args
            .next()
            .unwrap_or_else(|| fail(&format!("{flag} needs a value")));
    }
    exit_on_terminate();
    let upstream = Upstream::bind(&listen)
        .unwrap_or_else(|error| fail(&format!("listen on {listen}: {error}")));
    upstream.set_behaviour(Behaviour::ok().body(body));
    let control_listener = TcpListener::bind(&control)
        .unwrap_or_else(|error| fail(&format!("control on {control}: {error}")));
    println!("seawall-upstream: serving on {listen}, control on {control}");
    serve_control(Arc::new(upstream), control_listener);
}

fn fail(message: &str) -> ! {
    eprintln!("seawall-upstream: {message}\n{USAGE}");
    exit(2)
}

/// As a container's first process the kernel gives it no default action for SIGTERM, so
/// `docker stop` would wait its grace period out: exit at once instead.
fn exit_on_terminate() {
    extern "C" fn terminate(_: i32) {
        extern "C" {
            fn _exit(code: i32) -> !;
        }
        // SAFETY: _exit is async-signal-safe and ends the process.
        unsafe { _exit(0) }
    }
    extern "C" {
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    }
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe {
        signal(SIGTERM, terminate);
        signal(SIGINT, terminate);
    }
}
