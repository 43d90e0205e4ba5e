//! The control API: what the CLI sends to the daemon over the Unix socket, and what comes back.
//! One JSON request line, one JSON response line, per connection.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// Default path of the control socket.
pub const DEFAULT_API_SOCKET: &str = "/run/lb/lb.sock";

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }
}

/// A service's identity: `VIP:PORT/PROTO`, for example `10.0.0.10:80/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.vip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{proto}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{proto}", self.port),
        }
    }
}

impl FromStr for ServiceAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("'{s}' is not VIP:PORT/tcp|udp (missing /PROTO)"))?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            other => return Err(format!("unknown protocol '{other}' (expected tcp or udp)")),
        };
        let sock: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an address with a port (VIP:PORT)"))?;
        if sock.port() == 0 {
            return Err("port 0 is not a service port".into());
        }
        Ok(ServiceAddr {
            vip: sock.ip(),
            port: sock.port(),
            proto,
        })
    }
}

/// Parses `500ms`, `2s`, `1m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 500ms, 2s, 1m)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s or m)")),
    };
    if d.is_zero() {
        return Err("a duration must be greater than zero".into());
    }
    Ok(d)
}

/// How a service's backends are checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(with = "millis")]
    pub interval: Duration,
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that take it down.
    pub fall: u32,
    /// What a probe does (absent in JSON: `tcp`).
    #[serde(default)]
    pub kind: CheckKind,
    /// Where probes are addressed (absent in JSON: the backend's own address).
    #[serde(default)]
    pub target: HcTarget,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
            kind: CheckKind::Tcp,
            target: HcTarget::Backend,
        }
    }
}

/// Where a service's health probes are addressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HcTarget {
    /// The backend's own address and the service port: is the host serving the port?
    #[default]
    Backend,
    /// The VIP and the service port, steered to the backend as the balancer sends clients'
    /// packets (a tc egress program matches the probe's socket mark): does the backend serve
    /// the VIP? A backend whose VIP address or listener is missing fails.
    Vip,
}

impl HcTarget {
    pub fn name(self) -> &'static str {
        match self {
            HcTarget::Backend => "backend",
            HcTarget::Vip => "vip",
        }
    }
}

/// Longest HTTP path or Host header, UDP payload or expected text a check may carry.
pub const MAX_CHECK_TEXT: usize = 1024;

/// What one health probe of a backend does. Every probe goes to the backend's own address and
/// the service port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is established.
    #[default]
    Tcp,
    /// `GET path` over a new TCP connection answers with a status line in `status`.
    Http {
        path: String,
        status: StatusRange,
        /// The Host header; `None` sends the backend's address.
        host: Option<String>,
    },
    /// A datagram with `send` gets a reply (containing `expect`, if set). Both may hold the
    /// escapes `\n`, `\r`, `\t`, `\0`, `\\` and `\xHH`, so binary protocols can be checked.
    Udp {
        send: String,
        expect: Option<String>,
    },
    /// No probes: a backend counts as up as soon as it is added.
    None,
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
            CheckKind::Udp { .. } => "udp",
            CheckKind::None => "none",
        }
    }

    /// Checks what the CLI checks too, for requests that come from elsewhere.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            CheckKind::Tcp | CheckKind::None => Ok(()),
            CheckKind::Http { path, status, host } => {
                parse_http_path(path)?;
                status.validate()?;
                if let Some(host) = host {
                    parse_http_host(host)?;
                }
                Ok(())
            }
            CheckKind::Udp { send, expect } => {
                parse_udp_payload(send)?;
                if let Some(expect) = expect
                    && parse_udp_payload(expect)?.is_empty()
                {
                    return Err("the expected UDP reply text must not be empty".into());
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::Tcp => f.write_str("tcp connect"),
            CheckKind::Http { path, status, host } => {
                write!(f, "http GET {path} expect {status}")?;
                match host {
                    Some(host) => write!(f, " host {host}"),
                    None => Ok(()),
                }
            }
            CheckKind::Udp { send, expect } => {
                write!(f, "udp send {send:?}")?;
                match expect {
                    Some(expect) => write!(f, " expect {expect:?}"),
                    None => f.write_str(" expect any reply"),
                }
            }
            CheckKind::None => f.write_str("none"),
        }
    }
}

