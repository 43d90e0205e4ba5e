//! `lb daemon --metrics ADDR`: Prometheus metrics over HTTP (`GET /metrics`).
//!
//! The figures come from the control loop through the same `Request::Status` the CLI sends, so
//! a scrape sees exactly what `lb status` would and takes no lock of its own. The HTTP side is a
//! minimal HTTP/1.1 server: one request per connection, then `Connection: close`, which is all a
//! Prometheus scraper needs.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, oneshot},
    time,
};
use tracing::{debug, warn};

use super::{Event, EventSender};
use crate::api::{BackendStatus, Health, Request, Response, Status};

/// Longest request head accepted (a scraper sends a few hundred bytes).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request and take the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Binds the metrics listener (done before the program is attached, so a bad address fails
/// the start instead of a running daemon).
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))
}

/// Accepts scrapes until the runtime stops.
pub async fn serve(listener: TcpListener, events: EventSender) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let events = events.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match time::timeout(CONNECTION_TIMEOUT, handle(stream, events)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(%peer, "metrics connection: {e:#}"),
                        Err(_) => debug!(%peer, "metrics connection timed out"),
                    }
                });
            }
            Err(e) => {
                warn!("accepting a metrics connection: {e}");
                // Out of descriptors, for example: do not spin.
                time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, events: EventSender) -> anyhow::Result<()> {
    let head = read_head(&mut stream).await?;
    let answer = match parse_request_line(&head) {
        Err(reason) => Answer::text(400, "Bad Request", reason),
        Ok((method, path)) => route(method, path, &events).await,
    };
    stream
        .write_all(&answer.to_bytes())
        .await
        .context("writing the answer")?;
    stream.shutdown().await.context("closing the connection")?;
    Ok(())
}

async fn route(method: &str, path: &str, events: &EventSender) -> Answer {
    if path != "/metrics" {
        return Answer::text(404, "Not Found", "not found; metrics are at /metrics\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut a = Answer::text(405, "Method Not Allowed", "use GET\n");
            a.extra_headers = "Allow: GET, HEAD\r\n";
            return a;
        }
    };
    let (reply, answer) = oneshot::channel();
    let response = if events.send(Event::Api(Request::Status, reply)).is_err() {
        None
    } else {
        answer.await.ok()
    };
    let mut a = match response {
        Some(Response::Status(status)) => Answer {
            code: 200,
            reason: "OK",
            content_type: CONTENT_TYPE,
            extra_headers: "",
            body: render(&status).into_bytes(),
            head_only: false,
        },
        Some(Response::Error { message }) => {
            Answer::text(500, "Internal Server Error", format!("{message}\n"))
        }
        Some(other) => Answer::text(
            500,
            "Internal Server Error",
            format!("unexpected answer from the control loop: {other:?}\n"),
        ),
        None => Answer::text(503, "Service Unavailable", "the daemon is shutting down\n"),
    };
    if head_only {
        a.head_only = true;
    }
    a
}

