//! An upstream the scenario controls and that counts what it received, so tests can assert on
//! what actually reached the service behind Envoy, not only on what the client saw.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What the upstream answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    pub status: u16,
    pub delay: Duration,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// Fails exactly `ratio` of the requests (error diffusion, not chance) with `status`.
    pub failure: Option<(f64, u16)>,
    /// Closes the connection instead of answering (after `delay`).
    pub reset: bool,
    /// Holds the answer (after `delay`) until the gate opens.
    pub gate: Option<Gate>,
}

impl Behaviour {
    pub fn ok() -> Self {
        Behaviour {
            status: 200,
            delay: Duration::ZERO,
            body: b"ok\n".to_vec(),
            headers: Vec::new(),
            failure: None,
            reset: false,
            gate: None,
        }
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn failing(mut self, ratio: f64, status: u16) -> Self {
        self.failure = Some((ratio, status));
        self
    }

    /// Drops the connection without a response: Envoy sees an upstream reset.
    pub fn resetting(mut self) -> Self {
        self.reset = true;
        self
    }

    /// Holds every answer until `gate` opens: requests stay in flight exactly as long as the
    /// scenario needs, whatever the machine's load.
    pub fn held(mut self, gate: &Gate) -> Self {
        self.gate = Some(gate.clone());
        self
    }
}

/// Longest an answer waits for its gate, so a scenario that fails before opening it leaves no
/// thread behind for good (Envoy's route timeout, 15 s, has answered the client by then).
const MAX_HOLD: Duration = Duration::from_secs(20);

/// A gate the upstream holds answers behind (see [`Behaviour::held`]); closed until opened.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn new() -> Self {
        Gate::default()
    }

    /// Lets every held answer (and every later one) go.
    pub fn open(&self) {
        let (open, changed) = &*self.0;
        *open.lock().unwrap() = true;
        changed.notify_all();
    }

    fn wait(&self) {
        let (open, changed) = &*self.0;
        let guard = open.lock().unwrap();
        let _ = changed
            .wait_timeout_while(guard, MAX_HOLD, |open| !*open)
            .unwrap();
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = *self.0 .0.lock().unwrap();
        f.debug_struct("Gate").field("open", &open).finish()
    }
}

impl PartialEq for Gate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    PathPrefix(String),
    Header(String, String),
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body_len: usize,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Default)]
struct Record {
    received: Vec<Received>,
    per_path: HashMap<String, u64>,
    in_flight: u64,
    peak: u64,
    in_flight_by_prefix: HashMap<String, (u64, u64)>,
    /// Requests counted but not recorded (beyond `MAX_RECORDED`).
    unrecorded: u64,
}

struct Shared {
    default: Mutex<(Behaviour, f64)>,
    rules: Mutex<Vec<(Match, Behaviour, f64)>>,
    record: Mutex<Record>,
    total: AtomicU64,
    stopping: AtomicBool,
    /// The open connections, so that stopping can shut them: each is removed when its server
    /// thread ends, or a long run that churns connections would run out of file descriptors.
    connections: Mutex<HashMap<u64, TcpStream>>,
    next_connection: AtomicU64,
    tracked_prefixes: Mutex<Vec<String>>,
}

/// The running server; stops on drop.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

const MAX_RECORDED: usize = 20_000;

impl Upstream {
    pub fn start() -> Upstream {
        Upstream::bind("127.0.0.1:0").expect("bind the upstream")
    }

