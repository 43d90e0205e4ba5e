//! `lb stats`: packet and byte rates per service and backend, from two status snapshots taken
//! an interval apart; `--watch` repeats until Ctrl-C.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, IsTerminal as _, Write as _},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::Serialize;

use super::client;
use crate::api::{self, BackendState, Health, Status};

/// Clear the screen and put the cursor at the top left (ANSI).
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Refresh in place every interval until Ctrl-C (with --json: one line per sample).
    #[arg(long)]
    pub watch: bool,
    /// One JSON object per sample, one per line.
    #[arg(long)]
    pub json: bool,
    /// Time between the two snapshots a rate is computed from (500ms, 1s, 2s, ...).
    #[arg(long, default_value = "1s", value_parser = api::parse_duration)]
    pub interval: Duration,
}

/// Rates over one interval.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// When the second snapshot was taken, in seconds since the Unix epoch.
    pub unix_time: f64,
    /// Seconds between the two snapshots.
    pub interval_secs: f64,
    pub services: Vec<ServiceRates>,
    /// Packets per second by what the XDP program did with them (`forwarded`, `pass_not_vip`, ...).
    pub packets_per_sec_by_reason: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceRates {
    pub service: String,
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    pub backends: Vec<BackendRates>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRates {
    pub ip: IpAddr,
    pub state: BackendState,
    pub health: Health,
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
}

/// Rates from `prev` to `cur`, `elapsed` apart. Services and backends are those of `cur`; one
/// missing from `prev` was added meanwhile and counted from zero. A counter that went down was
/// reset (its backend deleted and added again): what it counts now all came after the reset.
pub fn rates(prev: &Status, cur: &Status, elapsed: Duration) -> Sample {
    let secs = elapsed.as_secs_f64();
    let per_sec = |before: u64, now: u64| {
        let delta = if now >= before { now - before } else { now };
        if secs > 0.0 { delta as f64 / secs } else { 0.0 }
    };
    let services = cur
        .services
        .iter()
        .map(|s| {
            let old = prev.services.iter().find(|p| p.service == s.service);
            let backends = s
                .backends
                .iter()
                .map(|b| {
                    let old_b = old.and_then(|o| o.backends.iter().find(|p| p.ip == b.ip));
                    BackendRates {
                        ip: b.ip,
                        state: b.state,
                        health: b.health,
                        packets_per_sec: per_sec(old_b.map_or(0, |o| o.packets), b.packets),
                        bytes_per_sec: per_sec(old_b.map_or(0, |o| o.bytes), b.bytes),
                    }
                })
                .collect();
            ServiceRates {
                service: s.service.clone(),
                packets_per_sec: per_sec(old.map_or(0, |o| o.packets), s.packets),
                bytes_per_sec: per_sec(old.map_or(0, |o| o.bytes), s.bytes),
                backends,
            }
        })
        .collect();
    let packets_per_sec_by_reason = cur
        .counters
        .iter()
        .map(|(reason, n)| {
            let before = prev.counters.get(reason).copied().unwrap_or(0);
            (reason.clone(), per_sec(before, *n))
        })
        .collect();
    Sample {
        unix_time: 0.0,
        interval_secs: secs,
        services,
        packets_per_sec_by_reason,
    }
}

/// A sample as a table for people.
pub fn render(sample: &Sample) -> String {
    let mut out = String::new();
    if sample.services.is_empty() {
        out.push_str("no services (add one with `lb service add VIP:PORT/tcp`)\n");
    } else {
        let _ = writeln!(
            out,
            "{:<28} {:<9} {:<8} {:>12} {:>12}",
            "SERVICE / BACKEND", "STATE", "HEALTH", "PACKETS/S", "BYTES/S"
        );
    }
    for s in &sample.services {
        let _ = writeln!(
            out,
            "{:<28} {:<9} {:<8} {:>12} {:>12}",
            s.service,
            "",
            "",
            format!("{:.1}", s.packets_per_sec),
            human_bytes(s.bytes_per_sec)
        );
        for b in &s.backends {
            let (state, health) = (b.state.name(), b.health.name());
            let _ = writeln!(
                out,
                "  {:<26} {:<9} {:<8} {:>12} {:>12}",
                b.ip.to_string(),
                state,
                health,
                format!("{:.1}", b.packets_per_sec),
                human_bytes(b.bytes_per_sec)
            );
        }
    }
    let reasons: Vec<String> = sample
        .packets_per_sec_by_reason
        .iter()
        .filter(|(_, r)| **r > 0.0)
        .map(|(k, r)| format!("{k}={r:.1}"))
        .collect();
    let _ = writeln!(
        out,
        "packets/s by reason: {}",
        if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons.join(" ")
        }
    );
    out
}

