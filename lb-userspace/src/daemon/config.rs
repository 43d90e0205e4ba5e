//! The configuration file (`lb daemon --config /etc/lb/lb.toml`): its TOML format, its
//! validation (every error names the file and the line), and the file `lb config dump` writes.
//!
//! ```toml
//! [daemon]
//! interface = "eth0"                 # or ["eth0", "eth1"]: attached to each
//! encap_source4 = "192.0.2.1"        # ipip/gue outer source (default: the interface's)
//! snat_ports = "61000-65535"         # fullnat's source ports
//!
//! [[service]]
//! address = "10.0.0.10:80/tcp"       # or vip = "10.0.0.10", port = 80, proto = "tcp"
//! scheduler = "maglev"
//! forward = "dsr"                   # or ipip, gue, nat, fullnat
//! fragments = false                  # needs scheduler source-hash, forward dsr/ipip/gue
//! health_check = { interval = "1s", timeout = "1s", rise = 2, fall = 2 }
//!
//! [[service.backend]]
//! address = "10.0.0.2"              # "10.0.0.2:8080" or port = 8080: nat/fullnat only
//! weight = 1
//! ```
//!
//! Parsing is two steps: serde reads the file into `Raw*` structs whose values carry their byte
//! span (so an error points at its line), then [`Config::parse`] checks every value and builds
//! the plain [`Config`] the daemon applies. Every table rejects unknown keys, so a typo is an
//! error, not a silently ignored setting.

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::Path,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use super::control::MAX_WEIGHT;
use crate::api::{self, CheckKind, Forward, HcTarget, HealthCheck, Proto, Scheduler, ServiceAddr};

/// Where `lb daemon --config` usually points (a convention; the flag has no default).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lb/lb.toml";

/// Largest `rise` and `fall` (as on the command line).
pub const MAX_RISE_FALL: u32 = 100;

/// The services of a configuration, by address.
pub type Services = BTreeMap<ServiceAddr, ServiceConfig>;

/// What a configuration file declares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub daemon: DaemonSettings,
    pub services: Services,
}

/// The `[daemon]` table: settings of the daemon itself. New settings (for example a metrics
/// address) are new optional fields here and in [`RawDaemon`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// The interfaces to attach to (one or more); `--iface` may give them instead. Fixed for
    /// the daemon's life.
    pub interfaces: Option<Located<Vec<String>>>,
    /// Where to serve Prometheus metrics (`--metrics` may give it instead); read at start.
    pub metrics: Option<std::net::SocketAddr>,
    /// Settings of the routed modes; read at start (the command line's flags win).
    pub routed: RoutedSettings,
}

/// Settings of the routed modes (`[daemon]` keys, or `lb daemon` flags of the same names);
/// `None` takes the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutedSettings {
    /// Outer IPv4 source of ipip/gue (default: the first IPv4 address of the first interface).
    pub encap_source4: Option<Ipv4Addr>,
    /// Outer IPv6 source of ipip/gue (default: the first IPv6 address of the first interface).
    pub encap_source6: Option<Ipv6Addr>,
    /// Low bits of the outer source taken from the flow hash (default 0).
    pub encap_source_hash_bits: Option<u8>,
    /// UDP destination port of GUE (default `lb_common::DEFAULT_GUE_PORT`).
    pub gue_port: Option<u16>,
    /// fullnat's IPv4 source (default: the interface's IPv4 address).
    pub snat4: Option<Ipv4Addr>,
    /// fullnat's IPv6 source (default: the interface's IPv6 address).
    pub snat6: Option<Ipv6Addr>,
    /// fullnat's source ports, inclusive (default 61000-65535).
    pub snat_ports: Option<(u16, u16)>,
    /// Entries of each NAT map (default `lb_common::DEFAULT_NAT_SIZE`).
    pub nat_size: Option<u32>,
    /// SYNs each CPU enters in the connection table per second, 0 for no limit (default
    /// `lb_common::DEFAULT_SYN_GUARD`; see `DataplaneConfig::syn_guard`).
    pub syn_guard: Option<u32>,
}

impl RoutedSettings {
    /// Each setting of `self`, or else of `fallback` (flags over the file).
    pub fn or(self, fallback: RoutedSettings) -> RoutedSettings {
        RoutedSettings {
            encap_source4: self.encap_source4.or(fallback.encap_source4),
            encap_source6: self.encap_source6.or(fallback.encap_source6),
            encap_source_hash_bits: self
                .encap_source_hash_bits
                .or(fallback.encap_source_hash_bits),
            gue_port: self.gue_port.or(fallback.gue_port),
            snat4: self.snat4.or(fallback.snat4),
            snat6: self.snat6.or(fallback.snat6),
            snat_ports: self.snat_ports.or(fallback.snat_ports),
            nat_size: self.nat_size.or(fallback.nat_size),
            syn_guard: self.syn_guard.or(fallback.syn_guard),
        }
    }
}

/// Default fullnat source ports: above Linux's default local port range (32768-60999), so a
/// connection of the balancer host itself (a health check) never shares a port with a
/// translated flow to the same backend.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);
/// Most bits of the outer source address the flow hash may set.
pub const MAX_ENCAP_HASH_BITS: u8 = 16;
/// Limits of `nat_size`.
pub const NAT_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=64_000_000;

/// A value and the line of the file it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub line: usize,
}

/// A service's settings (what `lb service add` takes), without its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    pub scheduler: Scheduler,
    pub forward: Forward,
    pub health: HealthCheck,
    /// Fragments are forwarded (`SERVICE_F_FRAGMENTS`).
    pub fragments: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    pub settings: ServiceSettings,
    pub backends: BTreeMap<IpAddr, BackendConfig>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub weight: u32,
    /// Declared drained: keeps its established flows, gets no new ones.
    pub drain: bool,
    /// The port it listens on when not the service's (nat and fullnat only); `None`: the
    /// service port.
    pub port: Option<u16>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            weight: 1,
            drain: false,
            port: None,
        }
    }
}

/// A configuration that cannot be used: `FILE:LINE: reason`, on one line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; `None` for errors about the whole file (unreadable, too many services).
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

// ---- the file as serde reads it ---------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    interface: Option<Spanned<RawInterfaces>>,
    metrics: Option<Spanned<String>>,
    encap_source4: Option<Spanned<String>>,
    encap_source6: Option<Spanned<String>>,
    encap_source_hash_bits: Option<Spanned<u8>>,
    gue_port: Option<Spanned<u16>>,
    snat4: Option<Spanned<String>>,
    snat6: Option<Spanned<String>>,
    snat_ports: Option<Spanned<String>>,
    nat_size: Option<Spanned<u32>>,
    syn_guard: Option<Spanned<u32>>,
}