    /// Binds a fixed address (the demo's upstream).
    pub fn bind(address: &str) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(address)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            default: Mutex::new((Behaviour::ok(), 0.0)),
            rules: Mutex::new(Vec::new()),
            record: Mutex::new(Record::default()),
            total: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            tracked_prefixes: Mutex::new(Vec::new()),
        });
        let accepting = shared.clone();
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if accepting.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let id = accepting.next_connection.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    accepting.connections.lock().unwrap().insert(id, clone);
                }
                let serving = accepting.clone();
                thread::spawn(move || {
                    serve(stream, &serving);
                    serving.connections.lock().unwrap().remove(&id);
                });
            }
        });
        Ok(Upstream {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.default.lock().unwrap() = (behaviour, 0.0);
    }

    /// Adds a rule; the first matching rule wins over the default behaviour.
    pub fn set_rule(&self, matcher: Match, behaviour: Behaviour) {
        let mut rules = self.shared.rules.lock().unwrap();
        rules.retain(|(m, _, _)| *m != matcher);
        rules.push((matcher, behaviour, 0.0));
    }

    /// Tracks in-flight concurrency separately for paths starting with `prefix`.
    pub fn track_prefix(&self, prefix: &str) {
        self.shared
            .tracked_prefixes
            .lock()
            .unwrap()
            .push(prefix.to_owned());
    }

    /// Connections open now (a connection the client closed is gone once its thread has ended).
    pub fn open_connections(&self) -> usize {
        self.shared.connections.lock().unwrap().len()
    }

    pub fn total(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// Waits (at most 10 s) until `more` requests beyond `seen` have arrived: a background load
    /// is then under way. Panics if they do not come.
    pub fn wait_for_traffic(&self, seen: u64, more: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.total() < seen + more {
            assert!(
                Instant::now() < deadline,
                "the load sent {} requests in 10 s",
                self.total() - seen
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Requests whose path (without query) starts with `prefix`.
    pub fn count_path(&self, prefix: &str) -> u64 {
        let record = self.shared.record.lock().unwrap();
        record
            .per_path
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every request received, as recorded. A scenario that sent more than `MAX_RECORDED` would
    /// read an incomplete record: that fails here rather than as a wrong count later.
    pub fn received(&self) -> Vec<Received> {
        let record = self.shared.record.lock().unwrap();
        assert_eq!(
            record.unrecorded, 0,
            "the upstream recorded only the first {MAX_RECORDED} requests: pace the load or count with total()/count_path()"
        );
        record.received.clone()
    }

    /// When the requests `keep` selects arrived, in order: the upstream's own clock, which is
    /// what a time-derived expectation must use (not the client's, which also counts connection
    /// setup and its own scheduling).
    pub fn arrivals_where(&self, keep: impl Fn(&Received) -> bool) -> Vec<Instant> {
        let record = self.shared.record.lock().unwrap();
        assert_eq!(
            record.unrecorded, 0,
            "the upstream recorded only the first {MAX_RECORDED} requests: arrival times are incomplete"
        );
        let mut arrivals: Vec<Instant> = record
            .received
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.at)
            .collect();
        arrivals.sort();
        arrivals
    }

    /// Arrivals of the requests whose path starts with `prefix`, in order.
    pub fn arrivals(&self, prefix: &str) -> Vec<Instant> {
        self.arrivals_where(|r| r.path.starts_with(prefix))
    }

    /// The first and the last arrival of the requests `keep` selects (`None`: none arrived).
    pub fn arrival_window_where(
        &self,
        keep: impl Fn(&Received) -> bool,
    ) -> Option<(Instant, Instant)> {
        let arrivals = self.arrivals_where(keep);
        Some((*arrivals.first()?, *arrivals.last()?))
    }

    /// The first and the last arrival of the requests whose path starts with `prefix`.
    pub fn arrival_window(&self, prefix: &str) -> Option<(Instant, Instant)> {
        self.arrival_window_where(|r| r.path.starts_with(prefix))
    }

    pub fn received_with_header(&self, name: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.header(name).is_some())
            .collect()
    }

    pub fn peak_in_flight(&self) -> u64 {
        self.shared.record.lock().unwrap().peak
    }

    pub fn peak_in_flight_for(&self, prefix: &str) -> u64 {
        self.shared
            .record
            .lock()
            .unwrap()
            .in_flight_by_prefix
            .get(prefix)
            .map_or(0, |(_, peak)| *peak)
    }

    pub fn reset_counters(&self) {
        let mut record = self.shared.record.lock().unwrap();
        let in_flight = record.in_flight;
        *record = Record {
            in_flight,
            ..Record::default()
        };
        self.shared.total.store(0, Ordering::SeqCst);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, connection) in self.shared.connections.lock().unwrap().drain() {
            let _ = connection.shutdown(Shutdown::Both);
        }
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Applies the behaviour's failure ratio by error diffusion: over N requests, exactly
/// round(ratio × N) fail.
fn resolve(behaviour: &Behaviour, debt: &mut f64) -> (u16, bool) {
    match behaviour.failure {
        Some((ratio, status)) => {
            *debt += ratio;
            if *debt >= 1.0 - 1e-9 {
                *debt -= 1.0;
                (status, true)
            } else {
                (behaviour.status, false)
            }
        }
        None => (behaviour.status, false),
    }
}

fn choose(shared: &Shared, path: &str, headers: &[(String, Vec<u8>)]) -> (Behaviour, u16) {
    let mut rules = shared.rules.lock().unwrap();
    for (matcher, behaviour, debt) in rules.iter_mut() {
        let hit = match matcher {
            Match::PathPrefix(prefix) => path.starts_with(prefix.as_str()),
            Match::Header(name, value) => headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case(name) && v.as_slice() == value.as_bytes()),
        };
        if hit {
            let (status, _) = resolve(behaviour, debt);
            return (behaviour.clone(), status);
        }
    }
    drop(rules);
    let mut default = shared.default.lock().unwrap();
    let (behaviour, debt) = &mut *default;
    let (status, _) = resolve(behaviour, debt);
    (behaviour.clone(), status)
}

fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while let Some((method, path, headers, body_len)) = read_request(&mut reader) {
        let started = Instant::now();
        let bare = path.split('?').next().unwrap_or("").to_owned();
        let sequence = shared.total.fetch_add(1, Ordering::SeqCst) + 1;
        let tracked: Vec<String> = shared
            .tracked_prefixes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| bare.starts_with(p.as_str()))
            .cloned()
            .collect();
        {
            let mut record = shared.record.lock().unwrap();
            *record.per_path.entry(bare.clone()).or_default() += 1;
            record.in_flight += 1;
            record.peak = record.peak.max(record.in_flight);
            for prefix in &tracked {
                let entry = record
                    .in_flight_by_prefix
                    .entry(prefix.clone())
                    .or_default();
                entry.0 += 1;
                entry.1 = entry.1.max(entry.0);
            }
            if record.received.len() < MAX_RECORDED {
                record.received.push(Received {
                    method: method.clone(),
                    path: path.clone(),
                    headers: headers.clone(),
                    body_len,
                    at: started,
                });
            } else {
                record.unrecorded += 1;
            }
        }
        let (behaviour, status) = choose(shared, &bare, &headers);
        if !behaviour.delay.is_zero() {
            thread::sleep(behaviour.delay);
        }
        if let Some(gate) = &behaviour.gate {
            gate.wait();
        }
        if behaviour.reset {
            let mut record = shared.record.lock().unwrap();
            record.in_flight = record.in_flight.saturating_sub(1);
            for prefix in &tracked {
                if let Some(entry) = record.in_flight_by_prefix.get_mut(prefix) {
                    entry.0 = entry.0.saturating_sub(1);
                }
            }
            let _ = writer.shutdown(Shutdown::Both);
            break;
        }
        let mut response = format!(
            "HTTP/1.1 {status} {}\r\ncontent-length: {}\r\nx-upstream-path: {path}\r\nx-upstream-method: {method}\r\nx-upstream-request-id: {sequence}\r\n",
            reason(status),
            behaviour.body.len()
        );
        for (name, value) in &behaviour.headers {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str("\r\n");
        let mut bytes = response.into_bytes();
        bytes.extend_from_slice(&behaviour.body);
        let written = writer.write_all(&bytes).and_then(|()| writer.flush());
        {
            let mut record = shared.record.lock().unwrap();
            record.in_flight = record.in_flight.saturating_sub(1);
            for prefix in &tracked {
                if let Some(entry) = record.in_flight_by_prefix.get_mut(prefix) {
                    entry.0 = entry.0.saturating_sub(1);
                }
            }
        }
        if written.is_err() || shared.stopping.load(Ordering::SeqCst) {
            break;
        }
    }
}

type Head = (String, String, Vec<(String, Vec<u8>)>, usize);

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Head> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line).ok()? == 0 {
        return None;
    }
    let text = String::from_utf8_lossy(&line);
    let mut parts = text.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = Vec::new();
        if reader.read_until(b'\n', &mut header).ok()? == 0 {
            return None;
        }
        let trimmed = trim_crlf(&header);
        if trimmed.is_empty() {
            break;
        }
        let colon = trimmed.iter().position(|&b| b == b':')?;
        let name = String::from_utf8_lossy(&trimmed[..colon]).to_ascii_lowercase();
        let value = trim_spaces(&trimmed[colon + 1..]).to_vec();
        headers.push((name, value));
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).to_string())
    };
    let mut body_len = 0;
    if let Some(length) = find("content-length") {
        let length: usize = length.trim().parse().ok()?;
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        body_len = length;
    } else if find("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body_len = crate::client::read_chunked(reader).ok()?.len();
    }
    Some((method, path, headers, body_len))
}

