//! Health probes (tcp, http, udp; `none` sends none): one tokio task per backend, all sharing a
//! bounded number of concurrent probes, so thousands of backends need neither thousands of
//! threads nor thousands of simultaneous sockets. Results go to the control loop, which applies
//! rise/fall.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
    task::AbortHandle,
    time::{self, Instant},
};
use tracing::debug;

use super::{Event, EventSender};
use crate::api::{self, CheckKind, HealthCheck, ServiceAddr, StatusRange};

/// Probes in flight at once, across all backends.
const MAX_CONCURRENT_PROBES: usize = 256;
/// The longest HTTP status line read; anything longer is not one.
const MAX_STATUS_LINE: usize = 1024;
/// Largest UDP reply looked at for the expected text.
const MAX_UDP_REPLY: usize = 4096;
/// The discard service: what a `none` check sends its neighbour-resolving datagram to.
const DISCARD_PORT: u16 = 9;

/// Which backend a probe result is about. The generation tells a result for a backend from one
/// for an earlier backend with the same address that was deleted meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeKey {
    pub service: ServiceAddr,
    pub ip: std::net::IpAddr,
    pub generation: u32,
}

/// Where one backend's probes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The address probed: the backend's own, or the VIP (`--hc-target vip`).
    pub addr: SocketAddr,
    /// Socket mark for the tc egress program to steer a VIP-addressed probe to the backend.
    pub mark: Option<u32>,
    /// The backend itself, whose neighbour entry (MAC) the data plane needs.
    pub backend: std::net::IpAddr,
}

/// `Err` carries why the probe failed, for `lb status`.
pub type ProbeOutcome = Result<(), String>;

pub struct TokioProber {
    runtime: tokio::runtime::Handle,
    events: EventSender,
    limit: Arc<Semaphore>,
}

impl TokioProber {
    pub fn new(runtime: tokio::runtime::Handle, events: EventSender) -> Self {
        TokioProber {
            runtime,
            events,
            limit: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
        }
    }
}

impl super::control::Prober for TokioProber {
    type Handle = AbortHandle;

    fn start(&mut self, key: ProbeKey, target: ProbeTarget, check: HealthCheck) -> AbortHandle {
        let events = self.events.clone();
        let limit = self.limit.clone();
        self.runtime
            .spawn(async move {
                let probe = Probe::prepare(&check.kind, target.addr);
                let mut ticker = time::interval(check.interval);
                ticker.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let outcome = {
                        let Ok(_permit) = limit.acquire().await else {
                            return;
                        };
                        if target.mark.is_some() {
                            // The probe goes to the VIP, so nothing else makes the kernel
                            // resolve the backend's MAC (see resolve_neighbour).
                            resolve_neighbour(target.backend).await;
                        }
                        match &probe {
                            Ok(Some(p)) => p.run(target.addr, target.mark, check.timeout).await,
                            Ok(None) => {
                                resolve_neighbour(target.backend).await;
                                continue;
                            }
                            // The control loop validates checks, so this is not expected.
                            Err(e) => Err(format!("invalid check: {e}")),
                        }
                    };
                    if events.send(Event::Probe(key, outcome)).is_err() {
                        return; // the daemon is shutting down
                    }
                }
            })
            .abort_handle()
    }

    fn stop(&mut self, handle: AbortHandle) {
        handle.abort();
    }
}

/// A check made ready to send: payloads decoded and the request written once per backend, not
/// once per probe.
#[derive(Debug)]
enum Probe {
    Tcp,
    Http {
        request: Vec<u8>,
        status: StatusRange,
    },
    Udp {
        send: Vec<u8>,
        expect: Option<Vec<u8>>,
    },
}