/// `interface = "eth0"` or `interface = ["eth0", "eth1"]`.
#[derive(Deserialize)]
#[serde(untagged, expecting = "an interface name or a list of them")]
enum RawInterfaces {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    address: Option<Spanned<String>>,
    vip: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    proto: Option<Spanned<Proto>>,
    scheduler: Option<Spanned<Scheduler>>,
    forward: Option<Spanned<Forward>>,
    fragments: Option<Spanned<bool>>,
    health_check: Option<Spanned<RawHealth>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    /// What a probe does, as in `lb status --json`: `{ type = "tcp" }` (the default),
    /// `{ type = "http", path = "/healthz", status = "200-399" }`, `{ type = "udp", send =
    /// "PING", expect = "PONG" }` or `{ type = "none" }`.
    check: Option<Spanned<CheckKind>>,
    /// `"backend"` (default) or `"vip"`: where probes are addressed.
    target: Option<Spanned<HcTarget>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<Spanned<String>>,
    port: Option<Spanned<u16>>,
    weight: Option<Spanned<u32>>,
    drain: Option<Spanned<bool>>,
}

/// Turns byte spans into `FILE:LINE: reason` errors.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line: Some(self.line(span.start)),
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span(), message)
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            message: format!("cannot read the configuration: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Checks a configuration's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let src = Source { file, text };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            // toml's messages may span lines; an error is one line.
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            match e.span() {
                Some(span) => src.error(span, message),
                None => ConfigError {
                    file: file.to_owned(),
                    line: None,
                    message,
                },
            }
        })?;

        let interfaces = match &raw.daemon.interface {
            Some(iface) => {
                let names = match iface.get_ref() {
                    RawInterfaces::One(name) => vec![name.clone()],
                    RawInterfaces::Many(names) => names.clone(),
                };
                check_interfaces(&names).map_err(|m| src.at(iface, m))?;
                Some(Located {
                    line: src.line(iface.span().start),
                    value: names,
                })
            }
            None => None,
        };
        let routed = routed_settings(&src, &raw.daemon)?;
        let metrics = match &raw.daemon.metrics {
            Some(addr) => Some(addr.get_ref().parse().map_err(|_| {
                src.at(
                    addr,
                    format!(
                        "metrics: '{}' is not an address with a port",
                        addr.get_ref()
                    ),
                )
            })?),
            None => None,
        };

        let mut services = Services::new();
        let mut first_line = BTreeMap::new();
        // (VIP, protocol) of a service with fragments on, and its line.
        let mut fragments_line = BTreeMap::new();
        for raw_service in &raw.service {
            let (addr, addr_span) = service_addr(&src, raw_service)?;
            if let Some(line) = first_line.get(&addr) {
                return Err(src.error(
                    addr_span,
                    format!("duplicate service {addr} (first declared at line {line})"),
                ));
            }
            first_line.insert(addr, src.line(addr_span.start));
            let service = service_config(&src, addr, addr_span.clone(), raw_service.get_ref())?;
            if service.settings.fragments {
                let line = src.line(addr_span.start);
                if let Some(first) = fragments_line.insert((addr.vip, addr.proto), line) {
                    return Err(src.error(
                        addr_span,
                        format!(
                            "service {addr}: another service of this VIP and protocol (line \
                             {first}) already has fragments on; fragments carry no port, so \
                             only one can"
                        ),
                    ));
                }
            }
            services.insert(addr, service);
        }
        Ok(Config {
            daemon: DaemonSettings {
                interfaces,
                metrics,
                routed,
            },
            services,
        })
    }

    /// The (first) interface the file names, if any.
    pub fn interface(&self) -> Option<&str> {
        self.interfaces().first().map(String::as_str)
    }

    /// Every interface the file names (none when it names none).
    pub fn interfaces(&self) -> &[String] {
        self.daemon
            .interfaces
            .as_ref()
            .map_or(&[], |i| i.value.as_slice())
    }
}

/// The `[daemon]` settings of the routed modes, checked.
fn routed_settings(src: &Source<'_>, raw: &RawDaemon) -> Result<RoutedSettings, ConfigError> {
    fn addr<T: std::str::FromStr>(
        src: &Source<'_>,
        value: &Option<Spanned<String>>,
        key: &str,
        family: &str,
    ) -> Result<Option<T>, ConfigError> {
        value
            .as_ref()
            .map(|v| {
                v.get_ref().parse::<T>().map_err(|_| {
                    src.at(
                        v,
                        format!("{key}: '{}' is not an {family} address", v.get_ref()),
                    )
                })
            })
            .transpose()
    }
    let encap_source_hash_bits = match &raw.encap_source_hash_bits {
        Some(v) => Some(check_hash_bits(*v.get_ref()).map_err(|m| src.at(v, m))?),
        None => None,
    };
    let gue_port = match &raw.gue_port {
        Some(v) if *v.get_ref() == 0 => return Err(src.at(v, "gue_port: port 0 is not a port")),
        Some(v) => Some(*v.get_ref()),
        None => None,
    };
    let snat_ports = match &raw.snat_ports {
        Some(v) => Some(
            api::parse_port_range(v.get_ref())
                .map_err(|m| src.at(v, format!("snat_ports: {m}")))?,
        ),
        None => None,
    };
    let nat_size = match &raw.nat_size {
        Some(v) => Some(check_nat_size(*v.get_ref()).map_err(|m| src.at(v, m))?),
        None => None,
    };
    Ok(RoutedSettings {
        encap_source4: addr(src, &raw.encap_source4, "encap_source4", "IPv4")?,
        encap_source6: addr(src, &raw.encap_source6, "encap_source6", "IPv6")?,
        encap_source_hash_bits,
        gue_port,
        snat4: addr(src, &raw.snat4, "snat4", "IPv4")?,
        snat6: addr(src, &raw.snat6, "snat6", "IPv6")?,
        snat_ports,
        nat_size,
        syn_guard: raw.syn_guard.as_ref().map(|v| *v.get_ref()),
    })
}

