//! Requests per second of real HTTP through the test bed: tiny HTTP/1.1 responders on the
//! backends, `wrk` in the client namespace.
//!
//! The responders are one tokio runtime in the benchmark's own process with a listener in
//! every backend's namespace (a socket stays in the namespace it was made in, whichever
//! thread then serves it). The test bed's own servers (`tests/common/http.rs`) start a thread
//! per connection and poll their listener every 5 ms: made for correctness, not rates (with
//! `Connection: close` they answered about half as many requests as these; see
//! `docs/PERFORMANCE.md`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::netns;

/// Most a request's head may hold before the responder drops the connection.
const MAX_HEAD: usize = 16 * 1024;

/// HTTP/1.1 responders on 0.0.0.0:`port` in each backend namespace. Each answers every
/// request (a GET without a body, as wrk sends) with 200 and the backend's name, keeps the
/// connection open unless the request says `Connection: close`. Stopped on drop.
pub struct Responders {
    rt: Option<tokio::runtime::Runtime>,
    answered: Arc<AtomicU64>,
}

impl Responders {
    /// `backends`: (namespace, name). `workers`: the runtime's threads, shared by all.
    pub fn start(backends: &[(String, String)], port: u16, workers: usize) -> Responders {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("http-responder")
            .enable_io()
            .build()
            .unwrap_or_else(|e| panic!("starting the responders' runtime: {e}"));
        let answered = Arc::new(AtomicU64::new(0));
        for (ns, name) in backends {
            let listener = netns::run_in(ns, || {
                let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{name}: responder on 0.0.0.0:{port} in {ns}: {e}"));
            let _in_rt = rt.enter();
            let listener = tokio::net::TcpListener::from_std(listener)
                .unwrap_or_else(|e| panic!("{name}: registering the listener: {e}"));
            let responses = Arc::new(Responses::new(name));
            let answered = answered.clone();
            rt.spawn(async move {
                loop {
                    // Errors here are the peer's (ECONNABORTED and the like): keep accepting.
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let responses = responses.clone();
                    let answered = answered.clone();
                    tokio::spawn(async move {
                        let _ = serve(stream, &responses, &answered).await;
                    });
                }
            });
        }
        Responders {
            rt: Some(rt),
            answered,
        }
    }

    /// Requests answered so far, all backends together.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for Responders {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A backend's two possible answers, made once.
struct Responses {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl Responses {
    fn new(body: &str) -> Responses {
        let make = |connection: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: {connection}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        Responses {
            keep_alive: make("keep-alive"),
            close: make("close"),
        }
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    responses: &Responses,
    answered: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Every complete request head in the buffer (wrk sends one at a time, but pipelined
        // requests are answered in order too).
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let close = has_connection_close(&buf[..end]);
            let response = if close {
                &responses.close
            } else {
                &responses.keep_alive
            };
            stream.write_all(response).await?;
            answered.fetch_add(1, Ordering::Relaxed);
            if close {
                // The request was read in full, so closing sends a FIN, not a reset.
                stream.shutdown().await?;
                return Ok(());
            }
            buf.drain(..end + 4);
        }
        if buf.len() > MAX_HEAD {
            return Ok(());
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether a request head has a `Connection: close` header (any case).
fn has_connection_close(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').skip(1).any(|line| {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return false;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        name.eq_ignore_ascii_case(b"connection")
            && value.trim_ascii().eq_ignore_ascii_case(b"close")
    })
}

/// wrk prints this line from the script's `done` hook: the figures without parsing its human
/// output.
const MARK: &str = "LBBENCH";

/// The Lua script handed to wrk with `-s`.
const SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("LBBENCH %d %d %d %d %d %d %d %.1f %.1f\n",
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// Writes wrk's script into `dir` and returns its path.
pub fn write_script(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("wrk-summary.lua");
    std::fs::write(&file, SCRIPT).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    file
}

/// How wrk is run.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    /// Whole seconds (wrk's own unit).
    pub seconds: u32,
    /// `Connection: close` on every request: a new TCP connection (and flow) per request.
    pub close: bool,
}

/// What one wrk run reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrkRun {
    pub requests: u64,
    pub duration: Duration,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: Errors,
}

/// wrk's error counters: connect, read, write, timeout, and responses that were not 2xx/3xx.
#[derive(Clone, Copy, Debug, Default)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub status: u64,
    pub timeout: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }

    pub fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.status += o.status;
        self.timeout += o.timeout;
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("connect", self.connect),
            ("read", self.read),
            ("write", self.write),
            ("status", self.status),
            ("timeout", self.timeout),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
        parts.join(", ")
    }
}

impl WrkRun {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

/// Runs wrk from namespace `ns` against `http://addr/`; panics when it cannot run or prints
/// no summary.
pub fn run(ns: &str, addr: SocketAddr, load: Load, script: &Path) -> WrkRun {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "wrk"])
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .args(["--timeout", "2s", "-s"])
        .arg(script);
    if load.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/"));
    let desc = netns::describe(&cmd);
    let out = netns::run_timeout(&mut cmd, Duration::from_secs(u64::from(load.seconds) + 15));
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "`{desc}` failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse(&stdout).unwrap_or_else(|| panic!("`{desc}` printed no summary line:\n{stdout}"))
}

fn parse(stdout: &str) -> Option<WrkRun> {
    let line = stdout.lines().find(|l| l.starts_with(MARK))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if f.len() != 9 {
        return None;
    }
    let n = |i: usize| f[i] as u64;
    Some(WrkRun {
        duration: Duration::from_micros(n(0)),
        requests: n(1),
        errors: Errors {
            connect: n(2),
            read: n(3),
            write: n(4),
            status: n(5),
            timeout: n(6),
        },
        p50_us: f[7],
        p99_us: f[8],
    })
}

/// Whether `wrk` runs (it prints its version and exits 1 for `-v`).
pub fn present() -> bool {
    Command::new("wrk").arg("-v").output().is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout).contains("wrk")
            || String::from_utf8_lossy(&o.stderr).contains("wrk")
    })
}
