//! The configuration file (`lb daemon --config /etc/lb/lb.toml`): its TOML format, its
//! validation (every error names the file and the line), and the file `lb config dump` writes.
//!
//! ```toml
//! [daemon]
//! interface = "eth0"
//!
//! [[service]]
//! address = "10.0.0.10:80/tcp"       # or vip = "10.0.0.10", port = 80, proto = "tcp"
//! scheduler = "maglev"
//! forward = "dsr"
//! health_check = { interval = "1s", timeout = "1s", rise = 2, fall = 2 }
//!
//! [[service.backend]]
//! address = "10.0.0.2"
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
    net::{IpAddr, SocketAddr},
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
    /// The interface to attach to; `--iface` may give it instead. Fixed for the daemon's life.
    pub interface: Option<Located<String>>,
    /// Where to serve Prometheus metrics (`--metrics` may give it instead); read at start.
    pub metrics: Option<std::net::SocketAddr>,
}

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
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            weight: 1,
            drain: false,
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
    interface: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
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

        let interface = match raw.daemon.interface {
            Some(iface) => {
                check_interface(iface.get_ref()).map_err(|m| src.at(&iface, m))?;
                Some(Located {
                    line: src.line(iface.span().start),
                    value: iface.into_inner(),
                })
            }
            None => None,
        };
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
        for raw_service in &raw.service {
            let (addr, addr_span) = service_addr(&src, raw_service)?;
            if let Some(line) = first_line.get(&addr) {
                return Err(src.error(
                    addr_span,
                    format!("duplicate service {addr} (first declared at line {line})"),
                ));
            }
            first_line.insert(addr, src.line(addr_span.start));
            let service = service_config(&src, addr, addr_span, raw_service.get_ref())?;
            services.insert(addr, service);
        }
        Ok(Config {
            daemon: DaemonSettings { interface, metrics },
            services,
        })
    }

    /// The interface the file names, if any.
    pub fn interface(&self) -> Option<&str> {
        self.daemon.interface.as_ref().map(|i| i.value.as_str())
    }
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
    };
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
        check_backend(addr, ip).map_err(|m| src.at(address, m))?;
        let port_differs = |port: u16, span: Range<usize>| {
            src.error(
                span,
                format!(
                    "backend {ip} port {port} differs from the service port {}: with {} \
                     forwarding a backend serves the VIP on the service's own port",
                    addr.port,
                    settings.forward.name()
                ),
            )
        };
        if let Some(port) = port
            && port != addr.port
        {
            return Err(port_differs(port, address.span()));
        }
        if let Some(port) = &b.port
            && *port.get_ref() != addr.port
        {
            return Err(port_differs(*port.get_ref(), port.span()));
        }
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

pub fn check_backend(service: ServiceAddr, ip: IpAddr) -> Result<(), String> {
    if ip.is_ipv4() != service.vip.is_ipv4() {
        return Err(format!(
            "backend {ip}: forwarding mode dsr needs a backend of the VIP's address family"
        ));
    }
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
        for (ip, b) in &s.backends {
            check_backend(*addr, *ip).map_err(|m| format!("service {addr}: {m}"))?;
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
    if config.interface().is_some() || config.daemon.metrics.is_some() {
        writeln!(out, "[daemon]")?;
    }
    if let Some(iface) = config.interface() {
        writeln!(out, "interface = {}", quote(iface))?;
    }
    if let Some(metrics) = config.daemon.metrics {
        writeln!(out, "metrics = {}", quote(&metrics.to_string()))?;
    }
    for (addr, s) in &config.services {
        let h = &s.settings.health;
        writeln!(out)?;
        writeln!(out, "[[service]]")?;
        writeln!(out, "address = {}", quote(&addr.to_string()))?;
        writeln!(out, "scheduler = {}", quote(s.settings.scheduler.name()))?;
        writeln!(out, "forward = {}", quote(s.settings.forward.name()))?;
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
            "lb.toml:3: unknown field `metric`, expected `interface` or `metrics`"
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
            error(&format!("{HEAD}forward = \"nat\"\n")),
            "lb.toml:3: unknown variant `nat`, expected `dsr`"
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
             address family"
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
             forwarding a backend serves the VIP on the service's own port"
        );
        assert_eq!(
            error(&format!(
                "{HEAD}[[service.backend]]\naddress = \"10.0.0.2:8080\"\n"
            )),
            "lb.toml:4: backend 10.0.0.2 port 8080 differs from the service port 80: with dsr \
             forwarding a backend serves the VIP on the service's own port"
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
            },
        );
        c.daemon.interface = None;
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