/// An inclusive range of HTTP status codes: `200-399`, or one code such as `204`. Written as
/// that text in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StatusRange {
    pub low: u16,
    pub high: u16,
}

impl Default for StatusRange {
    fn default() -> Self {
        StatusRange {
            low: 200,
            high: 399,
        }
    }
}

impl StatusRange {
    pub fn contains(self, code: u16) -> bool {
        (self.low..=self.high).contains(&code)
    }

    fn validate(self) -> Result<(), String> {
        for code in [self.low, self.high] {
            if !(100..=599).contains(&code) {
                return Err(format!(
                    "HTTP status {code} is outside 100-599 (expected a range such as 200-399)"
                ));
            }
        }
        if self.low > self.high {
            return Err(format!(
                "HTTP status range {}-{} is empty (write the low code first)",
                self.low, self.high
            ));
        }
        Ok(())
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

impl FromStr for StatusRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let code = |t: &str| {
            t.trim().parse::<u16>().map_err(|_| {
                format!("'{s}' is not an HTTP status or range (examples: 200, 200-399)")
            })
        };
        let range = match s.split_once('-') {
            Some((low, high)) => StatusRange {
                low: code(low)?,
                high: code(high)?,
            },
            None => {
                let c = code(s)?;
                StatusRange { low: c, high: c }
            }
        };
        range.validate()?;
        Ok(range)
    }
}

impl TryFrom<String> for StatusRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<StatusRange> for String {
    fn from(r: StatusRange) -> String {
        r.to_string()
    }
}

/// An HTTP check's path: starts with `/`, no spaces or control characters (it goes into the
/// request line as is).
pub fn parse_http_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("HTTP check path '{s}' must start with '/'"));
    }
    check_header_text("HTTP check path", s)?;
    Ok(s.to_owned())
}

/// An HTTP check's Host header: one non-empty token without spaces or control characters.
pub fn parse_http_host(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the HTTP check Host header must not be empty".into());
    }
    check_header_text("HTTP check Host header", s)?;
    Ok(s.to_owned())
}

fn check_header_text(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_CHECK_TEXT {
        return Err(format!("{what} is longer than {MAX_CHECK_TEXT} bytes"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{what} {s:?} contains a space or a control character"
        ));
    }
    Ok(())
}

/// Decodes a UDP check payload or expected reply: text with the escapes `\n`, `\r`, `\t`,
/// `\0`, `\\` and `\xHH`.
pub fn parse_udp_payload(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        let byte = match chars.next() {
            Some('n') => b'\n',
            Some('r') => b'\r',
            Some('t') => b'\t',
            Some('0') => 0,
            Some('\\') => b'\\',
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                match u8::from_str_radix(&hex, 16) {
                    Ok(b) if hex.len() == 2 && hex.chars().all(|c| c.is_ascii_hexdigit()) => b,
                    _ => return Err(format!("UDP check text {s:?}: \\x needs two hex digits")),
                }
            }
            Some(other) => {
                return Err(format!(
                    "UDP check text {s:?}: unknown escape \\{other} (use \\n \\r \\t \\0 \\\\ \\xHH)"
                ));
            }
            None => return Err(format!("UDP check text {s:?} ends with a lone backslash")),
        };
        out.push(byte);
    }
    if out.len() > MAX_CHECK_TEXT {
        return Err(format!(
            "UDP check text is longer than {MAX_CHECK_TEXT} bytes"
        ));
    }
    Ok(out)
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Weighted consistent hashing of the 5-tuple (Maglev).
    Maglev,
    /// Weighted consistent hashing of the client address: a client always reaches the same
    /// backend (session affinity).
    SourceHash,
    /// New flows go to backends in weighted turn.
    RoundRobin,
    /// A new flow goes to the backend with the fewest active flows per unit of weight.
    LeastConn,
}