impl Probe {
    /// `None` for the `none` kind, which probes nothing.
    fn prepare(kind: &CheckKind, target: SocketAddr) -> Result<Option<Probe>, String> {
        Ok(Some(match kind {
            CheckKind::Tcp => Probe::Tcp,
            CheckKind::Http { path, status, host } => {
                let host = host.clone().unwrap_or_else(|| host_header(target));
                Probe::Http {
                    request: format!(
                        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\n\
                         Accept: */*\r\nConnection: close\r\n\r\n"
                    )
                    .into_bytes(),
                    status: *status,
                }
            }
            CheckKind::Udp { send, expect } => Probe::Udp {
                send: api::parse_udp_payload(send)?,
                expect: expect.as_deref().map(api::parse_udp_payload).transpose()?,
            },
            CheckKind::None => return Ok(None),
        }))
    }

    async fn run(&self, target: SocketAddr, mark: Option<u32>, timeout: Duration) -> ProbeOutcome {
        match self {
            Probe::Tcp => probe_tcp(target, mark, timeout).await,
            Probe::Http { request, status } => {
                probe_http(target, mark, timeout, request, *status).await
            }
            Probe::Udp { send, expect } => {
                probe_udp(target, mark, timeout, send, expect.as_deref()).await
            }
        }
    }
}

/// A TCP connection to `target`, from a socket carrying `mark` if given.
async fn connect(target: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(target).await;
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(target)
        .await
}

/// A UDP socket connected to `target`, carrying `mark` if given.
async fn udp_connect(target: SocketAddr, mark: Option<u32>) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&unspecified_for(target.ip()).into())?;
    let sock = UdpSocket::from_std(socket.into())?;
    sock.connect(target).await?;
    Ok(sock)
}

/// Succeeds when a TCP connection to `target` is established within `timeout`.
pub async fn probe_tcp(target: SocketAddr, mark: Option<u32>, timeout: Duration) -> ProbeOutcome {
    match time::timeout(timeout, connect(target, mark)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect to {target}: {e}")),
        Err(_) => Err(format!("connect to {target}: no answer within {timeout:?}")),
    }
}

/// The Host header when none is configured: the backend's address, with the port unless it is
/// HTTP's default (RFC 9110 §7.2).
fn host_header(target: SocketAddr) -> String {
    match (target.ip(), target.port()) {
        (IpAddr::V4(ip), 80) => ip.to_string(),
        (IpAddr::V6(ip), 80) => format!("[{ip}]"),
        _ => target.to_string(),
    }
}

/// Sends `request` on a new connection and succeeds when the status line's code is in
/// `status`. Only the status line is read; the connection is then closed.
async fn probe_http(
    target: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
    request: &[u8],
    status: StatusRange,
) -> ProbeOutcome {
    let deadline = Instant::now() + timeout;
    let mut stream = match time::timeout_at(deadline, connect(target, mark)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err(format!("connect: no answer within {timeout:?}")),
    };
    let exchange = async {
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut line = Vec::with_capacity(128);
        let mut chunk = [0u8; 512];
        loop {
            if let Some(end) = line.iter().position(|b| *b == b'\n') {
                line.truncate(end);
                return parse_status_line(&line);
            }
            if line.len() > MAX_STATUS_LINE {
                return parse_status_line(&line);
            }
            match stream.read(&mut chunk).await {
                Ok(0) if line.is_empty() => {
                    return Err("no status line (connection closed)".to_string());
                }
                Ok(0) => return parse_status_line(&line),
                Ok(n) => line.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("reading the response: {e}")),
            }
        }
    };
    let code = match time::timeout_at(deadline, exchange).await {
        Ok(result) => result?,
        Err(_) => return Err(format!("no status line within {timeout:?}")),
    };
    if status.contains(code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// The code of `HTTP/1.1 200 OK` (without its line end).
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    let code = text
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split(' ').nth(1))
        .filter(|code| code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|code| code.parse().ok());
    code.ok_or_else(|| format!("no status line: got {:?}", shorten(text)))
}

/// At most 40 characters of what a backend sent, for an error message.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_owned(),
    }
}

fn unspecified_for(target: IpAddr) -> SocketAddr {
    match target {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    }
}

/// Sends `send` from a connected socket and succeeds on a reply (containing `expect`, if set)
/// within `timeout`. On a connected UDP socket the kernel reports an ICMP port unreachable as
/// ECONNREFUSED on the next receive, so a closed port fails fast rather than by timeout.
async fn probe_udp(
    target: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
    send: &[u8],
    expect: Option<&[u8]>,
) -> ProbeOutcome {
    let refused = |what: &str, e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            "port unreachable".to_string()
        } else {
            format!("{what}: {e}")
        }
    };
    let sock = udp_connect(target, mark)
        .await
        .map_err(|e| format!("udp socket: {e}"))?;
    sock.send(send).await.map_err(|e| refused("send", e))?;
    let mut reply = vec![0u8; MAX_UDP_REPLY];
    let n = match time::timeout(timeout, sock.recv(&mut reply)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(refused("recv", e)),
        Err(_) => return Err(format!("no reply within {timeout:?}")),
    };
    let reply = &reply[..n];
    match expect {
        Some(expect) if !reply.windows(expect.len()).any(|w| w == expect) => Err(format!(
            "unexpected reply {:?}",
            shorten(&String::from_utf8_lossy(reply))
        )),
        _ => Ok(()),
    }
}

/// `none` checks never talk to the backend, yet the data plane needs its MAC, which the daemon
/// reads from the kernel's neighbour table (every 500 ms), and the kernel only resolves a
/// neighbour (ARP) when something is sent to it. So the `none` task sends one empty datagram to
/// the backend's discard port each interval: the first one makes the kernel resolve the
/// address, the later ones keep the entry fresh (a backend that was unreachable when it was
/// added, or whose MAC changed, is picked up). At worst the backend answers with an ICMP port
/// unreachable, which nobody reads. (tcp, http and udp probes resolve it by sending.)
async fn resolve_neighbour(ip: IpAddr) {
    let sent = async {
        let sock = UdpSocket::bind(unspecified_for(ip)).await?;
        sock.send_to(&[], SocketAddr::new(ip, DISCARD_PORT)).await
    };
    if let Err(e) = sent.await {
        debug!(backend = %ip, "datagram to resolve the neighbour: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::net::TcpListener;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn direct(addr: SocketAddr) -> ProbeTarget {
        ProbeTarget {
            addr,
            mark: None,
            backend: addr.ip(),
        }
    }

    /// Runs one probe of kind `kind` against `target`.
    async fn probe(kind: &CheckKind, target: SocketAddr, timeout: Duration) -> ProbeOutcome {
        match Probe::prepare(kind, target)? {
            Some(probe) => probe.run(target, None, timeout).await,
            None => Ok(()),
        }
    }

    #[tokio::test]
    async fn probe_succeeds_against_a_listener_and_fails_when_it_is_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(probe_tcp(addr, None, SECOND).await, Ok(()));
        drop(listener);
        let err = probe_tcp(addr, None, SECOND).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    /// An HTTP server on 127.0.0.1 that answers each request with what `answer` makes of the
    /// request head (the full response head, for example "HTTP/1.1 200 OK"), and records the
    /// heads it saw.
    async fn http_server(answer: fn(&str) -> String) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let response = answer(&head);
                    seen.lock().unwrap().push(head);
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        (addr, seen)
    }

    fn http(path: &str, status: &str, host: Option<&str>) -> CheckKind {
        CheckKind::Http {
            path: path.into(),
            status: status.parse().unwrap(),
            host: host.map(Into::into),
        }
    }

    /// 200 on /healthz, 503 on /down, 302 on /moved, 204 on /empty, 404 elsewhere.
    fn by_path(head: &str) -> String {
        let path = head.split(' ').nth(1).unwrap_or("");
        let status = match path {
            "/healthz" => "200 OK",
            "/down" => "503 Service Unavailable",
            "/moved" => "302 Found",
            "/empty" => "204 No Content",
            _ => "404 Not Found",
        };
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn http_probe_passes_on_a_status_in_range_and_names_the_status_otherwise() {
        let (addr, seen) = http_server(by_path).await;
        assert_eq!(
            probe(&http("/healthz", "200-399", None), addr, SECOND).await,
            Ok(())
        );
        assert_eq!(
            probe(&http("/moved", "200-399", None), addr, SECOND).await,
            Ok(())
        );
        assert_eq!(
            probe(&http("/moved", "200-299", None), addr, SECOND).await,
            Err("HTTP 302".into())
        );
        assert_eq!(
            probe(&http("/down", "200-399", None), addr, SECOND).await,
            Err("HTTP 503".into())
        );
        assert_eq!(
            probe(&http("/empty", "204", None), addr, SECOND).await,
            Ok(())
        );
        assert_eq!(
            probe(&http("/healthz", "204", None), addr, SECOND).await,
            Err("HTTP 200".into())
        );
        let heads = seen.lock().unwrap().clone();
        let first = &heads[0];
        assert!(first.starts_with("GET /healthz HTTP/1.1\r\n"), "{first}");
        assert!(
            first.contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", addr.port())),
            "the default Host is the backend's address: {first}"
        );
        assert!(first.contains("\r\nConnection: close\r\n"), "{first}");
    }

    /// 200 only for Host: svc.example, like a virtual-host server; 421 otherwise.
    fn by_host(head: &str) -> String {
        let status = if head.contains("\r\nHost: svc.example\r\n") {
            "200 OK"
        } else {
            "421 Misdirected Request"
        };
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n")
    }

    #[tokio::test]
    async fn http_probe_sends_the_configured_host() {
        let (addr, _) = http_server(by_host).await;
        assert_eq!(
            probe(&http("/", "200-399", None), addr, SECOND).await,
            Err("HTTP 421".into())
        );
        assert_eq!(
            probe(&http("/", "200-399", Some("wrong.example")), addr, SECOND).await,
            Err("HTTP 421".into())
        );
        assert_eq!(
            probe(&http("/", "200-399", Some("svc.example")), addr, SECOND).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn http_probe_fails_without_a_status_line() {
        let check = http("/", "200-399", None);
        let (garbage, _) = http_server(|_| "SSH-2.0-OpenSSH\r\n".into()).await;
        let err = probe(&check, garbage, SECOND).await.unwrap_err();
        assert!(err.starts_with("no status line"), "{err}");
        let (empty, _) = http_server(|_| String::new()).await;
        let err = probe(&check, empty, SECOND).await.unwrap_err();
        assert!(err.starts_with("no status line"), "{err}");

        // Accepts, reads, never answers: the timeout bounds the probe.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let started = Instant::now();
        let err = probe(&check, addr, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.starts_with("no status line within"), "{err}");
        assert!(started.elapsed() < SECOND, "{:?}", started.elapsed());
        drop(silent);

        let err = probe(&check, addr, SECOND).await.unwrap_err();
        assert!(
            err.starts_with("connect: ") && err.contains("refused"),
            "{err}"
        );
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Ok(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Unavailable"), Ok(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        for bad in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 2000 OK",
            b"ICY 200 OK",
            b"HTTP/1.1 abc",
        ] {
            assert!(
                parse_status_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn default_host_header_carries_the_port_unless_it_is_80() {
        assert_eq!(host_header("10.0.0.1:80".parse().unwrap()), "10.0.0.1");
        assert_eq!(
            host_header("10.0.0.1:8080".parse().unwrap()),
            "10.0.0.1:8080"
        );
        assert_eq!(
            host_header("[2001:db8::1]:80".parse().unwrap()),
            "[2001:db8::1]"
        );
    }

    /// A UDP server on 127.0.0.1 answering `pong:` + the datagram.
    async fn udp_echo() -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                let mut reply = b"pong:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = sock.send_to(&reply, peer).await;
            }
        });
        addr
    }

    fn udp(send: &str, expect: Option<&str>) -> CheckKind {
        CheckKind::Udp {
            send: send.into(),
            expect: expect.map(Into::into),
        }
    }

    #[tokio::test]
    async fn udp_probe_passes_on_a_reply_with_the_expected_text() {
        let addr = udp_echo().await;
        assert_eq!(probe(&udp("", None), addr, SECOND).await, Ok(()));
        assert_eq!(
            probe(&udp("ping", Some("pong")), addr, SECOND).await,
            Ok(())
        );
        assert_eq!(
            probe(&udp(r"\x00\x01", Some(r"pong:\x00\x01")), addr, SECOND).await,
            Ok(())
        );
        let err = probe(&udp("ping", Some("ready")), addr, SECOND)
            .await
            .unwrap_err();
        assert!(err.starts_with("unexpected reply \"pong:ping\""), "{err}");
    }

    #[tokio::test]
    async fn udp_probe_fails_on_a_closed_port_and_on_silence() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let err = probe(&udp("ping", None), addr, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.starts_with("no reply within"), "{err}");
        drop(silent);
        // Loopback is exempt from ICMP rate limits, so the port unreachable always comes back.
        assert_eq!(
            probe(&udp("ping", None), addr, SECOND).await,
            Err("port unreachable".into())
        );
    }

    async fn next_probe(inbox: &std::sync::mpsc::Receiver<Event>) -> Option<ProbeOutcome> {
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match inbox.try_recv() {
                Ok(Event::Probe(_, outcome)) => return Some(outcome),
                Ok(_) => panic!("not a probe event"),
                Err(_) => time::sleep(Duration::from_millis(10)).await,
            }
        }
        None
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_prober_reports_each_kind_and_none_reports_nothing() {
        use crate::daemon::control::Prober as _;
        let (events, inbox) = std::sync::mpsc::channel();
        let mut prober = TokioProber::new(tokio::runtime::Handle::current(), events);
        let key = ProbeKey {
            service: "10.0.0.10:80/tcp".parse().unwrap(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            generation: 1,
        };
        let check = |kind| HealthCheck {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(200),
            kind,
            ..HealthCheck::default()
        };
        let (http_addr, _) = http_server(by_path).await;
        let udp_addr = udp_echo().await;
        for (kind, target, want) in [
            (
                http("/down", "200", None),
                http_addr,
                Err("HTTP 503".to_string()),
            ),
            (http("/healthz", "200", None), http_addr, Ok(())),
            (udp("x", Some("pong:x")), udp_addr, Ok(())),
        ] {
            let handle = prober.start(key, direct(target), check(kind));
            let got = next_probe(&inbox).await;
            prober.stop(handle);
            assert_eq!(got, Some(want));
            while inbox.try_recv().is_ok() {}
        }
        let handle = prober.start(key, direct(udp_addr), check(CheckKind::None));
        time::sleep(Duration::from_millis(300)).await;
        prober.stop(handle);
        assert!(inbox.try_recv().is_err(), "a none check reported a result");
    }
}
