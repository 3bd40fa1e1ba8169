//! `seawall-rls`: a test rate limit service for seawall's global limits.
//!
//! It serves Envoy's standard RLS API (`envoy.service.ratelimit.v3.RateLimitService/
//! ShouldRateLimit`, stubs from the `envoy-types` crate) over the Limitador library, with its
//! counters in Redis (`--redis`) or in memory (`--memory`). So the tests and the demo exercise
//! seawall against the same wire API, the same limit semantics (fixed windows, `hits_addend`
//! counted as that many hits) and the same storage as a production Limitador, without shipping
//! a rate limit service of our own: production runs envoyproxy/ratelimit or Limitador's server,
//! which the operator already has, hardened and observable. This binary is deliberately small.
//!
//! The limits file is Limitador's: a YAML (or JSON) list of limits, each with `namespace` (the
//! RLS `domain`), `max_value`, `seconds`, `conditions` and `variables` (CEL over
//! `descriptors[i].<key>`), exactly as `limitador-server` reads them.
//!
//! A side endpoint (`--stats`, plain HTTP `GET /stats`) reports how many calls and hits were
//! served, so a scenario can compute RLS calls per request.

mod service;

use std::net::SocketAddr;
use std::process::ExitCode;

use service::{Limiter, Rls};

const USAGE: &str =
    "usage: seawall-rls --limits FILE (--redis URL | --memory) [--listen ADDR] [--stats ADDR]";

struct Args {
    listen: SocketAddr,
    stats: Option<SocketAddr>,
    limits: String,
    redis: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8081).into();
    let mut stats = None;
    let mut limits = None;
    let mut redis = None;
    let mut memory = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--stats" => stats = Some(value()?.parse().map_err(|e| format!("--stats: {e}"))?),
            "--limits" => limits = Some(value()?),
            "--redis" => redis = Some(value()?),
            "--memory" => memory = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let limits = limits.ok_or("--limits is required")?;
    if redis.is_some() == memory {
        return Err("expected exactly one of --redis URL and --memory".into());
    }
    Ok(Args {
        listen,
        stats,
        limits,
        redis,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("seawall-rls: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("seawall-rls: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.limits)
        .map_err(|e| format!("reading {}: {e}", args.limits))?;
    let limits = service::parse_limits(&text).map_err(|e| format!("{}: {e}", args.limits))?;
    let limiter = match &args.redis {
        Some(url) => Limiter::redis(url).await?,
        None => Limiter::memory(),
    };
    let count = limits.len();
    limiter.configure(limits).await?;
    let rls = Rls::new(limiter);
    if let Some(addr) = args.stats {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--stats {addr}: {e}"))?;
        println!("seawall-rls stats on {}", local(&listener));
        tokio::spawn(service::serve_stats(listener, rls.counts()));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    let storage = args.redis.as_deref().unwrap_or("memory");
    println!(
        "seawall-rls listening on {} ({count} limits, storage {storage})",
        local(&listener)
    );
    service::serve(listener, rls)
        .await
        .map_err(|e| format!("serving: {e}"))
}

fn local(listener: &tokio::net::TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string())
}