impl Scheduler {
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::SourceHash => "source-hash",
            Scheduler::RoundRobin => "round-robin",
            Scheduler::LeastConn => "least-conn",
        }
    }

    /// The `SCHED_*` value the XDP program reads.
    pub fn kernel(self) -> u8 {
        match self {
            Scheduler::Maglev => lb_common::SCHED_MAGLEV,
            Scheduler::SourceHash => lb_common::SCHED_SOURCE_HASH,
            Scheduler::RoundRobin => lb_common::SCHED_ROUND_ROBIN,
            Scheduler::LeastConn => lb_common::SCHED_LEAST_CONN,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Forward {
    /// L2 direct server return: rewrite MACs; backends hold the VIP and answer clients directly.
    Dsr,
    /// IP-in-IP to the backend, routed by the kernel's FIB; backends run `lb decap`, hold the
    /// VIP and answer clients directly.
    Ipip,
    /// Like ipip, in UDP (GUE) so the backend's NIC spreads flows over its queues.
    Gue,
    /// Destination NAT to the backend (port mapping allowed); replies must route back through
    /// the balancer, which reverses the translation.
    Nat,
    /// Destination and source NAT (the balancer's SNAT address and a port from its pool):
    /// backends need nothing.
    Fullnat,
}

impl Forward {
    pub const ALL: [Forward; 5] = [
        Forward::Dsr,
        Forward::Ipip,
        Forward::Gue,
        Forward::Nat,
        Forward::Fullnat,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Forward::Dsr => "dsr",
            Forward::Ipip => "ipip",
            Forward::Gue => "gue",
            Forward::Nat => "nat",
            Forward::Fullnat => "fullnat",
        }
    }

    /// The `FORWARD_*` value the XDP program reads.
    pub fn kernel(self) -> u8 {
        match self {
            Forward::Dsr => lb_common::FORWARD_DSR,
            Forward::Ipip => lb_common::FORWARD_IPIP,
            Forward::Gue => lb_common::FORWARD_GUE,
            Forward::Nat => lb_common::FORWARD_NAT,
            Forward::Fullnat => lb_common::FORWARD_FULLNAT,
        }
    }

    /// The next hop comes from the kernel's FIB (every mode but L2 DSR), which needs
    /// forwarding on the ingress interfaces.
    pub fn routed(self) -> bool {
        self != Forward::Dsr
    }

    /// Only the encapsulating modes carry a packet of one family inside the other; the rest
    /// leave (dsr) or rewrite (nat, fullnat) the client's IP header, so a backend must be of
    /// the VIP's family.
    pub fn mixes_families(self) -> bool {
        matches!(self, Forward::Ipip | Forward::Gue)
    }

    /// A backend may listen on another port than the service's (the NAT modes rewrite it).
    pub fn maps_ports(self) -> bool {
        matches!(self, Forward::Nat | Forward::Fullnat)
    }

    /// Only L2 DSR needs the backend's MAC (the routed modes take the next hop's from the FIB).
    pub fn needs_mac(self) -> bool {
        self == Forward::Dsr
    }

    /// NAT state is kept for the service's flows (`CONFIG_F_NAT`).
    pub fn nat(self) -> bool {
        self.maps_ports()
    }
}

/// Why a service cannot forward fragments (`--fragments`), or `Ok`.
pub fn check_fragments(scheduler: Scheduler, forward: Forward) -> Result<(), String> {
    if scheduler != Scheduler::SourceHash {
        return Err(format!(
            "--fragments needs --scheduler source-hash (every fragment of a client goes to one \
             backend), not {}",
            scheduler.name()
        ));
    }
    if forward.maps_ports() {
        return Err(format!(
            "--fragments works with forward dsr, ipip or gue, not {} (fragments carry no ports \
             to translate)",
            forward.name()
        ));
    }
    Ok(())
}

/// Why `ip` cannot be a backend of `service` forwarded with `forward`, or `Ok`.
pub fn check_backend_family(
    service: &ServiceAddr,
    forward: Forward,
    ip: IpAddr,
) -> Result<(), String> {
    if ip.is_ipv4() != service.vip.is_ipv4() && !forward.mixes_families() {
        return Err(format!(
            "backend {ip}: forwarding mode {} needs a backend of the VIP's address family \
             (ipip and gue allow either)",
            forward.name()
        ));
    }
    Ok(())
}

/// Why a backend of a `forward` service cannot listen on `port` (`Some` when it differs from
/// the service port), or `Ok`.
pub fn check_backend_port(
    service: &ServiceAddr,
    forward: Forward,
    ip: IpAddr,
    port: Option<u16>,
) -> Result<(), String> {
    match port {
        Some(0) => Err(format!("backend {ip}: port 0 is not a port")),
        Some(port) if port != service.port && !forward.maps_ports() => Err(format!(
            "backend {ip} port {port} differs from the service port {}: with {} forwarding a \
             backend serves the VIP on the service's own port (only nat and fullnat map ports)",
            service.port,
            forward.name()
        )),
        _ => Ok(()),
    }
}

/// A backend as `lb backend add` takes it: `IP`, `IP:PORT` or `[IPv6]:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendTarget {
    pub ip: IpAddr,
    /// The port it listens on, if given (nat and fullnat only, when it is not the service's).
    pub port: Option<u16>,
}

