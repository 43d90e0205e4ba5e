//! Routes for health checks addressed to VIPs (`--hc-target vip`). The balancer's kernel must
//! send a probe to VIP:port out of the balancer's interface, though the VIP is not its own and
//! may be on no subnet it knows: a /32 route to the VIP on that interface, and a permanent
//! neighbour entry with an unused MAC so the kernel never asks the segment for the VIP (the
//! backends hold it and would answer). The tc egress program then puts the chosen backend's MAC
//! in every marked probe; a probe it does not steer goes to the unused MAC and fails.

use std::{net::IpAddr, process::Command};

/// A locally administered MAC that no host uses.
const UNUSED_MAC: &str = "02:00:00:00:00:00";

pub fn add(iface: &str, vip: IpAddr) -> Result<(), String> {
    let prefix = if vip.is_ipv4() { 32 } else { 128 };
    ip(&["route", "replace", &format!("{vip}/{prefix}"), "dev", iface])?;
    ip(&[
        "neigh",
        "replace",
        &vip.to_string(),
        "lladdr",
        UNUSED_MAC,
        "dev",
        iface,
        "nud",
        "permanent",
    ])
}

pub fn remove(iface: &str, vip: IpAddr) -> Result<(), String> {
    let prefix = if vip.is_ipv4() { 32 } else { 128 };
    let neigh = ip(&["neigh", "del", &vip.to_string(), "dev", iface]);
    ip(&["route", "del", &format!("{vip}/{prefix}"), "dev", iface]).and(neigh)
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