/// The service's address, from `address` or from `vip`, `port` and `proto`, and where it is.
fn service_addr(
    src: &Source<'_>,
    spanned: &Spanned<RawService>,
) -> Result<(ServiceAddr, Range<usize>), ConfigError> {
    let raw = spanned.get_ref();
    let addr = match (&raw.address, &raw.vip) {
        (Some(address), _) => {
            if raw.vip.is_some() || raw.port.is_some() || raw.proto.is_some() {
                return Err(src.at(
                    address,
                    "give either `address` or `vip`, `port` and `proto`, not both",
                ));
            }
            let addr: ServiceAddr = address
                .get_ref()
                .parse()
                .map_err(|e| src.at(address, format!("service address: {e}")))?;
            (addr, address.span())
        }
        (None, Some(vip)) => {
            let ip: IpAddr = vip.get_ref().parse().map_err(|_| {
                src.at(vip, format!("vip '{}' is not an IP address", vip.get_ref()))
            })?;
            let Some(port) = &raw.port else {
                return Err(src.at(vip, "service has a `vip` but no `port`"));
            };
            if *port.get_ref() == 0 {
                return Err(src.at(port, "port 0 is not a service port"));
            }
            let Some(proto) = &raw.proto else {
                return Err(src.at(vip, "service has a `vip` but no `proto` (tcp or udp)"));
            };
            let addr = ServiceAddr {
                vip: ip,
                port: *port.get_ref(),
                proto: *proto.get_ref(),
            };
            (addr, vip.span())
        }
        (None, None) => {
            return Err(src.at(
                spanned,
                "service without an address: set `address = \"VIP:PORT/PROTO\"` (or `vip`, \
                 `port` and `proto`)",
            ));
        }
    };
    Ok(addr)
}

fn service_config(
    src: &Source<'_>,
    addr: ServiceAddr,
    addr_span: Range<usize>,
    raw: &RawService,
) -> Result<ServiceConfig, ConfigError> {
    let health = match &raw.health_check {
        Some(h) => health_check(src, h.get_ref())?,
        None => HealthCheck::default(),
    };
    let settings = ServiceSettings {
        scheduler: raw
            .scheduler
            .as_ref()
            .map_or(Scheduler::Maglev, |s| *s.get_ref()),
        forward: raw.forward.as_ref().map_or(Forward::Dsr, |f| *f.get_ref()),
        health,
        fragments: raw.fragments.as_ref().is_some_and(|f| *f.get_ref()),
    };
    if settings.fragments
        && let Some(f) = &raw.fragments
    {
        api::check_fragments(settings.scheduler, settings.forward).map_err(|m| {
            src.at(
                f,
                m.replace("--fragments", "fragments")
                    .replace("--scheduler ", "scheduler "),
            )
        })?;
    }
    let mut backends = BTreeMap::new();
    let mut first_line = BTreeMap::new();
    for spanned in &raw.backend {
        let b = spanned.get_ref();
        let Some(address) = &b.address else {
            return Err(src.at(
                spanned,
                format!("backend of service {addr} without an `address`"),
            ));
        };
        let (ip, port) = match address.get_ref().parse::<IpAddr>() {
            Ok(ip) => (ip, None),
            Err(_) => match address.get_ref().parse::<SocketAddr>() {
                Ok(sock) => (sock.ip(), Some(sock.port())),
                Err(_) => {
                    return Err(src.at(
                        address,
                        format!(
                            "backend address '{}' is not an IP address (or IP:PORT)",
                            address.get_ref()
                        ),
                    ));
                }
            },
        };
        check_backend(addr, settings.forward, ip).map_err(|m| src.at(address, m))?;
        api::check_backend_port(&addr, settings.forward, ip, port)
            .map_err(|m| src.at(address, m))?;
        if let Some(p) = &b.port {
            api::check_backend_port(&addr, settings.forward, ip, Some(*p.get_ref()))
                .map_err(|m| src.at(p, m))?;
            if let Some(port) = port
                && port != *p.get_ref()
            {
                return Err(src.at(
                    p,
                    format!(
                        "backend {ip}: port {} and the address's port {port} differ; give one",
                        p.get_ref()
                    ),
                ));
            }
        }
        // The service's own port is stored as no mapping, so a dump reads back the same.
        let port = port
            .or(b.port.as_ref().map(|p| *p.get_ref()))
            .filter(|p| *p != addr.port);
        let weight = match &b.weight {
            Some(w) => {
                check_weight(*w.get_ref()).map_err(|m| src.at(w, m))?;
                *w.get_ref()
            }
            None => BackendConfig::default().weight,
        };
        if let Some(line) = first_line.get(&ip) {
            return Err(src.at(
                address,
                format!("duplicate backend {ip} in service {addr} (first declared at line {line})"),
            ));
        }
        first_line.insert(ip, src.line(address.span().start));
        backends.insert(
            ip,
            BackendConfig {
                weight,
                drain: b.drain.as_ref().is_some_and(|d| *d.get_ref()),
                port,
            },
        );
    }
    if backends.len() > lb_common::RING_SIZE as usize {
        return Err(src.error(
            addr_span,
            format!(
                "service {addr} has {} backends; at most {} fit its table",
                backends.len(),
                lb_common::RING_SIZE
            ),
        ));
    }
    Ok(ServiceConfig { settings, backends })
}

fn health_check(src: &Source<'_>, raw: &RawHealth) -> Result<HealthCheck, ConfigError> {
    let duration = |value: &Spanned<String>, what: &str| {
        api::parse_duration(value.get_ref()).map_err(|e| src.at(value, format!("{what}: {e}")))
    };
    let count = |value: &Spanned<u32>, what: &str| {
        let n = *value.get_ref();
        if (1..=MAX_RISE_FALL).contains(&n) {
            Ok(n)
        } else {
            Err(src.at(
                value,
                format!("{what} {n} is out of range (1 to {MAX_RISE_FALL} checks)"),
            ))
        }
    };
    let mut check = HealthCheck::default();
    if let Some(v) = &raw.interval {
        check.interval = duration(v, "interval")?;
    }
    if let Some(v) = &raw.timeout {
        check.timeout = duration(v, "timeout")?;
    }
    if let Some(v) = &raw.rise {
        check.rise = count(v, "rise")?;
    }
    if let Some(v) = &raw.fall {
        check.fall = count(v, "fall")?;
    }
    if let Some(v) = &raw.check {
        v.get_ref()
            .validate()
            .map_err(|e| src.at(v, format!("check: {e}")))?;
        check.kind = v.get_ref().clone();
    }
    if let Some(v) = &raw.target {
        check.target = *v.get_ref();
    }
    if let Err(m) = check_health(&check) {
        // Point at whichever of the two durations the file set.
        let at = raw.timeout.as_ref().or(raw.interval.as_ref());
        return Err(match at {
            Some(v) => src.at(v, m),
            None => ConfigError {
                file: src.file.to_owned(),
                line: None,
                message: m,
            },
        });
    }
    Ok(check)
}

// ---- checks shared by the parser and the daemon (which may be handed a `Config` built in code) --

pub fn check_interface(name: &str) -> Result<(), String> {
    // IFNAMSIZ is 16 with the terminating NUL.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\t', '\n', ':']) {
        return Err(format!("'{name}' is not an interface name"));
    }
    Ok(())
}