impl FromStr for BackendTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(BackendTarget { ip, port: None });
        }
        match s.parse::<std::net::SocketAddr>() {
            Ok(sock) if sock.port() == 0 => Err(format!("'{s}': port 0 is not a port")),
            Ok(sock) => Ok(BackendTarget {
                ip: sock.ip(),
                port: Some(sock.port()),
            }),
            Err(_) => Err(format!(
                "'{s}' is not an IP address, IP:PORT or [IPv6]:PORT"
            )),
        }
    }
}

/// `MIN-MAX`, an inclusive range of ports with MIN <= MAX, neither 0 (`--snat-ports`).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{s}' is not a port range MIN-MAX (for example 61000-65535)");
    let (low, high) = s.split_once('-').ok_or_else(bad)?;
    let low: u16 = low.trim().parse().map_err(|_| bad())?;
    let high: u16 = high.trim().parse().map_err(|_| bad())?;
    if low == 0 {
        return Err(format!("port range {s}: port 0 is not a port"));
    }
    if low > high {
        return Err(format!(
            "port range {s} is empty (write the low port first)"
        ));
    }
    Ok((low, high))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    ServiceAdd {
        service: ServiceAddr,
        scheduler: Scheduler,
        forward: Forward,
        health: HealthCheck,
        /// Forward fragments (`SERVICE_F_FRAGMENTS`; absent in JSON: off).
        #[serde(default)]
        fragments: bool,
    },
    ServiceDel {
        service: ServiceAddr,
    },
    BackendAdd {
        service: ServiceAddr,
        ip: IpAddr,
        weight: u32,
        /// The port the backend listens on when it is not the service's (nat, fullnat).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    BackendDel {
        service: ServiceAddr,
        ip: IpAddr,
    },
    BackendDrain {
        service: ServiceAddr,
        ip: IpAddr,
        /// Longest wait for the established flows to end; then they are moved. None: no limit.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Changes a backend's weight live; 0 takes it out of the table like a drain.
    BackendSet {
        service: ServiceAddr,
        ip: IpAddr,
        weight: u32,
    },
    Status,
    /// Read the configuration file (`lb daemon --config`) again and apply the difference.
    Reload,
    /// The running state as a configuration file.
    ConfigDump,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Error {
        message: String,
    },
    Status(Status),
    /// A reload applied: the file and the changes made, one line each (empty: no change).
    Reloaded {
        file: String,
        changes: Vec<String>,
    },
    /// A configuration file (TOML).
    Config {
        text: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    /// Packets by reason (`forwarded`, `pass_not_vip`, `drop_malformed_ip`, ...).
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub service: String,
    pub forward: Forward,
    pub scheduler: Scheduler,
    /// Fragments are forwarded (`--fragments`).
    #[serde(default)]
    pub fragments: bool,
    pub health_check: HealthCheck,
    pub packets: u64,
    pub bytes: u64,
    /// Flows placed on its backends since the service was added (its rate: new flows/s).
    #[serde(default)]
    pub flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Unknown,
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// In the Maglev table: gets new flows.
    Active,
    /// Drained or weight 0: keeps its established flows, gets no new ones.
    Draining,
    /// Drain finished (its last flow ended or the timeout passed): out of service until its
    /// health checks fail and pass again (a redeploy) or it is deleted.
    Drained,
    /// Not usable yet or any more (health down or unknown, or, for dsr, MAC not resolved).
    Down,
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Drained => "drained",
            BackendState::Down => "down",
        }
    }
}

