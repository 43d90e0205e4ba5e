//! A tiny HTTP/1.1 server for the backends and a client for the client namespace, on std
//! sockets created inside the right namespace (see `netns::run_in`). Every body the server sends
//! is the backend's name, so a client knows which backend answered.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::netns;

/// How long a client waits for a connection or a response. Long enough for one SYN
/// retransmission (1 s) on a loaded 2-core machine, short enough that a broken data path fails
/// a test in seconds rather than hanging it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the server threads look at their stop flags.
const POLL: Duration = Duration::from_millis(20);
const MAX_HEADER: usize = 16 * 1024;

/// One backend's HTTP server, listening on 0.0.0.0:`port` inside namespace `ns`.
pub struct Server {
    name: String,
    ns: String,
    port: u16,
    /// Requests answered since creation (TCP health checks connect but send no request, and
    /// requests to a path given a status with `set_status` are HTTP health checks: neither
    /// counts).
    requests: Arc<AtomicU64>,
    /// Status codes by path (lower case) that differ from 200; see `set_status`.
    statuses: Arc<Mutex<BTreeMap<String, u16>>>,
    /// Set on drop: every connection thread ends.
    shutdown: Arc<AtomicBool>,
    acceptor: Option<(Arc<AtomicBool>, JoinHandle<io::Result<()>>)>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    pub fn new(name: &str, ns: &str, port: u16) -> Self {
        Self {
            name: name.to_owned(),
            ns: ns.to_owned(),
            port,
            requests: Arc::new(AtomicU64::new(0)),
            statuses: Arc::new(Mutex::new(BTreeMap::new())),
            shutdown: Arc::new(AtomicBool::new(false)),
            acceptor: None,
            conns: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn is_running(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Answers GETs of `path` with status `code` from now on (for example 503 on a health-check
    /// path), also while running. Such requests are not counted in `requests`.
    pub fn set_status(&self, path: &str, code: u16) {
        self.statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_ascii_lowercase(), code);
    }

    /// Binds the listener (inside the namespace) and starts accepting. Returns once the port
    /// accepts connections.
    pub fn start(&mut self) {
        assert!(
            self.acceptor.is_none(),
            "{}: server already running",
            self.name
        );
        let port = self.port;
        // Dual stack where the namespace has IPv6 ([::] also accepts IPv4), else IPv4 only.
        let listener = netns::run_in(&self.ns, move || {
            TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))
        })
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("{}: bind port {port}: {e}", self.name));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = ConnCtx {
            name: self.name.clone(),
            requests: self.requests.clone(),
            statuses: self.statuses.clone(),
            shutdown: self.shutdown.clone(),
        };
        let conns = self.conns.clone();
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name(format!("srv-{}", self.name))
            .spawn(move || accept_loop(listener, &stop2, &ctx, &conns))
            .expect("spawning the accept thread");
        self.acceptor = Some((stop, handle));
    }

    /// Stops accepting and closes the listener, so new connections are refused (RST) from the
    /// moment this returns. Connections already open keep being served.
    pub fn stop(&mut self) {
        if let Some((stop, handle)) = self.acceptor.take() {
            stop.store(true, Ordering::SeqCst);
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("{}: accept loop ended with {e}", self.name),
                Err(_) => eprintln!("{}: accept thread panicked", self.name),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.stop();
        let handles = std::mem::take(&mut *self.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }
}

#[derive(Clone)]
struct ConnCtx {
    name: String,
    requests: Arc<AtomicU64>,
    statuses: Arc<Mutex<BTreeMap<String, u16>>>,
    shutdown: Arc<AtomicBool>,
}

fn accept_loop(
    listener: TcpListener,
    stop: &AtomicBool,
    ctx: &ConnCtx,
    conns: &Mutex<Vec<JoinHandle<()>>>,
) -> io::Result<()> {
    while !stop.load(Ordering::SeqCst) && !ctx.shutdown.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _peer)) => {
                let ctx = ctx.clone();
                let h = std::thread::Builder::new()
                    .name(format!("conn-{}", ctx.name))
                    .spawn(move || {
                        let _ = serve_conn(stream, &ctx);
                    })?;
                let mut list = conns.lock().unwrap_or_else(|e| e.into_inner());
                list.retain(|h| !h.is_finished());
                list.push(h);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL / 4),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ECONNABORTED and friends: the peer went away before we accepted; keep going.
            Err(_) => std::thread::sleep(POLL / 4),
        }
    }
    Ok(())
    // The listener drops here: the port refuses new connections from now on.
}

