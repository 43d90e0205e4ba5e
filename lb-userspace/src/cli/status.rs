//! `lb status` as a table for people.

use std::fmt::Write as _;

use crate::api::{ServiceAddr, Status};

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    if status.services.is_empty() {
        out.push_str("no services (add one with `lb service add VIP:PORT/tcp`)\n");
    }
    for s in &status.services {
        let hc = &s.health_check;
        let _ = writeln!(
            out,
            "{}  forward={}{} scheduler={} packets={} bytes={}  check: {} every {:?}, timeout {:?}, rise {}, fall {}",
            s.service,
            s.forward.name(),
            if s.fragments { " fragments" } else { "" },
            s.scheduler.name(),
            s.packets,
            s.bytes,
            hc.kind,
            hc.interval,
            hc.timeout,
            hc.rise,
            hc.fall
        );
        if s.backends.is_empty() {
            out.push_str("  (no backends)\n");
            continue;
        }
        let service_port = s.service.parse::<ServiceAddr>().map(|a| a.port).ok();
        out.push_str(&format!(
            "  {:<16} {:>6}  {:<9} {:<8} {:<18} {:>10} {:>12}  LAST ERROR\n",
            "BACKEND", "WEIGHT", "STATE", "HEALTH", "MAC", "PACKETS", "BYTES"
        ));
        for b in &s.backends {
            let (state, health) = (b.state.name(), b.health.name());
            let _ = writeln!(
                out,
                "  {:<16} {:>6}  {:<9} {:<8} {:<18} {:>10} {:>12}  {}",
                // A mapped port (nat, fullnat) is shown with the address.
                if b.port != 0 && Some(b.port) != service_port {
                    std::net::SocketAddr::new(b.ip, b.port).to_string()
                } else {
                    b.ip.to_string()
                },
                b.weight,
                state,
                health,
                b.mac.as_deref().unwrap_or("-"),
                b.packets,
                b.bytes,
                b.last_error.as_deref().unwrap_or("")
            );
        }
    }
    let counters: Vec<String> = status
        .counters
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    let _ = writeln!(
        out,
        "packets: {}",
        if counters.is_empty() {
            "none yet".to_string()
        } else {
            counters.join(" ")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        BackendState, BackendStatus, Forward, Health, HealthCheck, Scheduler, ServiceStatus,
    };

    #[test]
    fn each_service_shows_its_mode_and_mapped_ports() {
        let backend = |ip: &str, port| BackendStatus {
            ip: ip.parse().unwrap(),
            port,
            weight: 1,
            state: BackendState::Active,
            health: Health::Up,
            last_error: None,
            mac: None,
            in_table: true,
            active_flows: 0,
            packets: 0,
            bytes: 0,
            flows: 0,
        };
        let service = |addr: &str, forward, fragments, backends| ServiceStatus {
            service: addr.into(),
            forward,
            scheduler: Scheduler::SourceHash,
            fragments,
            health_check: HealthCheck::default(),
            packets: 0,
            bytes: 0,
            flows: 0,
            backends,
        };
        let status = Status {
            services: vec![
                service(
                    "10.0.0.10:80/tcp",
                    Forward::Nat,
                    false,
                    vec![backend("10.0.1.2", 8080), backend("10.0.1.3", 80)],
                ),
                service(
                    "[2001:db8::10]:53/udp",
                    Forward::Gue,
                    true,
                    vec![backend("10.0.1.4", 53)],
                ),
            ],
            counters: Default::default(),
        };
        let text = render(&status);
        assert!(
            text.contains("10.0.0.10:80/tcp  forward=nat scheduler="),
            "{text}"
        );
        assert!(text.contains("forward=gue fragments scheduler="), "{text}");
        assert!(text.contains("  10.0.1.2:8080 "), "{text}");
        assert!(text.contains("  10.0.1.3   "), "{text}");
        assert!(!text.contains("10.0.1.4:53"), "{text}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["services"][0]["forward"], "nat");
        assert_eq!(json["services"][0]["backends"][0]["port"], 8080);
        assert_eq!(json["services"][1]["forward"], "gue");
        assert_eq!(json["services"][1]["fragments"], true);
    }
}