impl Health {
    pub fn name(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub ip: IpAddr,
    /// The port traffic is sent to: the service's, or the backend's own with nat/fullnat.
    #[serde(default)]
    pub port: u16,
    pub weight: u32,
    pub state: BackendState,
    pub health: Health,
    /// The last health-check failure, if the last probe failed.
    pub last_error: Option<String>,
    pub mac: Option<String>,
    pub in_table: bool,
    /// Flows placed on the backend and not yet closed or idle (the kernel's count, recounted
    /// from the connection table every few seconds).
    pub active_flows: i64,
    pub packets: u64,
    pub bytes: u64,
    /// Flows placed on the backend since it was added (its rate: new flows/s).
    #[serde(default)]
    pub flows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_addr_round_trips() {
        let s: ServiceAddr = "10.0.0.10:80/tcp".parse().unwrap();
        assert_eq!(s.port, 80);
        assert_eq!(s.proto, Proto::Tcp);
        assert_eq!(s.to_string(), "10.0.0.10:80/tcp");
        let u: ServiceAddr = "[2001:db8::1]:53/UDP".parse().unwrap();
        assert_eq!(u.to_string(), "[2001:db8::1]:53/udp");
    }

    #[test]
    fn malformed_service_addrs_are_rejected() {
        for bad in [
            "10.0.0.10:80",
            "10.0.0.10/tcp",
            "10.0.0.300:80/tcp",
            "10.0.0.10:80/sctp",
            "10.0.0.10:0/tcp",
            "10.0.0.10:70000/tcp",
            "",
        ] {
            assert!(bad.parse::<ServiceAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn requests_serialize_as_tagged_json() {
        let r = Request::BackendAdd {
            service: "10.0.0.10:80/tcp".parse().unwrap(),
            ip: "10.0.0.2".parse().unwrap(),
            weight: 3,
            port: None,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""op":"backend-add""#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }

    #[test]
    fn forwarding_modes_have_their_names_and_kernel_values() {
        let names: Vec<&str> = Forward::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names, ["dsr", "ipip", "gue", "nat", "fullnat"]);
        for f in Forward::ALL {
            // The JSON and TOML spelling is the name.
            assert_eq!(
                serde_json::to_value(f).unwrap(),
                serde_json::json!(f.name())
            );
            assert_eq!(
                serde_json::from_value::<Forward>(serde_json::json!(f.name())).unwrap(),
                f
            );
        }
        let kernel: Vec<u8> = Forward::ALL.iter().map(|f| f.kernel()).collect();
        assert_eq!(
            kernel,
            [
                lb_common::FORWARD_DSR,
                lb_common::FORWARD_IPIP,
                lb_common::FORWARD_GUE,
                lb_common::FORWARD_NAT,
                lb_common::FORWARD_FULLNAT
            ]
        );
        assert!(!Forward::Dsr.routed() && Forward::ALL[1..].iter().all(|f| f.routed()));
        assert!(Forward::Dsr.needs_mac() && Forward::ALL[1..].iter().all(|f| !f.needs_mac()));
        // Older requests without the new fields still parse.
        let old = r#"{"op":"backend-add","service":{"vip":"10.0.0.10","port":80,"proto":"tcp"},
            "ip":"10.0.0.2","weight":1}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(old).unwrap(),
            Request::BackendAdd { port: None, .. }
        ));
    }

    #[test]
    fn family_rules_allow_mixes_only_for_encapsulation() {
        let v4: ServiceAddr = "10.0.0.10:80/tcp".parse().unwrap();
        let v6: ServiceAddr = "[2001:db8::1]:80/tcp".parse().unwrap();
        let (ip4, ip6): (IpAddr, IpAddr) =
            ("10.0.0.2".parse().unwrap(), "2001:db8::2".parse().unwrap());
        for f in Forward::ALL {
            assert_eq!(check_backend_family(&v4, f, ip4), Ok(()));
            assert_eq!(check_backend_family(&v6, f, ip6), Ok(()));
            let mixed = [
                check_backend_family(&v4, f, ip6),
                check_backend_family(&v6, f, ip4),
            ];
            if matches!(f, Forward::Ipip | Forward::Gue) {
                assert_eq!(mixed, [Ok(()), Ok(())], "{}", f.name());
            } else {
                for m in mixed {
                    let e = m.unwrap_err();
                    assert!(
                        e.contains(&format!("forwarding mode {} needs", f.name())),
                        "{e}"
                    );
                }
            }
        }
    }

    #[test]
    fn backend_ports_are_only_mapped_by_nat_modes() {
        let s: ServiceAddr = "10.0.0.10:80/tcp".parse().unwrap();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        for f in Forward::ALL {
            assert_eq!(check_backend_port(&s, f, ip, None), Ok(()));
            assert_eq!(check_backend_port(&s, f, ip, Some(80)), Ok(()));
            assert!(check_backend_port(&s, f, ip, Some(0)).is_err());
            let mapped = check_backend_port(&s, f, ip, Some(8080));
            if matches!(f, Forward::Nat | Forward::Fullnat) {
                assert_eq!(mapped, Ok(()));
            } else {
                assert!(
                    mapped
                        .unwrap_err()
                        .contains("differs from the service port 80"),
                    "{}",
                    f.name()
                );
            }
        }
    }

    #[test]
    fn backend_targets_parse_with_and_without_a_port() {
        let t = |s: &str| s.parse::<BackendTarget>();
        assert_eq!(
            t("10.0.0.2"),
            Ok(BackendTarget {
                ip: "10.0.0.2".parse().unwrap(),
                port: None
            })
        );
        assert_eq!(
            t("10.0.0.2:8080"),
            Ok(BackendTarget {
                ip: "10.0.0.2".parse().unwrap(),
                port: Some(8080)
            })
        );
        assert_eq!(
            t("[2001:db8::2]:8080"),
            Ok(BackendTarget {
                ip: "2001:db8::2".parse().unwrap(),
                port: Some(8080)
            })
        );
        assert_eq!(t("2001:db8::2").unwrap().port, None);
        for bad in [
            "10.0.0.2:0",
            "10.0.0.2:70000",
            "2001:db8::2:80x",
            "host:80",
            "",
        ] {
            assert!(t(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fragments_need_source_hash_and_a_mode_without_ports() {
        for f in [Forward::Dsr, Forward::Ipip, Forward::Gue] {
            assert_eq!(check_fragments(Scheduler::SourceHash, f), Ok(()));
            let e = check_fragments(Scheduler::Maglev, f).unwrap_err();
            assert!(e.contains("needs --scheduler source-hash"), "{e}");
        }
        for f in [Forward::Nat, Forward::Fullnat] {
            let e = check_fragments(Scheduler::SourceHash, f).unwrap_err();
            assert!(e.contains(&format!("not {}", f.name())), "{e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn snat_port_ranges_are_validated() {
        assert_eq!(parse_port_range("40000-59999"), Ok((40000, 59999)));
        assert_eq!(parse_port_range("1024-1024"), Ok((1024, 1024)));
        assert_eq!(parse_port_range(" 1 - 65535 "), Ok((1, 65535)));
        for bad in [
            "", "40000", "0-100", "200-100", "1-65536", "a-b", "1-2-3", "-5",
        ] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn status_ranges_parse_as_ranges_or_single_codes() {
        assert_eq!(
            "200-399".parse(),
            Ok(StatusRange {
                low: 200,
                high: 399
            })
        );
        assert_eq!(
            "204".parse(),
            Ok(StatusRange {
                low: 204,
                high: 204
            })
        );
        assert_eq!(
            " 200 - 299 ".parse(),
            Ok(StatusRange {
                low: 200,
                high: 299
            })
        );
        let r: StatusRange = "200-299".parse().unwrap();
        assert!(r.contains(200) && r.contains(299) && !r.contains(300) && !r.contains(199));
        assert_eq!(r.to_string(), "200-299");
        assert_eq!("204".parse::<StatusRange>().unwrap().to_string(), "204");
        for bad in [
            "",
            "ok",
            "399-200",
            "99",
            "600",
            "200-",
            "-399",
            "200-399-500",
            "2OO",
        ] {
            assert!(bad.parse::<StatusRange>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn http_paths_and_hosts_are_checked() {
        assert_eq!(
            parse_http_path("/healthz?full=1"),
            Ok("/healthz?full=1".into())
        );
        assert!(parse_http_path("/").is_ok());
        for bad in ["healthz", "", "/a b", "/a\r\nX: y", "http://x/"] {
            assert!(parse_http_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_http_host("example.com:8080").is_ok());
        for bad in ["", "a b", "a\r\n"] {
            assert!(parse_http_host(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn udp_payloads_decode_escapes() {
        assert_eq!(parse_udp_payload(""), Ok(vec![]));
        assert_eq!(parse_udp_payload("ping"), Ok(b"ping".to_vec()));
        assert_eq!(
            parse_udp_payload(r"a\n\x00\xff\\\t"),
            Ok(b"a\n\x00\xff\\\t".to_vec())
        );
        for bad in [r"\", r"\q", r"\x1", r"\xzz", r"\x+1"] {
            assert!(parse_udp_payload(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_udp_payload(&"a".repeat(MAX_CHECK_TEXT + 1)).is_err());
    }

    #[test]
    fn check_kinds_validate_their_parameters() {
        let http = |path: &str, low, high, host: Option<&str>| CheckKind::Http {
            path: path.into(),
            status: StatusRange { low, high },
            host: host.map(Into::into),
        };
        assert_eq!(http("/", 200, 399, None).validate(), Ok(()));
        assert_eq!(http("/", 200, 399, Some("svc.example")).validate(), Ok(()));
        assert!(http("x", 200, 399, None).validate().is_err());
        assert!(http("/", 399, 200, None).validate().is_err());
        assert!(http("/", 200, 700, None).validate().is_err());
        assert!(http("/", 200, 399, Some("")).validate().is_err());
        let udp = |send: &str, expect: Option<&str>| CheckKind::Udp {
            send: send.into(),
            expect: expect.map(Into::into),
        };
        assert_eq!(udp("", None).validate(), Ok(()));
        assert_eq!(udp("ping", Some("pong")).validate(), Ok(()));
        assert!(udp(r"\q", None).validate().is_err());
        assert!(udp("ping", Some("")).validate().is_err());
        assert_eq!(CheckKind::None.validate(), Ok(()));
    }

    #[test]
    fn health_checks_serialize_with_their_kind() {
        let check = HealthCheck {
            kind: CheckKind::Http {
                path: "/health".into(),
                status: StatusRange {
                    low: 200,
                    high: 299,
                },
                host: None,
            },
            ..HealthCheck::default()
        };
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(json["kind"]["type"], "http");
        assert_eq!(json["kind"]["path"], "/health");
        assert_eq!(json["kind"]["status"], "200-299");
        assert_eq!(serde_json::from_value::<HealthCheck>(json).unwrap(), check);
        // Requests written before check kinds existed still mean tcp.
        let old = r#"{"interval":1000,"timeout":1000,"rise":2,"fall":2}"#;
        assert_eq!(
            serde_json::from_str::<HealthCheck>(old).unwrap(),
            HealthCheck::default()
        );
        let bad = r#"{"interval":1000,"timeout":1000,"rise":2,"fall":2,
            "kind":{"type":"http","path":"/","status":"500-200","host":null}}"#;
        assert!(serde_json::from_str::<HealthCheck>(bad).is_err());
        assert_eq!(
            serde_json::to_value(CheckKind::None).unwrap(),
            serde_json::json!({"type": "none"})
        );
    }

    #[test]
    fn check_kinds_describe_themselves_for_status() {
        let http = CheckKind::Http {
            path: "/h".into(),
            status: StatusRange::default(),
            host: Some("x".into()),
        };
        assert_eq!(http.to_string(), "http GET /h expect 200-399 host x");
        let udp = CheckKind::Udp {
            send: "ping".into(),
            expect: None,
        };
        assert_eq!(udp.to_string(), r#"udp send "ping" expect any reply"#);
        assert_eq!(CheckKind::Tcp.to_string(), "tcp connect");
    }
}