/// One or more interface names, each once.
pub fn check_interfaces(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("the interface list is empty".into());
    }
    for (i, name) in names.iter().enumerate() {
        check_interface(name)?;
        if names[..i].contains(name) {
            return Err(format!("interface {name} is named twice"));
        }
    }
    Ok(())
}

pub fn check_hash_bits(bits: u8) -> Result<u8, String> {
    if bits > MAX_ENCAP_HASH_BITS {
        return Err(format!(
            "encap_source_hash_bits {bits} is above the maximum {MAX_ENCAP_HASH_BITS}"
        ));
    }
    Ok(bits)
}

pub fn check_nat_size(size: u32) -> Result<u32, String> {
    if !NAT_SIZE_RANGE.contains(&size) {
        return Err(format!(
            "nat_size {size} is out of range ({} to {} entries)",
            NAT_SIZE_RANGE.start(),
            NAT_SIZE_RANGE.end()
        ));
    }
    Ok(size)
}

pub fn check_health(check: &HealthCheck) -> Result<(), String> {
    if check.rise == 0 || check.fall == 0 {
        return Err("health-check rise and fall must be at least 1".into());
    }
    if check.rise > MAX_RISE_FALL || check.fall > MAX_RISE_FALL {
        return Err(format!(
            "health-check rise and fall must be at most {MAX_RISE_FALL}"
        ));
    }
    if check.timeout > check.interval {
        return Err(format!(
            "health-check timeout {} is longer than the interval {}",
            format_duration(check.timeout),
            format_duration(check.interval)
        ));
    }
    Ok(())
}

pub fn check_weight(weight: u32) -> Result<(), String> {
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is above the maximum {MAX_WEIGHT}"));
    }
    Ok(())
}

pub fn check_backend(service: ServiceAddr, forward: Forward, ip: IpAddr) -> Result<(), String> {
    api::check_backend_family(&service, forward, ip)?;
    let unicast = match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback()),
    };
    if !unicast {
        return Err(format!("backend {ip} is not a unicast host address"));
    }
    if ip == service.vip {
        return Err(format!("backend {ip} is the service's own VIP"));
    }
    Ok(())
}

/// Checks a configuration built in code as the parser checks a file (without lines).
pub fn check_services(services: &Services) -> Result<(), String> {
    for (addr, s) in services {
        if addr.port == 0 {
            return Err(format!("service {addr}: port 0 is not a service port"));
        }
        check_health(&s.settings.health).map_err(|m| format!("service {addr}: {m}"))?;
        if s.backends.len() > lb_common::RING_SIZE as usize {
            return Err(format!(
                "service {addr} has {} backends; at most {} fit its table",
                s.backends.len(),
                lb_common::RING_SIZE
            ));
        }
        if s.settings.fragments {
            api::check_fragments(s.settings.scheduler, s.settings.forward)
                .map_err(|m| format!("service {addr}: {m}"))?;
            if let Some((other, _)) = services.iter().find(|(other, o)| {
                *other != addr
                    && o.settings.fragments
                    && (other.vip, other.proto) == (addr.vip, addr.proto)
            }) {
                return Err(format!(
                    "services {other} and {addr} both have fragments on; fragments carry no \
                     port, so only one service of a VIP and protocol can"
                ));
            }
        }
        for (ip, b) in &s.backends {
            check_backend(*addr, s.settings.forward, *ip)
                .map_err(|m| format!("service {addr}: {m}"))?;
            api::check_backend_port(addr, s.settings.forward, *ip, b.port)
                .map_err(|m| format!("service {addr}: {m}"))?;
            check_weight(b.weight).map_err(|m| format!("service {addr}: backend {ip}: {m}"))?;
        }
    }
    Ok(())
}

// ---- writing a configuration (`lb config dump`) ------------------------------------------------

/// `1s`, `500ms`, `2m`: what [`api::parse_duration`] reads back to the same value.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Writes a configuration as a file that [`Config::parse`] reads back to the same value.
pub fn render(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(&mut out, config);
    out
}

/// A check kind as an inline TOML table, in the same shape it is read in.
fn render_check(kind: &CheckKind) -> String {
    match kind {
        CheckKind::Tcp => "{ type = \"tcp\" }".into(),
        CheckKind::None => "{ type = \"none\" }".into(),
        CheckKind::Http { path, status, host } => {
            let host = host
                .as_ref()
                .map(|h| format!(", host = {}", quote(h)))
                .unwrap_or_default();
            format!(
                "{{ type = \"http\", path = {}, status = {}{host} }}",
                quote(path),
                quote(&status.to_string())
            )
        }
        CheckKind::Udp { send, expect } => {
            let expect = expect
                .as_ref()
                .map(|e| format!(", expect = {}", quote(e)))
                .unwrap_or_default();
            format!("{{ type = \"udp\", send = {}{expect} }}", quote(send))
        }
    }
}