/// Reads up to the blank line that ends the request head; the body (a GET has none) is ignored.
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .context("reading the request")?;
        if n == 0 {
            anyhow::bail!("the client closed the connection before the request ended");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_REQUEST_HEAD {
            anyhow::bail!("request head longer than {MAX_REQUEST_HEAD} bytes");
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `GET /metrics?x=y HTTP/1.1` → `("GET", "/metrics")`.
fn parse_request_line(head: &str) -> Result<(&str, &str), &'static str> {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x is served\n");
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok((method, path))
}

struct Answer {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    extra_headers: &'static str,
    body: Vec<u8>,
    head_only: bool,
}

impl Answer {
    fn text(code: u16, reason: &'static str, body: impl Into<String>) -> Self {
        Answer {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra_headers: "",
            body: body.into().into_bytes(),
            head_only: false,
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
            self.code,
            self.reason,
            self.content_type,
            self.body.len(),
            self.extra_headers
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A metric with one sample per backend, labelled by service and backend.
struct BackendFamily {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&BackendStatus) -> u64,
}

const BACKEND_FAMILIES: [BackendFamily; 6] = [
    BackendFamily {
        name: "lb_backend_packets_total",
        kind: "counter",
        help: "Packets forwarded to the backend.",
        value: |b| b.packets,
    },
    BackendFamily {
        name: "lb_backend_bytes_total",
        kind: "counter",
        help: "Bytes (whole Ethernet frames) forwarded to the backend.",
        value: |b| b.bytes,
    },
    BackendFamily {
        name: "lb_backend_up",
        kind: "gauge",
        help: "1 if the backend's health checks pass (health up), 0 if they fail or none has \
               passed yet.",
        value: |b| u64::from(b.health == Health::Up),
    },
    BackendFamily {
        name: "lb_backend_in_table",
        kind: "gauge",
        help: "1 if the backend is in the service's Maglev table (gets new flows), else 0.",
        value: |b| u64::from(b.in_table),
    },
    BackendFamily {
        name: "lb_backend_active_flows",
        kind: "gauge",
        help: "Flows placed on the backend and not yet closed (FIN/RST) or idle, as the kernel \
               counts them (recounted from the connection table every few seconds).",
        value: |b| u64::try_from(b.active_flows).unwrap_or(0),
    },
    BackendFamily {
        name: "lb_backend_flows_total",
        kind: "counter",
        help: "Flows placed on the backend (its rate is new flows per second).",
        value: |b| b.flows,
    },
];

/// The Prometheus text exposition of a status. Every family has its HELP and TYPE lines, also
/// when it has no sample yet (no service configured).
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "lb_service_packets_total",
        "counter",
        "Packets forwarded to a backend of the service.",
    );
    for s in &status.services {
        sample(
            &mut out,
            "lb_service_packets_total",
            &[("service", &s.service)],
            s.packets,
        );
    }
    family(
        &mut out,
        "lb_service_bytes_total",
        "counter",
        "Bytes (whole Ethernet frames) forwarded to a backend of the service.",
    );
    for s in &status.services {
        sample(
            &mut out,
            "lb_service_bytes_total",
            &[("service", &s.service)],
            s.bytes,
        );
    }
    family(
        &mut out,
        "lb_service_flows_total",
        "counter",
        "Flows placed on a backend of the service (its rate is new flows per second).",
    );
    for s in &status.services {
        sample(
            &mut out,
            "lb_service_flows_total",
            &[("service", &s.service)],
            s.flows,
        );
    }

    for f in BACKEND_FAMILIES {
        family(&mut out, f.name, f.kind, f.help);
        for s in &status.services {
            for b in &s.backends {
                let ip = b.ip.to_string();
                sample(
                    &mut out,
                    f.name,
                    &[("service", &s.service), ("backend", &ip)],
                    (f.value)(b),
                );
            }
        }
    }

    family(
        &mut out,
        "lb_packets_total",
        "counter",
        "Packets seen by the XDP program, by what it did with them (forwarded, pass_*, drop_*).",
    );
    for (reason, n) in &status.counters {
        sample(&mut out, "lb_packets_total", &[("reason", reason)], *n);
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes backslash and line feed (a double quote stays as it is).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{BackendState, BackendStatus, Forward, HealthCheck, Scheduler, ServiceStatus};

    fn backend(
        ip: &str,
        health: Health,
        in_table: bool,
        packets: u64,
        bytes: u64,
    ) -> BackendStatus {
        BackendStatus {
            ip: ip.parse().unwrap(),
            port: 80,
            weight: 1,
            state: if in_table {
                BackendState::Active
            } else {
                BackendState::Down
            },
            health,
            last_error: None,
            mac: None,
            in_table,
            active_flows: i64::from(in_table) * 3,
            packets,
            bytes,
            flows: packets / 10,
        }
    }

    fn small_status() -> Status {
        Status {
            services: vec![ServiceStatus {
                service: "10.0.0.10:80/tcp".into(),
                forward: Forward::Dsr,
                scheduler: Scheduler::Maglev,
                fragments: false,
                health_check: HealthCheck::default(),
                packets: 30,
                bytes: 3000,
                flows: 3,
                backends: vec![
                    backend("10.0.0.2", Health::Up, true, 20, 2000),
                    backend("10.0.0.3", Health::Down, false, 10, 1000),
                ],
            }],
            counters: BTreeMap::from([("drop_no_backend".into(), 0), ("forwarded".into(), 30)]),
        }
    }

    #[test]
    fn render_gives_the_exact_exposition_of_a_small_status() {
        let expected = r#"# HELP lb_service_packets_total Packets forwarded to a backend of the service.
# TYPE lb_service_packets_total counter
lb_service_packets_total{service="10.0.0.10:80/tcp"} 30
# HELP lb_service_bytes_total Bytes (whole Ethernet frames) forwarded to a backend of the service.
# TYPE lb_service_bytes_total counter
lb_service_bytes_total{service="10.0.0.10:80/tcp"} 3000
# HELP lb_service_flows_total Flows placed on a backend of the service (its rate is new flows per second).
# TYPE lb_service_flows_total counter
lb_service_flows_total{service="10.0.0.10:80/tcp"} 3
# HELP lb_backend_packets_total Packets forwarded to the backend.
# TYPE lb_backend_packets_total counter
lb_backend_packets_total{service="10.0.0.10:80/tcp",backend="10.0.0.2"} 20
lb_backend_packets_total{service="10.0.0.10:80/tcp",backend="10.0.0.3"} 10
# HELP lb_backend_bytes_total Bytes (whole Ethernet frames) forwarded to the backend.
# TYPE lb_backend_bytes_total counter
lb_backend_bytes_total{service="10.0.0.10:80/tcp",backend="10.0.0.2"} 2000
lb_backend_bytes_total{service="10.0.0.10:80/tcp",backend="10.0.0.3"} 1000
# HELP lb_backend_up 1 if the backend's health checks pass (health up), 0 if they fail or none has passed yet.
# TYPE lb_backend_up gauge
lb_backend_up{service="10.0.0.10:80/tcp",backend="10.0.0.2"} 1
lb_backend_up{service="10.0.0.10:80/tcp",backend="10.0.0.3"} 0
# HELP lb_backend_in_table 1 if the backend is in the service's Maglev table (gets new flows), else 0.
# TYPE lb_backend_in_table gauge
lb_backend_in_table{service="10.0.0.10:80/tcp",backend="10.0.0.2"} 1
lb_backend_in_table{service="10.0.0.10:80/tcp",backend="10.0.0.3"} 0
# HELP lb_backend_active_flows Flows placed on the backend and not yet closed (FIN/RST) or idle, as the kernel counts them (recounted from the connection table every few seconds).
# TYPE lb_backend_active_flows gauge
lb_backend_active_flows{service="10.0.0.10:80/tcp",backend="10.0.0.2"} 3
lb_backend_active_flows{service="10.0.0.10:80/tcp",backend="10.0.0.3"} 0
# HELP lb_backend_flows_total Flows placed on the backend (its rate is new flows per second).
# TYPE lb_backend_flows_total counter
lb_backend_flows_total{service="10.0.0.10:80/tcp",backend="10.0.0.2"} 2
lb_backend_flows_total{service="10.0.0.10:80/tcp",backend="10.0.0.3"} 1
# HELP lb_packets_total Packets seen by the XDP program, by what it did with them (forwarded, pass_*, drop_*).
# TYPE lb_packets_total counter
lb_packets_total{reason="drop_no_backend"} 0
lb_packets_total{reason="forwarded"} 30
"#;
        assert_eq!(render(&small_status()), expected);
    }

    #[test]
    fn render_without_services_still_describes_every_family() {
        let text = render(&Status::default());
        for name in [
            "lb_service_packets_total",
            "lb_service_bytes_total",
            "lb_backend_packets_total",
            "lb_backend_bytes_total",
            "lb_backend_up",
            "lb_backend_in_table",
            "lb_packets_total",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        assert!(
            text.lines().all(|l| l.starts_with('#')),
            "samples without services:\n{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "x\\y\"z\nw"), ("b", "plain")], 7);
        assert_eq!(out, "m{a=\"x\\\\y\\\"z\\nw\",b=\"plain\"} 7\n");
        assert_eq!(escape_help("a\\b\nc \"d\""), "a\\\\b\\nc \"d\"");
    }

    #[test]
    fn request_lines_are_parsed_and_bad_ones_refused() {
        assert_eq!(
            parse_request_line("GET /metrics HTTP/1.1\r\nHost: x"),
            Ok(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line("GET /metrics?name[]=x HTTP/1.0"),
            Ok(("GET", "/metrics"))
        );
        for bad in [
            "",
            "GET",
            "GET /metrics",
            "GET /metrics HTTP/2",
            "GET  /metrics HTTP/1.1",
        ] {
            assert!(parse_request_line(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The whole server against a fake control loop: 200 with the rendering, 404 elsewhere,
    /// 405 for other methods, 400 for garbage.
    #[tokio::test]
    async fn server_answers_metrics_and_refuses_the_rest() {
        let (events, inbox) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(event) = inbox.recv() {
                if let Event::Api(Request::Status, reply) = event {
                    let _ = reply.send(Response::Status(small_status()));
                }
            }
        });
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, events));

        async fn ask(addr: std::net::SocketAddr, request: &str) -> String {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }

        let ok = ask(addr, "GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n").await;
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(body, render(&small_status()));

        let head_only = ask(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n"), "{head_only}");
        assert!(
            head_only.ends_with("\r\n\r\n"),
            "HEAD has a body: {head_only}"
        );

        let missing = ask(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let post = ask(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");
        let garbage = ask(addr, "hello\r\n\r\n").await;
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    }
}
