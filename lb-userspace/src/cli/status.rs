//! `lb status` as a table for people.

use std::fmt::Write as _;

use crate::api::Status;

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    if status.services.is_empty() {
        out.push_str("no services (add one with `lb service add VIP:PORT/tcp`)\n");
    }
    for s in &status.services {
        let hc = &s.health_check;
        let _ = writeln!(
            out,
            "{}  forward={} scheduler={} packets={} bytes={}  check: {} every {:?}, timeout {:?}, rise {}, fall {}",
            s.service,
            s.forward.name(),
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
        out.push_str(&format!(
            "  {:<16} {:>6}  {:<9} {:<8} {:<18} {:>10} {:>12}  LAST ERROR\n",
            "BACKEND", "WEIGHT", "STATE", "HEALTH", "MAC", "PACKETS", "BYTES"
        ));
        for b in &s.backends {
            let (state, health) = (b.state.name(), b.health.name());
            let _ = writeln!(
                out,
                "  {:<16} {:>6}  {:<9} {:<8} {:<18} {:>10} {:>12}  {}",
                b.ip.to_string(),
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