/// Serves keep-alive HTTP/1.1 on one connection until the client closes, asks for
/// `Connection: close`, or the server shuts down.
fn serve_conn(mut stream: TcpStream, ctx: &ConnCtx) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL * 5))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if ctx.shutdown.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(end) = find_header_end(&buf) {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            // Requests from our client carry no body; anything else is not HTTP we speak.
            if !head.starts_with("get ") {
                return Ok(());
            }
            let close = head.contains("\r\nconnection: close");
            let path = head.split(' ').nth(1).unwrap_or("/");
            let set = ctx
                .statuses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(path)
                .copied();
            let resp = format!(
                "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: {}\r\n\r\n{}",
                set.unwrap_or(200),
                if set.is_none() { "OK" } else { "Set By Test" },
                ctx.name.len(),
                if close { "close" } else { "keep-alive" },
                ctx.name
            );
            // Counted before the answer leaves, so a client that has its answer sees the count.
            if set.is_none() {
                ctx.requests.fetch_add(1, Ordering::SeqCst);
            }
            stream.write_all(resp.as_bytes())?;
            if close {
                let _ = stream.shutdown(Shutdown::Write);
                return Ok(());
            }
            continue;
        }
        if buf.len() > MAX_HEADER {
            return Ok(());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Opens a TCP connection to `addr` from inside namespace `ns`.
pub fn connect_in(ns: &str, addr: SocketAddr) -> Result<TcpStream> {
    let stream = netns::run_in(ns, move || {
        TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
    })
    .context("entering the client namespace")?
    .with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One GET on a new connection from namespace `ns` to `addr`; returns the body (the name of the
/// backend that answered) and the client's source port.
pub fn get_in(ns: &str, addr: SocketAddr) -> Result<(String, u16)> {
    let stream = connect_in(ns, addr)?;
    let port = stream.local_addr()?.port();
    let mut conn = Connection::from_stream(stream, addr);
    let body = conn.request_with(true)?;
    Ok((body, port))
}

/// A keep-alive HTTP/1.1 connection: several requests over one TCP connection (one flow).
pub struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
}

impl Connection {
    pub fn open(ns: &str, addr: SocketAddr) -> Result<Self> {
        Ok(Self::from_stream(connect_in(ns, addr)?, addr))
    }

    fn from_stream(stream: TcpStream, peer: SocketAddr) -> Self {
        Self {
            stream,
            peer,
            buf: Vec::new(),
        }
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Sends one keep-alive GET and returns the body.
    pub fn request(&mut self) -> Result<String> {
        self.request_with(false)
    }

    fn request_with(&mut self, close: bool) -> Result<String> {
        let port = self.local_port();
        let req = format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: {}\r\n\r\n",
            self.peer,
            if close { "close" } else { "keep-alive" }
        );
        self.stream
            .write_all(req.as_bytes())
            .with_context(|| format!("sending a request to {} from port {port}", self.peer))?;
        self.read_response()
            .with_context(|| format!("reading the response from {} on port {port}", self.peer))
    }

    fn read_response(&mut self) -> Result<String> {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = find_header_end(&self.buf) {
                break end;
            }
            self.fill(&mut chunk, deadline)?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 200") {
            bail!("unexpected status line {status:?}");
        }
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| anyhow!("response without Content-Length: {head:?}"))?;
        self.buf.drain(..end + 4);
        while self.buf.len() < len {
            self.fill(&mut chunk, deadline)?;
        }
        let body: Vec<u8> = self.buf.drain(..len).collect();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn fill(&mut self, chunk: &mut [u8], deadline: Instant) -> Result<()> {
        if Instant::now() > deadline {
            bail!("timed out after {CLIENT_TIMEOUT:?}");
        }
        match self.stream.read(chunk) {
            Ok(0) => bail!("connection closed by the peer"),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            // A signal reached this thread (seen in CI): nothing was read; the caller reads
            // again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!("timed out after {CLIENT_TIMEOUT:?}")
            }
            Err(e) => Err(e.into()),
        }
    }
}
