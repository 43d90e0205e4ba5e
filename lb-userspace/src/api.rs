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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(with = "millis")]
    pub interval: Duration,
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that take it down.
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 2,
        }
    }
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
}

impl Scheduler {
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Forward {
    /// L2 direct server return: rewrite MACs; backends hold the VIP and answer clients directly.
    Dsr,
}

impl Forward {
    pub fn name(self) -> &'static str {
        match self {
            Forward::Dsr => "dsr",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    ServiceAdd {
        service: ServiceAddr,
        scheduler: Scheduler,
        forward: Forward,
        health: HealthCheck,
    },
    ServiceDel {
        service: ServiceAddr,
    },
    BackendAdd {
        service: ServiceAddr,
        ip: IpAddr,
        weight: u32,
    },
    BackendDel {
        service: ServiceAddr,
        ip: IpAddr,
    },
    BackendDrain {
        service: ServiceAddr,
        ip: IpAddr,
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
    pub health_check: HealthCheck,
    pub packets: u64,
    pub bytes: u64,
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
    /// Drained: keeps its established flows, gets no new ones.
    Draining,
    /// Not usable yet or any more (health down or unknown, or MAC not resolved).
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub ip: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    pub health: Health,
    /// The last health-check failure, if the last probe failed.
    pub last_error: Option<String>,
    pub mac: Option<String>,
    pub in_table: bool,
    pub packets: u64,
    pub bytes: u64,
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
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""op":"backend-add""#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), r);
    }
}