fn render_into(out: &mut String, config: &Config) -> fmt::Result {
    let r = &config.daemon.routed;
    if config.interface().is_some()
        || config.daemon.metrics.is_some()
        || *r != RoutedSettings::default()
    {
        writeln!(out, "[daemon]")?;
    }
    match config.interfaces() {
        [] => {}
        [one] => writeln!(out, "interface = {}", quote(one))?,
        many => {
            let names: Vec<String> = many.iter().map(|n| quote(n)).collect();
            writeln!(out, "interface = [{}]", names.join(", "))?;
        }
    }
    if let Some(metrics) = config.daemon.metrics {
        writeln!(out, "metrics = {}", quote(&metrics.to_string()))?;
    }
    if let Some(a) = r.encap_source4 {
        writeln!(out, "encap_source4 = {}", quote(&a.to_string()))?;
    }
    if let Some(a) = r.encap_source6 {
        writeln!(out, "encap_source6 = {}", quote(&a.to_string()))?;
    }
    if let Some(bits) = r.encap_source_hash_bits {
        writeln!(out, "encap_source_hash_bits = {bits}")?;
    }
    if let Some(port) = r.gue_port {
        writeln!(out, "gue_port = {port}")?;
    }
    if let Some(a) = r.snat4 {
        writeln!(out, "snat4 = {}", quote(&a.to_string()))?;
    }
    if let Some(a) = r.snat6 {
        writeln!(out, "snat6 = {}", quote(&a.to_string()))?;
    }
    if let Some((low, high)) = r.snat_ports {
        writeln!(out, "snat_ports = \"{low}-{high}\"")?;
    }
    if let Some(size) = r.nat_size {
        writeln!(out, "nat_size = {size}")?;
    }
    if let Some(limit) = r.syn_guard {
        writeln!(out, "syn_guard = {limit}")?;
    }
    for (addr, s) in &config.services {
        let h = &s.settings.health;
        writeln!(out)?;
        writeln!(out, "[[service]]")?;
        writeln!(out, "address = {}", quote(&addr.to_string()))?;
        writeln!(out, "scheduler = {}", quote(s.settings.scheduler.name()))?;
        writeln!(out, "forward = {}", quote(s.settings.forward.name()))?;
        if s.settings.fragments {
            writeln!(out, "fragments = true")?;
        }
        writeln!(
            out,
            "health_check = {{ interval = {}, timeout = {}, rise = {}, fall = {}, check = {}, \
             target = {} }}",
            quote(&format_duration(h.interval)),
            quote(&format_duration(h.timeout)),
            h.rise,
            h.fall,
            render_check(&h.kind),
            quote(h.target.name())
        )?;
        for (ip, b) in &s.backends {
            writeln!(out)?;
            writeln!(out, "[[service.backend]]")?;
            writeln!(out, "address = {}", quote(&ip.to_string()))?;
            if let Some(port) = b.port {
                writeln!(out, "port = {port}")?;
            }
            writeln!(out, "weight = {}", b.weight)?;
            if b.drain {
                writeln!(out, "drain = true")?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../packaging/lb.toml.example");

    fn svc(s: &str) -> ServiceAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Parses `text` and expects an error; returns it as the one line the daemon prints.
    fn error(text: &str) -> String {
        match Config::parse(text, "lb.toml") {
            Ok(c) => panic!("accepted:\n{text}\nas {c:?}"),
            Err(e) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "not one line: {line}");
                line
            }
        }
    }

    const HEAD: &str = "[[service]]\naddress = \"10.0.0.10:80/tcp\"\n";

    #[test]
    fn the_shipped_example_parses() {
        let c = Config::parse(EXAMPLE, "lb.toml.example").unwrap();
        assert_eq!(c.interface(), Some("eth0"));
        assert_eq!(c.services.len(), 2);
        let web = &c.services[&svc("203.0.113.10:80/tcp")];
        assert_eq!(web.settings.health, HealthCheck::default());
        assert_eq!(web.backends.len(), 3);
        assert_eq!(web.backends[&ip("192.0.2.12")].weight, 2);
        assert!(web.backends[&ip("192.0.2.13")].drain);
        let dns = &c.services[&svc("203.0.113.10:53/udp")];
        assert_eq!(dns.settings.health.timeout, Duration::from_millis(500));
        assert_eq!((dns.settings.health.rise, dns.settings.health.fall), (1, 3));
        assert_eq!(dns.backends[&ip("192.0.2.21")], BackendConfig::default());
    }

    #[test]
    fn an_empty_file_declares_nothing() {
        assert_eq!(Config::parse("", "lb.toml").unwrap(), Config::default());
        assert_eq!(
            Config::parse("# nothing\n[daemon]\n", "lb.toml").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn defaults_fill_what_a_service_leaves_out() {
        let c = Config::parse(
            &format!("{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\n"),
            "f",
        )
        .unwrap();
        let s = &c.services[&svc("10.0.0.10:80/tcp")];
        assert_eq!(s.settings.scheduler, Scheduler::Maglev);
        assert_eq!(s.settings.forward, Forward::Dsr);
        assert_eq!(s.settings.health, HealthCheck::default());
        assert_eq!(s.backends[&ip("10.0.0.2")], BackendConfig::default());
    }

    #[test]
    fn vip_port_proto_is_the_same_service_as_address() {
        let a = Config::parse(HEAD, "f").unwrap();
        let b = Config::parse(
            "[[service]]\nvip = \"10.0.0.10\"\nport = 80\nproto = \"tcp\"\n",
            "f",
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        assert_eq!(
            error("[daemon]\ninterface = \"eth0\"\n\n[[service]\naddress = \"x\"\n"),
            "lb.toml:4: unclosed array table, expected `]`"
        );
        assert_eq!(
            error(&format!("{HEAD}scheduler = maglev\n")),
            "lb.toml:3: string values must be quoted, expected literal string"
        );
        assert_eq!(
            error(&format!("{HEAD}address = \"10.0.0.11:80/tcp\"\n")),
            "lb.toml:3: duplicate key"
        );
    }

    #[test]
    fn unknown_fields_are_errors_at_their_line() {
        assert_eq!(
            error("[daemon]\ninterface = \"eth0\"\nmetric = \"x\"\n"),
            "lb.toml:3: unknown field `metric`, expected one of `interface`, `metrics`, \
             `encap_source4`, `encap_source6`, `encap_source_hash_bits`, `gue_port`, `snat4`, \
             `snat6`, `snat_ports`, `nat_size`, `syn_guard`"
        );
        assert!(error("[deamon]\n").starts_with("lb.toml:1: unknown field `deamon`"));
        assert!(
            error(&format!("{HEAD}\nschedular = \"maglev\"\n"))
                .starts_with("lb.toml:4: unknown field `schedular`")
        );
        assert!(
            error(&format!(
                "{HEAD}[service.health_check]\ninterval = \"1s\"\nretries = 3\n"
            ))
            .starts_with("lb.toml:5: unknown field `retries`")
        );
        assert!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\nwieght = 2\n"
            ))
            .starts_with("lb.toml:5: unknown field `wieght`, expected one of")
        );
    }

    #[test]
    fn wrong_types_and_unknown_names_are_errors_at_their_line() {
        assert_eq!(
            error(&format!("{HEAD}scheduler = \"random\"\n")),
            "lb.toml:3: unknown variant `random`, expected one of `maglev`, `source-hash`, `round-robin`, `least-conn`"
        );
        assert_eq!(
            error(&format!("{HEAD}forward = \"tunnel\"\n")),
            "lb.toml:3: unknown variant `tunnel`, expected one of `dsr`, `ipip`, `gue`, `nat`, \
             `fullnat`"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\nweight = -1\n"
            )),
            "lb.toml:5: invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            error("[[service]]\nvip = \"10.0.0.10\"\nport = 70000\nproto = \"tcp\"\n"),
            "lb.toml:3: invalid value: integer `70000`, expected u16"
        );
        assert_eq!(
            error("[[service]]\nvip = \"10.0.0.10\"\nport = 80\nproto = \"sctp\"\n"),
            "lb.toml:4: unknown variant `sctp`, expected `tcp` or `udp`"
        );
        assert_eq!(
            error(&format!("{HEAD}health_check = {{ rise = \"2\" }}\n")),
            "lb.toml:3: invalid type: string \"2\", expected u32"
        );
    }

    #[test]
    fn bad_addresses_are_errors_at_their_line() {
        assert_eq!(
            error("\n[[service]]\naddress = \"10.0.0.10:80\"\n"),
            "lb.toml:3: service address: '10.0.0.10:80' is not VIP:PORT/tcp|udp (missing /PROTO)"
        );
        assert_eq!(
            error("[[service]]\naddress = \"10.0.0.300:80/tcp\"\n"),
            "lb.toml:2: service address: '10.0.0.300:80' is not an address with a port (VIP:PORT)"
        );
        assert_eq!(
            error("[[service]]\nvip = \"ten\"\nport = 80\nproto = \"tcp\"\n"),
            "lb.toml:2: vip 'ten' is not an IP address"
        );
        assert_eq!(
            error("[[service]]\nvip = \"10.0.0.10\"\nproto = \"tcp\"\n"),
            "lb.toml:2: service has a `vip` but no `port`"
        );
        assert_eq!(
            error("[[service]]\naddress = \"10.0.0.10:80/tcp\"\nport = 80\n"),
            "lb.toml:2: give either `address` or `vip`, `port` and `proto`, not both"
        );
        assert_eq!(
            error("[[service]]\nscheduler = \"maglev\"\n"),
            "lb.toml:1: service without an address: set `address = \"VIP:PORT/PROTO\"` (or \
             `vip`, `port` and `proto`)"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}\n[[service.backend]]\naddress = \"10.0.0.2.5\"\n"
            )),
            "lb.toml:5: backend address '10.0.0.2.5' is not an IP address (or IP:PORT)"
        );
        assert_eq!(
            error(&format!("{HEAD}[[service.backend]]\nweight = 3\n")),
            "lb.toml:3: backend of service 10.0.0.10:80/tcp without an `address`"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"127.0.0.1\"\n"
            )),
            "lb.toml:4: backend 127.0.0.1 is not a unicast host address"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.10\"\n"
            )),
            "lb.toml:4: backend 10.0.0.10 is the service's own VIP"
        );
        assert_eq!(
            error("[daemon]\ninterface = \"eth0/1\"\n"),
            "lb.toml:2: 'eth0/1' is not an interface name"
        );
    }

    #[test]
    fn ipv6_services_take_ipv6_backends() {
        let c = Config::parse(
            "[[service]]\naddress = \"[2001:db8::1]:80/tcp\"\n\
             [[service.backend]]\naddress = \"2001:db8::2\"\n",
            "lb.toml",
        )
        .unwrap();
        assert_eq!(c.services.len(), 1);
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"2001:db8::2\"\n"
            )),
            "lb.toml:4: backend 2001:db8::2: forwarding mode dsr needs a backend of the VIP's \
             address family (ipip and gue allow either)"
        );
    }

    #[test]
    fn duplicates_are_errors_at_the_second_declaration() {
        assert_eq!(
            error(&format!(
                "{HEAD}\n[[service]]\nvip = \"10.0.0.10\"\nport = 80\nproto = \"tcp\"\n"
            )),
            "lb.toml:5: duplicate service 10.0.0.10:80/tcp (first declared at line 2)"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\n\
                 [[service.backend]]\naddress = \"10.0.0.3\"\n\
                 [[service.backend]]\naddress = \"10.0.0.2:80\"\n"
            )),
            "lb.toml:8: duplicate backend 10.0.0.2 in service 10.0.0.10:80/tcp (first declared \
             at line 4)"
        );
        // The same backend in two services is fine.
        Config::parse(
            &format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\n\
                 [[service]]\naddress = \"10.0.0.10:443/tcp\"\n\
                 [[service.backend]]\naddress = \"10.0.0.2\"\n"
            ),
            "f",
        )
        .unwrap();
    }

    #[test]
    fn impossible_values_are_errors_at_their_line() {
        let hc = |body: &str| error(&format!("{HEAD}[service.health_check]\n{body}"));
        assert_eq!(
            hc("rise = 0\n"),
            "lb.toml:4: rise 0 is out of range (1 to 100 checks)"
        );
        assert_eq!(
            hc("interval = \"1s\"\nfall = 101\n"),
            "lb.toml:5: fall 101 is out of range (1 to 100 checks)"
        );
        assert_eq!(
            hc("interval = \"1s\"\ntimeout = \"2s\"\n"),
            "lb.toml:5: health-check timeout 2s is longer than the interval 1s"
        );
        assert_eq!(
            hc("interval = \"500ms\"\n"),
            "lb.toml:4: health-check timeout 1s is longer than the interval 500ms"
        );
        assert_eq!(
            hc("interval = \"0s\"\n"),
            "lb.toml:4: interval: a duration must be greater than zero"
        );
        assert_eq!(
            hc("timeout = \"soon\"\n"),
            "lb.toml:4: timeout: 'soon' is not a duration (examples: 500ms, 2s, 1m)"
        );
        let backend = |body: &str| {
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\n{body}"
            ))
        };
        assert_eq!(
            backend("weight = 10001\n"),
            "lb.toml:5: weight 10001 is above the maximum 10000"
        );
        assert_eq!(
            backend("port = 8080\n"),
            "lb.toml:5: backend 10.0.0.2 port 8080 differs from the service port 80: with dsr \
             forwarding a backend serves the VIP on the service's own port (only nat and \
             fullnat map ports)"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2:8080\"\n"
            )),
            "lb.toml:4: backend 10.0.0.2 port 8080 differs from the service port 80: with dsr \
             forwarding a backend serves the VIP on the service's own port (only nat and \
             fullnat map ports)"
        );
        assert_eq!(
            error("[[service]]\naddress = \"10.0.0.10:0/tcp\"\n"),
            "lb.toml:2: service address: port 0 is not a service port"
        );
        // The limits themselves are accepted.
        Config::parse(
            &format!(
                "{HEAD}health_check = {{ interval = \"1s\", timeout = \"1s\", rise = 100, fall = 1 }}\n\
                 [[service.backend]]\naddress = \"10.0.0.2:80\"\nport = 80\nweight = 10000\n\
                 [[service.backend]]\naddress = \"10.0.0.3\"\nweight = 0\n"
            ),
            "f",
        )
        .unwrap();
    }

    #[test]
    fn every_forwarding_mode_is_accepted_by_name() {
        for f in Forward::ALL {
            let c = Config::parse(
                &format!(
                    "{HEAD}forward = \"{}\"\n[[service.backend]]\naddress = \"10.0.0.2\"\n",
                    f.name()
                ),
                "f",
            )
            .unwrap();
            assert_eq!(c.services[&svc("10.0.0.10:80/tcp")].settings.forward, f);
        }
    }

    #[test]
    fn backend_ports_are_mapped_only_by_nat_modes() {
        for mode in ["nat", "fullnat"] {
            let c = Config::parse(
                &format!(
                    "{HEAD}forward = \"{mode}\"\n\
                     [[service.backend]]\naddress = \"10.0.0.2:8080\"\n\
                     [[service.backend]]\naddress = \"10.0.0.3\"\nport = 8081\n\
                     [[service.backend]]\naddress = \"10.0.0.4:80\"\n\
                     [[service.backend]]\naddress = \"10.0.0.5\"\n"
                ),
                "f",
            )
            .unwrap();
            let b = &c.services[&svc("10.0.0.10:80/tcp")].backends;
            assert_eq!(b[&ip("10.0.0.2")].port, Some(8080));
            assert_eq!(b[&ip("10.0.0.3")].port, Some(8081));
            // The service's own port is no mapping.
            assert_eq!(b[&ip("10.0.0.4")].port, None);
            assert_eq!(b[&ip("10.0.0.5")].port, None);
            assert_eq!(check_services(&c.services), Ok(()));
            // A dump reads back the same.
            assert_eq!(Config::parse(&render(&c), "dump").unwrap(), c);
        }
        assert_eq!(
            error(&format!(
                "{HEAD}forward = \"nat\"\n[[service.backend]]\naddress = \"10.0.0.2:8080\"\n\
                 port = 9090\n"
            )),
            "lb.toml:6: backend 10.0.0.2: port 9090 and the address's port 8080 differ; give one"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}forward = \"nat\"\n[[service.backend]]\naddress = \"10.0.0.2\"\nport = 0\n"
            )),
            "lb.toml:6: backend 10.0.0.2: port 0 is not a port"
        );
        for mode in ["ipip", "gue"] {
            let e = error(&format!(
                "{HEAD}forward = \"{mode}\"\n[[service.backend]]\naddress = \"10.0.0.2:8080\"\n"
            ));
            assert!(
                e.starts_with("lb.toml:5: backend 10.0.0.2 port 8080 differs from the service"),
                "{e}"
            );
        }
        // A service built in code gets the same rule.
        let mut c = Config::parse(
            &format!("{HEAD}[[service.backend]]\naddress = \"10.0.0.2\"\n"),
            "f",
        )
        .unwrap();
        let s = c.services.get_mut(&svc("10.0.0.10:80/tcp")).unwrap();
        s.backends.get_mut(&ip("10.0.0.2")).unwrap().port = Some(8080);
        assert!(
            check_services(&c.services)
                .unwrap_err()
                .contains("only nat and fullnat")
        );
    }

    #[test]
    fn encapsulation_allows_every_family_mix_and_the_rest_none() {
        for (mode, ok) in [
            ("dsr", false),
            ("ipip", true),
            ("gue", true),
            ("nat", false),
            ("fullnat", false),
        ] {
            for (vip, backend) in [
                ("10.0.0.10:80/tcp", "2001:db8::2"),
                ("[2001:db8::10]:80/tcp", "10.0.0.2"),
            ] {
                let text = format!(
                    "[[service]]\naddress = \"{vip}\"\nforward = \"{mode}\"\n\
                     [[service.backend]]\naddress = \"{backend}\"\n"
                );
                match Config::parse(&text, "lb.toml") {
                    Ok(_) => assert!(ok, "{mode} accepted {vip} -> {backend}"),
                    Err(e) => {
                        assert!(!ok, "{mode}: {e}");
                        assert_eq!(
                            e.to_string(),
                            format!(
                                "lb.toml:5: backend {backend}: forwarding mode {mode} needs a \
                                 backend of the VIP's address family (ipip and gue allow either)"
                            )
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fragments_need_source_hash_a_portless_mode_and_one_service_per_vip() {
        let frag = |scheduler: &str, forward: &str| {
            format!(
                "{HEAD}scheduler = \"{scheduler}\"\nforward = \"{forward}\"\nfragments = true\n"
            )
        };
        for forward in ["dsr", "ipip", "gue"] {
            let c = Config::parse(&frag("source-hash", forward), "f").unwrap();
            assert!(c.services[&svc("10.0.0.10:80/tcp")].settings.fragments);
            assert_eq!(Config::parse(&render(&c), "dump").unwrap(), c);
        }
        assert_eq!(
            error(&frag("maglev", "dsr")),
            "lb.toml:5: fragments needs scheduler source-hash (every fragment of a client goes \
             to one backend), not maglev"
        );
        for forward in ["nat", "fullnat"] {
            assert!(error(&frag("source-hash", forward)).starts_with(&format!(
                "lb.toml:5: fragments works with forward dsr, ipip or gue, not {forward}"
            )));
        }
        // fragments = false needs nothing.
        Config::parse(
            &format!("{HEAD}forward = \"nat\"\nfragments = false\n"),
            "f",
        )
        .unwrap();
        let two = format!(
            "{}[[service]]\naddress = \"10.0.0.10:443/tcp\"\nscheduler = \"source-hash\"\n\
             fragments = true\n",
            frag("source-hash", "dsr")
        );
        assert_eq!(
            error(&two),
            "lb.toml:7: service 10.0.0.10:443/tcp: another service of this VIP and protocol \
             (line 2) already has fragments on; fragments carry no port, so only one can"
        );
        // The same VIP with another protocol is another port-0 key.
        Config::parse(&two.replace("443/tcp", "443/udp"), "f").unwrap();
        let mut c = Config::parse(&two.replace("443/tcp", "443/udp"), "f").unwrap();
        assert_eq!(check_services(&c.services), Ok(()));
        let udp = svc("10.0.0.10:443/udp");
        let moved = c.services.remove(&udp).unwrap();
        c.services.insert(svc("10.0.0.10:443/tcp"), moved);
        assert!(
            check_services(&c.services)
                .unwrap_err()
                .contains("both have fragments on")
        );
    }

    #[test]
    fn daemon_settings_of_the_routed_modes_parse_check_and_dump() {
        let text = "[daemon]\ninterface = [\"eth0\", \"eth1\"]\nencap_source4 = \"192.0.2.1\"\n\
                    encap_source6 = \"2001:db8::1\"\nencap_source_hash_bits = 8\ngue_port = 9000\n\
                    snat4 = \"192.0.2.2\"\nsnat6 = \"2001:db8::2\"\nsnat_ports = \"1024-2047\"\n\
                    nat_size = 4096\nsyn_guard = 0\n";
        let c = Config::parse(text, "lb.toml").unwrap();
        assert_eq!(c.interfaces(), ["eth0", "eth1"]);
        assert_eq!(c.interface(), Some("eth0"));
        let r = c.daemon.routed;
        assert_eq!(r.encap_source4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(r.encap_source6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(r.encap_source_hash_bits, Some(8));
        assert_eq!(r.gue_port, Some(9000));
        assert_eq!(r.snat4, Some("192.0.2.2".parse().unwrap()));
        assert_eq!(r.snat6, Some("2001:db8::2".parse().unwrap()));
        assert_eq!(r.snat_ports, Some((1024, 2047)));
        assert_eq!(r.nat_size, Some(4096));
        assert_eq!(r.syn_guard, Some(0), "0 turns the SYN-flood guard off");
        let again = Config::parse(&render(&c), "dump").unwrap();
        assert_eq!(
            (again.interfaces(), again.daemon.routed),
            (c.interfaces(), r)
        );
        // One interface is written as a string, as before.
        let one = Config::parse("[daemon]\ninterface = \"eth0\"\n", "f").unwrap();
        assert!(render(&one).contains("interface = \"eth0\"\n"));
        // Flags win over the file.
        let flags = RoutedSettings {
            gue_port: Some(7000),
            ..Default::default()
        };
        assert_eq!(flags.or(r).gue_port, Some(7000));
        assert_eq!(flags.or(r).snat_ports, Some((1024, 2047)));
        for (body, message) in [
            (
                "snat_ports = \"2000-1000\"",
                "lb.toml:2: snat_ports: port range 2000-1000 is empty (write the low port first)",
            ),
            (
                "snat_ports = \"0-1000\"",
                "lb.toml:2: snat_ports: port range 0-1000: port 0 is not a port",
            ),
            (
                "snat_ports = \"40000\"",
                "lb.toml:2: snat_ports: '40000' is not a port range MIN-MAX (for example \
                 61000-65535)",
            ),
            (
                "encap_source4 = \"2001:db8::1\"",
                "lb.toml:2: encap_source4: '2001:db8::1' is not an IPv4 address",
            ),
            (
                "snat6 = \"192.0.2.1\"",
                "lb.toml:2: snat6: '192.0.2.1' is not an IPv6 address",
            ),
            (
                "encap_source_hash_bits = 17",
                "lb.toml:2: encap_source_hash_bits 17 is above the maximum 16",
            ),
            ("gue_port = 0", "lb.toml:2: gue_port: port 0 is not a port"),
            (
                "nat_size = 10",
                "lb.toml:2: nat_size 10 is out of range (1024 to 64000000 entries)",
            ),
            (
                "interface = [\"eth0\", \"eth0\"]",
                "lb.toml:2: interface eth0 is named twice",
            ),
            ("interface = []", "lb.toml:2: the interface list is empty"),
        ] {
            assert_eq!(error(&format!("[daemon]\n{body}\n")), message);
        }
    }

    #[test]
    fn a_missing_file_is_an_error_without_a_line() {
        let e = Config::load(Path::new("/nonexistent/lb.toml")).unwrap_err();
        assert_eq!(e.line, None);
        assert!(
            e.to_string()
                .starts_with("/nonexistent/lb.toml: cannot read the configuration:"),
            "{e}"
        );
    }

    #[test]
    fn rendered_configurations_parse_back_to_the_same_value() {
        let mut c = Config::parse(EXAMPLE, "f").unwrap();
        let again = Config::parse(&render(&c), "dump").unwrap();
        // Lines differ; values do not.
        assert_eq!(again.services, c.services);
        assert_eq!(again.interface(), c.interface());
        // Odd durations and the extremes too.
        let s = c.services.get_mut(&svc("203.0.113.10:80/tcp")).unwrap();
        let h = &mut s.settings.health;
        h.interval = Duration::from_secs(120);
        h.timeout = Duration::from_millis(1500);
        (h.rise, h.fall) = (100, 1);
        s.backends.insert(
            ip("192.0.2.99"),
            BackendConfig {
                weight: 0,
                drain: true,
                port: None,
            },
        );
        c.daemon.interfaces = None;
        let text = render(&c);
        assert!(
            text.contains("interval = \"2m\", timeout = \"1500ms\""),
            "{text}"
        );
        let again = Config::parse(&text, "dump").unwrap();
        assert_eq!(again, c);
        assert_eq!(render(&Config::default()), "");
    }

    #[test]
    fn durations_format_as_they_parse() {
        for ms in [1, 250, 999, 1000, 1500, 60_000, 90_000, 120_000, 3_600_000] {
            let d = Duration::from_millis(ms);
            assert_eq!(api::parse_duration(&format_duration(d)), Ok(d), "{ms} ms");
        }
    }

    #[test]
    fn code_built_configurations_get_the_same_checks() {
        let mut c = Config::parse(EXAMPLE, "f").unwrap();
        assert_eq!(check_services(&c.services), Ok(()));
        let s = c.services.get_mut(&svc("203.0.113.10:80/tcp")).unwrap();
        s.backends.insert(
            ip("192.0.2.50"),
            BackendConfig {
                weight: 10_001,
                drain: false,
                port: None,
            },
        );
        assert_eq!(
            check_services(&c.services),
            Err(
                "service 203.0.113.10:80/tcp: backend 192.0.2.50: weight 10001 is above the \
                 maximum 10000"
                    .into()
            )
        );
    }
}

#[cfg(test)]
mod check_kind_tests {
    use super::*;

    const HTTP: &str = "[[service]]\naddress = \"10.0.0.10:80/tcp\"\n\
        health_check = { interval = \"500ms\", timeout = \"500ms\", check = { type = \"http\", path = \"/healthz\", status = \"200-299\", host = \"web\" } }\n\
        [[service.backend]]\naddress = \"10.0.0.2\"\n\
        [[service]]\naddress = \"10.0.0.10:53/udp\"\n\
        health_check = { check = { type = \"udp\", send = \"PING\\\\n\", expect = \"PONG\" } }\n";

    #[test]
    fn check_kinds_parse_and_survive_a_dump() {
        let config = Config::parse(HTTP, "lb.toml").unwrap();
        let web: ServiceAddr = "10.0.0.10:80/tcp".parse().unwrap();
        let kind = &config.services[&web].settings.health.kind;
        assert_eq!(kind.name(), "http");
        let again = Config::parse(&render(&config), "dump.toml").unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn a_bad_check_is_an_error_at_its_line() {
        let text = "[[service]]\naddress = \"10.0.0.10:80/tcp\"\n\
            health_check = { check = { type = \"http\", path = \"healthz\", status = \"200\" } }\n";
        let e = Config::parse(text, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:3: check:"), "{e}");
        let text = "[[service]]\naddress = \"10.0.0.10:80/tcp\"\n\
            health_check = { check = { type = \"icmp\" } }\n";
        let e = Config::parse(text, "lb.toml").unwrap_err().to_string();
        assert!(e.starts_with("lb.toml:3:"), "{e}");
    }
}
