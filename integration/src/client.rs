//! A raw HTTP/1.1 client: it writes exactly the bytes a scenario asks for (64 KiB headers,
//! non-UTF-8 values, spoofed `x-envoy-*`), and a bounded load generator on top of it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::upstream::{trim_crlf, trim_spaces};

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Request {
            method: "GET".into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn post(path: &str) -> Self {
        Request::get(path).method("POST")
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = method.into();
        self
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    pub fn authority(self, host: &str) -> Self {
        self.header("host", host)
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("host"))
        {
            bytes.extend_from_slice(b"host: seawall.test\r\n");
        }
        for (name, value) in &self.headers {
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b"\r\n");
        }
        if !self.body.is_empty() || self.method == "POST" || self.method == "PUT" {
            bytes.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub elapsed: Duration,
}

impl Response {
    /// A header's value as text, case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn header_u64(&self, name: &str) -> Option<u64> {
        self.header(name)?.trim().parse().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One keep-alive connection; reconnects when the server closed it.
pub struct Client {
    addr: SocketAddr,
    connection: Option<(TcpStream, BufReader<TcpStream>)>,
    pub timeout: Duration,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        Client {
            addr,
            connection: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// Connects now rather than on the first request, so the connection exists (and Envoy has a
    /// worker for it) before anything is sent.
    pub fn open_now(addr: SocketAddr) -> io::Result<Self> {
        let mut client = Client::connect(addr);
        client.open()?;
        Ok(client)
    }

    /// Whether a connection is open (requests then go on it rather than on a new one).
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    fn open(&mut self) -> io::Result<()> {
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        self.connection = Some((stream, reader));
        Ok(())
    }

    pub fn send(&mut self, request: &Request) -> io::Result<Response> {
        let reused = self.connection.is_some();
        match self.try_send(request) {
            Ok(response) => Ok(response),
            // A kept-alive connection the server closed meanwhile: retry once on a fresh one.
            Err(_) if reused => {
                self.connection = None;
                self.try_send(request)
            }
            Err(error) => Err(error),
        }
    }

    fn try_send(&mut self, request: &Request) -> io::Result<Response> {
        if self.connection.is_none() {
            self.open()?;
        }
        let started = Instant::now();
        let (stream, reader) = self
            .connection
            .as_mut()
            .expect("connection was just opened");
        stream.write_all(&request.to_bytes())?;
        let response = read_response(reader, request.method == "HEAD");
        let keep = match &response {
            Ok((_, close)) => !close,
            Err(_) => false,
        };
        if !keep {
            self.connection = None;
        }
        response.map(|(mut response, _)| {
            response.elapsed = started.elapsed();
            response
        })
    }
}

/// Sends one request on a fresh connection.
pub fn send_once(addr: SocketAddr, request: &Request) -> io::Result<Response> {
    Client::connect(addr).send(request)
}

fn read_response(
    reader: &mut BufReader<TcpStream>,
    head_only: bool,
) -> io::Result<(Response, bool)> {
    let mut line = Vec::new();
    if reader.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status_line = String::from_utf8_lossy(&line).into_owned();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        let mut header = Vec::new();
        reader.read_until(b'\n', &mut header)?;
        let trimmed = trim_crlf(&header);
        if trimmed.is_empty() {
            break;
        }
        if let Some(colon) = trimmed.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&trimmed[..colon]).to_ascii_lowercase();
            headers.push((name, trim_spaces(&trimmed[colon + 1..]).to_vec()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase())
    };
    let close = find("connection").is_some_and(|c| c.contains("close"));
    let body = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if let Some(length) = find("content-length") {
        let length: usize = length
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    } else if find("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        read_chunked(reader)?
    } else {
        let mut body = Vec::new();
        reader.read_to_end(&mut body)?;
        return Ok((
            Response {
                status,
                headers,
                body,
                elapsed: Duration::ZERO,
            },
            true,
        ));
    };
    Ok((
        Response {
            status,
            headers,
            body,
            elapsed: Duration::ZERO,
        },
        close,
    ))
}

pub(crate) fn read_chunked<R: BufRead>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = Vec::new();
        reader.read_until(b'\n', &mut size_line)?;
        let text = String::from_utf8_lossy(trim_crlf(&size_line)).into_owned();
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16).map_err(
            |_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {text:?}"),
                )
            },
        )?;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let mut trailer = Vec::new();
                reader.read_until(b'\n', &mut trailer)?;
                if trim_crlf(&trailer).is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

/// A bounded load: `connections` threads, each sending until `duration` passes or `total`
/// requests have been sent in all, optionally paced to `rate` requests per second overall.
pub struct LoadSpec {
    pub connections: usize,
    pub duration: Duration,
    pub total: Option<u64>,
    pub rate: Option<f64>,
    pub request: Arc<dyn Fn(u64) -> Request + Send + Sync>,
}

impl LoadSpec {
    pub fn new(
        connections: usize,
        duration: Duration,
        request: impl Fn(u64) -> Request + Send + Sync + 'static,
    ) -> Self {
        LoadSpec {
            connections,
            duration,
            total: None,
            rate: None,
            request: Arc::new(request),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub statuses: std::collections::BTreeMap<u16, u64>,
    /// Sorted.
    pub latencies: Vec<Duration>,
    pub errors: u64,
    pub elapsed: Duration,
}

impl LoadReport {
    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    pub fn sent(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }
}

pub fn load(addr: SocketAddr, spec: LoadSpec) -> LoadReport {
    let started = Instant::now();
    let sequence = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..spec.connections.max(1))
        .map(|_| {
            let request = spec.request.clone();
            let sequence = sequence.clone();
            let (duration, total, rate) = (spec.duration, spec.total, spec.rate);
            thread::spawn(move || {
                let mut client = Client::connect(addr);
                let mut report = LoadReport::default();
                loop {
                    let n = sequence.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if started.elapsed() >= duration || total.is_some_and(|t| n >= t) {
                        break;
                    }
                    if let Some(rate) = rate {
                        let due = started + Duration::from_secs_f64(n as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    match client.send(&request(n)) {
                        Ok(response) => {
                            *report.statuses.entry(response.status).or_default() += 1;
                            report.latencies.push(response.elapsed);
                        }
                        Err(_) => report.errors += 1,
                    }
                }
                report
            })
        })
        .collect();
    let mut merged = LoadReport::default();
    for worker in workers {
        let report = worker.join().expect("load worker panicked");
        for (status, count) in report.statuses {
            *merged.statuses.entry(status).or_default() += count;
        }
        merged.latencies.extend(report.latencies);
        merged.errors += report.errors;
    }
    merged.latencies.sort();
    merged.elapsed = started.elapsed();
    merged
}