pub(crate) fn trim_crlf(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
        end -= 1;
    }
    &line[..end]
}

pub(crate) fn trim_spaces(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &value[start..end]
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{send_once, Client, Request};

    #[test]
    fn a_closed_connection_is_let_go() {
        let upstream = Upstream::start();
        for _ in 0..200 {
            assert_eq!(
                send_once(upstream.addr(), &Request::get("/"))
                    .unwrap()
                    .status,
                200
            );
        }
        let kept = Client::open_now(upstream.addr()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while upstream.open_connections() != 1 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        // Only the connection still open is held: 200 closed ones would be 200 file descriptors.
        assert_eq!(upstream.open_connections(), 1);
        drop(kept);
    }

    #[test]
    fn serves_rules_and_counts() {
        let upstream = Upstream::start();
        upstream.set_rule(
            Match::PathPrefix("/bad".into()),
            Behaviour::ok().failing(0.25, 503),
        );
        let mut client = Client::connect(upstream.addr());
        let ok = client.send(&Request::get("/hello?x=1")).unwrap();
        assert_eq!(ok.status, 200);
        assert_eq!(ok.body, b"ok\n");
        assert_eq!(ok.header("x-upstream-path"), Some("/hello?x=1"));
        let failures = (0..100)
            .filter(|_| client.send(&Request::get("/bad")).unwrap().status == 503)
            .count();
        assert_eq!(failures, 25);
        assert_eq!(upstream.count_path("/bad"), 100);
        assert_eq!(upstream.total(), 101);
        let weird = client
            .send(&Request::get("/h").header("x-raw", [0xff, 0xfe]))
            .unwrap();
        assert_eq!(weird.status, 200);
        assert_eq!(
            upstream.received_with_header("x-raw")[0].header("x-raw"),
            Some(&[0xff, 0xfe][..])
        );
    }

    #[test]
    fn holds_answers_behind_a_gate_and_reports_arrival_windows() {
        let upstream = Upstream::start();
        let gate = Gate::new();
        upstream.set_rule(
            Match::PathPrefix("/held".into()),
            Behaviour::ok().held(&gate),
        );
        let addr = upstream.addr();
        let held = thread::spawn(move || Client::connect(addr).send(&Request::get("/held")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while upstream.count_path("/held") == 0 {
            assert!(Instant::now() < deadline, "the held request never arrived");
            thread::sleep(Duration::from_millis(5));
        }
        let mut client = Client::connect(addr);
        for _ in 0..2 {
            assert_eq!(client.send(&Request::get("/a")).unwrap().status, 200);
        }
        assert!(!held.is_finished(), "the gate holds the answer");
        assert_eq!(upstream.peak_in_flight(), 2);
        gate.open();
        assert_eq!(held.join().unwrap().unwrap().status, 200);
        let arrivals = upstream.arrivals("/a");
        assert_eq!(arrivals.len(), 2);
        assert_eq!(
            upstream.arrival_window("/a"),
            Some((arrivals[0], arrivals[1]))
        );
        let (first, last) = upstream.arrival_window("/").unwrap();
        assert!(first <= arrivals[0] && last == arrivals[1]);
        assert_eq!(upstream.arrival_window("/none"), None);
    }
}
