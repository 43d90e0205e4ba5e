//! Backend MACs from the kernel's IPv4 neighbour table (`/proc/net/arp`). The daemon's health
//! probes connect to each backend, which makes the kernel resolve it; we only read the result.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

/// `ATF_COM`: the entry is complete (the MAC is known).
const ATF_COM: u32 = 0x2;

/// Known MACs of IPv4 and IPv6 neighbours on `iface`, in the calling thread's namespace.
pub fn table(iface: &str) -> std::io::Result<HashMap<IpAddr, [u8; 6]>> {
    let mut out: HashMap<IpAddr, [u8; 6]> = arp_table(iface)?
        .into_iter()
        .map(|(ip, mac)| (IpAddr::V4(ip), mac))
        .collect();
    out.extend(ndp_table(iface)?);
    Ok(out)
}

/// The known MAC of neighbour `ip` on `iface`: only the table of its family is read (the IPv6
/// one costs a process).
pub fn lookup(iface: &str, ip: IpAddr) -> std::io::Result<Option<[u8; 6]>> {
    Ok(match ip {
        IpAddr::V4(v4) => arp_table(iface)?.get(&v4).copied(),
        IpAddr::V6(_) => ndp_table(iface)?.get(&ip).copied(),
    })
}

/// IPv6 neighbours (NDP) on `iface`: /proc has no such table, so `ip -6 neigh` is asked.
/// A command forked from this thread runs in this thread's network namespace.
pub fn ndp_table(iface: &str) -> std::io::Result<HashMap<IpAddr, [u8; 6]>> {
    let out = std::process::Command::new("ip")
        .args(["-6", "neigh", "show", "dev", iface])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "ip -6 neigh show dev {iface}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_ndp(&String::from_utf8_lossy(&out.stdout)))
}

/// Lines like `fd00::11 lladdr 02:00:00:00:00:11 REACHABLE`; entries without a MAC (FAILED,
/// INCOMPLETE) are skipped.
fn parse_ndp(text: &str) -> HashMap<IpAddr, [u8; 6]> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            let mut words = words.skip_while(|w| *w != "lladdr");
            words.next()?;
            Some((ip, parse_mac(words.next()?)?))
        })
        .collect()
}

/// Complete entries of the ARP table on `iface`, in the calling thread's network namespace
/// (`/proc/net` follows the process's first thread, `/proc/thread-self/net` this one).
pub fn arp_table(iface: &str) -> std::io::Result<HashMap<Ipv4Addr, [u8; 6]>> {
    Ok(parse_arp(
        &std::fs::read_to_string("/proc/thread-self/net/arp")?,
        iface,
    ))
}

fn parse_arp(text: &str, iface: &str) -> HashMap<Ipv4Addr, [u8; 6]> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [ip, _hw_type, flags, mac, _mask, dev] = f.as_slice() else {
                return None;
            };
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            if *dev != iface || flags & ATF_COM == 0 {
                return None;
            }
            Some((ip.parse().ok()?, parse_mac(mac)?))
        })
        .collect()
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
10.99.0.11       0x1         0x2         aa:bb:cc:dd:ee:01     *        eth0
10.99.0.12       0x1         0x0         00:00:00:00:00:00     *        eth0
10.99.0.13       0x1         0x2         aa:bb:cc:dd:ee:03     *        eth1
";

    #[test]
    fn only_complete_entries_on_the_interface_are_read() {
        let t = parse_arp(SAMPLE, "eth0");
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[&"10.99.0.11".parse().unwrap()],
            [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01]
        );
    }

    #[test]
    fn ndp_entries_with_a_mac_are_read() {
        let t = parse_ndp(
            "fd00:99::11 lladdr 02:00:00:00:00:11 REACHABLE\n\
             fd00:99::12 FAILED\n\
             fe80::1 lladdr 02:00:00:00:00:01 router STALE\n",
        );
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[&"fd00:99::11".parse::<IpAddr>().unwrap()],
            [2, 0, 0, 0, 0, 0x11]
        );
    }

    #[test]
    fn macs_round_trip_and_bad_ones_are_rejected() {
        let mac = parse_mac("0a:1b:2c:3d:4e:5f").unwrap();
        assert_eq!(format_mac(&mac), "0a:1b:2c:3d:4e:5f");
        assert!(parse_mac("0a:1b:2c:3d:4e").is_none());
        assert!(parse_mac("0a:1b:2c:3d:4e:5f:60").is_none());
        assert!(parse_mac("zz:1b:2c:3d:4e:5f").is_none());
    }
}
