//! The test upstream across a process boundary: when the upstream runs as its own program (the
//! `seawall-upstream` binary, in a container of the compose demo), a small HTTP control port
//! lets a driver change what it answers and read what it received, as a scenario does with an
//! in-process [`Upstream`].
//!
//! The control port speaks plain HTTP/1.1 with JSON bodies, one request per connection:
//! - `PUT /default` with a behaviour sets the default answer;
//! - `PUT /rules` with `{"match": …, "behaviour": …}` adds or replaces a rule;
//! - `GET /total` and `GET /count?prefix=/p` read the counts.
//!
//! A behaviour is `{"status": 503, "body": "…", "delay_ms": 300, "failing": {"ratio": 0.5,
//! "status": 503}, "headers": [["name", "value"]], "reset": false}`, every field optional; a
//! match is `{"path_prefix": "/p"}` or `{"header": ["name", "value"]}`. Gates stay in-process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::client::{send_once, Request};
use crate::upstream::{trim_crlf, Behaviour, Match, Upstream};

/// Serves the control port for `upstream` until the process ends.
pub fn serve_control(upstream: Arc<Upstream>, listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        let upstream = upstream.clone();
        thread::spawn(move || {
            let _ = answer(&upstream, stream);
        });
    }
}

fn answer(upstream: &Upstream, stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let text = String::from_utf8_lossy(trim_crlf(&line)).to_string();
    let mut parts = text.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut length = 0;
    loop {
        let mut header = Vec::new();
        if reader.read_until(b'\n', &mut header)? == 0 {
            break;
        }
        let header = String::from_utf8_lossy(trim_crlf(&header)).to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(value) = header.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    let (status, reply) = match handle(upstream, method, target, &body) {
        Ok(reply) => (200, reply),
        Err(problem) => (400, problem),
    };
    let response = format!(
        "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        if status == 200 { "OK" } else { "Bad Request" },
        reply.len()
    );
    writer.write_all(response.as_bytes())
}

fn handle(upstream: &Upstream, method: &str, target: &str, body: &[u8]) -> Result<String, String> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let json = || -> Result<Value, String> {
        serde_json::from_slice(body).map_err(|error| format!("body: {error}"))
    };
    match (method, path) {
        ("PUT", "/default") => {
            upstream.set_behaviour(behaviour_from_json(&json()?)?);
            Ok("ok\n".into())
        }
        ("PUT", "/rules") => {
            let rule = json()?;
            upstream.set_rule(
                match_from_json(&rule["match"])?,
                behaviour_from_json(&rule["behaviour"])?,
            );
            Ok("ok\n".into())
        }
        ("GET", "/total") => Ok(format!("{}\n", upstream.total())),
        ("GET", "/count") => {
            let prefix = query
                .strip_prefix("prefix=")
                .ok_or("expected ?prefix=/path")?;
            Ok(format!("{}\n", upstream.count_path(prefix)))
        }
        _ => Err(format!("no control endpoint {method} {path}\n")),
    }
}

fn behaviour_to_json(behaviour: &Behaviour) -> Value {
    json!({
        "status": behaviour.status,
        "body": String::from_utf8_lossy(&behaviour.body),
        "delay_ms": u64::try_from(behaviour.delay.as_millis()).unwrap_or(u64::MAX),
        "failing": behaviour.failure.map(|(ratio, status)| json!({"ratio": ratio, "status": status})),
        "headers": behaviour.headers,
        "reset": behaviour.reset,
    })
}

fn behaviour_from_json(value: &Value) -> Result<Behaviour, String> {
    if !value.is_object() {
        return Err("behaviour: expected an object".into());
    }
    let mut behaviour = Behaviour::ok();
    if let Some(status) = value.get("status").and_then(Value::as_u64) {
        behaviour.status = u16::try_from(status).map_err(|_| "behaviour.status: too large")?;
    }
    if let Some(body) = value.get("body").and_then(Value::as_str) {
        behaviour.body = body.as_bytes().to_vec();
    }
    if let Some(delay) = value.get("delay_ms").and_then(Value::as_u64) {
        behaviour.delay = Duration::from_millis(delay);
    }
    if let Some(failing) = value.get("failing").filter(|f| !f.is_null()) {
        let ratio = failing["ratio"]
            .as_f64()
            .ok_or("behaviour.failing.ratio: expected a number")?;
        let status = failing["status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .ok_or("behaviour.failing.status: expected a status")?;
        behaviour.failure = Some((ratio, status));
    }
    for pair in value
        .get("headers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match (pair[0].as_str(), pair[1].as_str()) {
            (Some(name), Some(value)) => behaviour.headers.push((name.into(), value.into())),
            _ => return Err("behaviour.headers: expected [name, value] pairs".into()),
        }
    }
    behaviour.reset = value.get("reset").and_then(Value::as_bool).unwrap_or(false);
    Ok(behaviour)
}