/// `1234.0` → `1.2 kB/s` (decimal units, as network rates usually are).
pub fn human_bytes(per_sec: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut v = per_sec;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn run(api: &Path, args: &StatsArgs) -> anyhow::Result<()> {
    match sample_loop(api, args) {
        // `lb stats --watch | head` closing the pipe is how such a pipeline ends, not an error.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn sample_loop(api: &Path, args: &StatsArgs) -> anyhow::Result<()> {
    let clear = args.watch && !args.json && io::stdout().is_terminal();
    let mut prev = client::status(api)?;
    let mut taken = Instant::now();
    let mut next = taken + args.interval;
    let mut first = true;
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += args.interval;
        let cur = client::status(api)?;
        let now = Instant::now();
        let mut sample = rates(&prev, &cur, now - taken);
        sample.unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let text = if args.json {
            let mut line = serde_json::to_string(&sample).context("encoding the sample")?;
            line.push('\n');
            line
        } else if clear {
            format!(
                "{CLEAR_SCREEN}lb stats: every {:?}, Ctrl-C to stop\n\n{}",
                args.interval,
                render(&sample)
            )
        } else if args.watch && !first {
            format!("\n{}", render(&sample))
        } else {
            render(&sample)
        };
        let mut stdout = io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        if !args.watch {
            return Ok(());
        }
        first = false;
        prev = cur;
        taken = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackendStatus, Forward, HealthCheck, Scheduler, ServiceStatus};

    fn status(service_packets: u64, backends: &[(&str, u64, u64)], forwarded: u64) -> Status {
        Status {
            services: vec![ServiceStatus {
                service: "10.0.0.10:80/tcp".into(),
                forward: Forward::Dsr,
                scheduler: Scheduler::Maglev,
                fragments: false,
                health_check: HealthCheck::default(),
                packets: service_packets,
                bytes: service_packets * 100,
                flows: 0,
                backends: backends
                    .iter()
                    .map(|(ip, packets, bytes)| BackendStatus {
                        ip: ip.parse().unwrap(),
                        port: 80,
                        weight: 1,
                        state: BackendState::Active,
                        health: Health::Up,
                        last_error: None,
                        mac: None,
                        in_table: true,
                        active_flows: 0,
                        packets: *packets,
                        bytes: *bytes,
                        flows: 0,
                    })
                    .collect(),
            }],
            counters: BTreeMap::from([("forwarded".into(), forwarded), ("pass_not_vip".into(), 5)]),
        }
    }

    #[test]
    fn rates_are_deltas_over_the_interval() {
        let prev = status(100, &[("10.0.0.2", 60, 6000), ("10.0.0.3", 40, 4000)], 100);
        let cur = status(
            300,
            &[("10.0.0.2", 160, 16000), ("10.0.0.3", 140, 14000)],
            300,
        );
        let s = rates(&prev, &cur, Duration::from_secs(2));
        assert_eq!(s.interval_secs, 2.0);
        let svc = &s.services[0];
        assert_eq!((svc.packets_per_sec, svc.bytes_per_sec), (100.0, 10_000.0));
        let b: Vec<(f64, f64)> = svc
            .backends
            .iter()
            .map(|b| (b.packets_per_sec, b.bytes_per_sec))
            .collect();
        assert_eq!(b, [(50.0, 5000.0), (50.0, 5000.0)]);
        assert_eq!(s.packets_per_sec_by_reason["forwarded"], 100.0);
        assert_eq!(s.packets_per_sec_by_reason["pass_not_vip"], 0.0);
    }

    #[test]
    fn new_and_reset_counters_count_from_zero() {
        // 10.0.0.3 was added during the interval; 10.0.0.2 was deleted and added again (its
        // counter restarted at zero and is now below the old value).
        let prev = status(100, &[("10.0.0.2", 100, 10_000)], 100);
        let cur = status(130, &[("10.0.0.2", 10, 1000), ("10.0.0.3", 20, 2000)], 130);
        let s = rates(&prev, &cur, Duration::from_secs(1));
        let b: Vec<(f64, f64)> = s.services[0]
            .backends
            .iter()
            .map(|b| (b.packets_per_sec, b.bytes_per_sec))
            .collect();
        assert_eq!(b, [(10.0, 1000.0), (20.0, 2000.0)]);
        // A service missing from the first snapshot is new as well.
        let s = rates(&Status::default(), &cur, Duration::from_millis(500));
        assert_eq!(s.services[0].packets_per_sec, 260.0);
    }

    #[test]
    fn a_zero_interval_gives_zero_rates_not_infinity() {
        let prev = status(1, &[], 1);
        let cur = status(2, &[], 2);
        let s = rates(&prev, &cur, Duration::ZERO);
        assert_eq!(s.services[0].packets_per_sec, 0.0);
    }

    #[test]
    fn table_shows_rates_and_only_busy_reasons() {
        let prev = status(100, &[("10.0.0.2", 60, 6000)], 100);
        let cur = status(300, &[("10.0.0.2", 160, 16000)], 300);
        let text = render(&rates(&prev, &cur, Duration::from_secs(2)));
        assert!(text.contains("10.0.0.10:80/tcp"), "{text}");
        assert!(text.contains("100.0"), "{text}");
        assert!(text.contains("10.0 kB/s"), "{text}");
        assert!(text.contains("  10.0.0.2 "), "{text}");
        assert!(text.contains("5.0 kB/s"), "{text}");
        assert!(text.contains("by reason: forwarded=100.0\n"), "{text}");
    }

    #[test]
    fn samples_serialize_as_one_json_line() {
        let prev = status(100, &[("10.0.0.2", 60, 6000)], 100);
        let cur = status(300, &[("10.0.0.2", 160, 16000)], 300);
        let line = serde_json::to_string(&rates(&prev, &cur, Duration::from_secs(2))).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["services"][0]["packets_per_sec"], 100.0);
        assert_eq!(v["services"][0]["backends"][0]["ip"], "10.0.0.2");
        assert_eq!(v["services"][0]["backends"][0]["state"], "active");
        assert_eq!(v["packets_per_sec_by_reason"]["forwarded"], 100.0);
    }

    #[test]
    fn byte_rates_use_decimal_units() {
        assert_eq!(human_bytes(0.0), "0 B/s");
        assert_eq!(human_bytes(999.0), "999 B/s");
        assert_eq!(human_bytes(1234.0), "1.2 kB/s");
        assert_eq!(human_bytes(5_600_000.0), "5.6 MB/s");
        assert_eq!(human_bytes(2e15), "2000.0 TB/s");
    }
}