fn match_to_json(matcher: &Match) -> Value {
    match matcher {
        Match::PathPrefix(prefix) => json!({"path_prefix": prefix}),
        Match::Header(name, value) => json!({"header": [name, value]}),
    }
}

fn match_from_json(value: &Value) -> Result<Match, String> {
    if let Some(prefix) = value.get("path_prefix").and_then(Value::as_str) {
        return Ok(Match::PathPrefix(prefix.into()));
    }
    match value.get("header").map(|h| (h[0].as_str(), h[1].as_str())) {
        Some((Some(name), Some(header_value))) => {
            Ok(Match::Header(name.into(), header_value.into()))
        }
        _ => Err("match: expected {\"path_prefix\": …} or {\"header\": [name, value]}".into()),
    }
}

/// Drives a `seawall-upstream` through its control port.
#[derive(Debug, Clone, Copy)]
pub struct RemoteUpstream {
    control: SocketAddr,
}

impl RemoteUpstream {
    pub fn new(control: SocketAddr) -> Self {
        RemoteUpstream { control }
    }

    pub fn set_behaviour(&self, behaviour: &Behaviour) -> Result<(), String> {
        self.call("PUT", "/default", Some(behaviour_to_json(behaviour)))
            .map(drop)
    }

    pub fn set_rule(&self, matcher: &Match, behaviour: &Behaviour) -> Result<(), String> {
        let rule =
            json!({"match": match_to_json(matcher), "behaviour": behaviour_to_json(behaviour)});
        self.call("PUT", "/rules", Some(rule)).map(drop)
    }

    pub fn total(&self) -> Result<u64, String> {
        self.number("/total")
    }

    pub fn count_path(&self, prefix: &str) -> Result<u64, String> {
        self.number(&format!("/count?prefix={prefix}"))
    }

    /// Whether the control port answers.
    pub fn answers(&self) -> bool {
        self.total().is_ok()
    }

    fn number(&self, path: &str) -> Result<u64, String> {
        let text = self.call("GET", path, None)?;
        text.trim()
            .parse()
            .map_err(|_| format!("upstream control {path}: not a number: {text:?}"))
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<String, String> {
        let mut request = Request::get(path).method(method);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = send_once(self.control, &request)
            .map_err(|error| format!("upstream control {}: {error}", self.control))?;
        if response.status != 200 {
            return Err(format!(
                "upstream control {method} {path}: {} {}",
                response.status,
                response.text().trim()
            ));
        }
        Ok(response.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;

    #[test]
    fn a_remote_driver_sets_rules_and_reads_counts() {
        let upstream = Arc::new(Upstream::start());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let control = RemoteUpstream::new(listener.local_addr().unwrap());
        let serving = upstream.clone();
        thread::spawn(move || serve_control(serving, listener));

        control
            .set_rule(
                &Match::PathPrefix("/down".into()),
                &Behaviour::ok()
                    .status(503)
                    .body("down\n")
                    .header("x-why", "test"),
            )
            .unwrap();
        control
            .set_rule(
                &Match::Header("x-half".into(), "1".into()),
                &Behaviour::ok().failing(0.5, 502),
            )
            .unwrap();
        control
            .set_behaviour(&Behaviour::ok().body("hello\n"))
            .unwrap();
        let mut client = Client::connect(upstream.addr());
        let down = client.send(&Request::get("/down/x")).unwrap();
        assert_eq!((down.status, down.text().as_str()), (503, "down\n"));
        assert_eq!(down.header("x-why"), Some("test"));
        assert_eq!(client.send(&Request::get("/")).unwrap().text(), "hello\n");
        let half: Vec<u16> = (0..4)
            .map(|_| {
                client
                    .send(&Request::get("/h").header("x-half", "1"))
                    .unwrap()
                    .status
            })
            .collect();
        assert_eq!(half.iter().filter(|&&s| s == 502).count(), 2);
        assert_eq!(control.total().unwrap(), 6);
        assert_eq!(control.count_path("/down").unwrap(), 1);
        let refused = control.call("PUT", "/rules", Some(json!({"match": {}})));
        assert!(refused.unwrap_err().contains("400"));
    }
}
