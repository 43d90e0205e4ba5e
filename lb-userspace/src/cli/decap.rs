//! `lb decap`: on a backend, strip the IP-in-IP and GUE headers the balancer adds, in XDP, for
//! kernels without the ipip/sit/fou modules. Runs in the foreground until SIGINT/SIGTERM; the
//! program is detached on exit and the counters are printed.

use std::{net::IpAddr, time::Duration};

use anyhow::Context as _;
use clap::Args;
use lb_common::{DEFAULT_GUE_PORT, DecapReason};

use crate::dataplane::{AttachMode, Decap};

/// How often the interface's addresses are read again (an address added later is decapsulated
/// for within this time).
const ADDR_REFRESH: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct DecapArgs {
    /// The interface encapsulated packets arrive on. Packets whose outer destination is one of
    /// its addresses (IPv4 and IPv6, read again every 2 s) are decapsulated.
    #[arg(long)]
    pub iface: String,
    /// XDP attach mode: native (driver), generic (skb; works on any interface) or auto
    /// (native, else generic with a warning).
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: AttachMode,
    /// UDP destination port of GUE packets (the balancer's --gue-port).
    #[arg(long, default_value_t = DEFAULT_GUE_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub gue_port: u16,
    /// Also decapsulate packets addressed to ADDR (for example an address the balancer sends
    /// to that lives on another interface). Repeatable.
    #[arg(long = "addr", value_name = "ADDR")]
    pub addrs: Vec<IpAddr>,
    /// Print the counters on exit as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DecapArgs) -> anyhow::Result<()> {
    let mut decap = Decap::load(args.gue_port).context("loading the decapsulation program")?;
    let mut addrs = local_addrs(args)?;
    decap
        .set_addrs(&addrs)
        .context("writing the local addresses")?;
    let mode = decap
        .attach(&args.iface, args.xdp_mode)
        .with_context(|| format!("attaching the decapsulation program to {}", args.iface))?;
    eprintln!(
        "decap: on {} ({} XDP), IPIP and GUE (UDP port {}) to {}; stop with SIGTERM",
        args.iface,
        match mode {
            AttachMode::Generic => "generic",
            _ => "native",
        },
        args.gue_port,
        list(&addrs)
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(ADDR_REFRESH);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    match local_addrs(args) {
                        Ok(now) if now != addrs => {
                            decap.set_addrs(&now).context("writing the local addresses")?;
                            tracing::info!("decap: local addresses now {}", list(&now));
                            addrs = now;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("decap: reading the addresses: {e:#}"),
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;

    let counts = decap.counts().context("reading the counters")?;
    drop(decap); // detaches
    print!("{}", render(&counts, args.json));
    Ok(())
}

/// The interface's addresses and the extra ones, sorted, without duplicates.
fn local_addrs(args: &DecapArgs) -> anyhow::Result<Vec<IpAddr>> {
    let mut addrs = interface_addrs(&args.iface)
        .with_context(|| format!("reading the addresses of {}", args.iface))?;
    addrs.extend_from_slice(&args.addrs);
    addrs.sort();
    addrs.dedup();
    if addrs.len() > lb_common::DECAP_MAX_ADDRS as usize {
        anyhow::bail!(
            "{} local addresses: at most {} fit the address map",
            addrs.len(),
            lb_common::DECAP_MAX_ADDRS
        );
    }
    Ok(addrs)
}

fn list(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "no address yet".into();
    }
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The IPv4 and IPv6 addresses of `iface`, from getifaddrs(3).
pub fn interface_addrs(iface: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; each sockaddr is read as the
        // type its family names.
        unsafe {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            if std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() != iface.as_bytes() {
                continue;
            }
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
    }
    // SAFETY: frees the list returned above, once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The counters as a table of non-zero reasons (or all of them as JSON).
fn render(counts: &[u64; DecapReason::COUNT as usize], json: bool) -> String {
    if json {
        let map: serde_json::Map<String, serde_json::Value> = DecapReason::ALL
            .iter()
            .zip(counts)
            .map(|((_, name), n)| ((*name).to_string(), (*n).into()))
            .collect();
        return format!("{}\n", serde_json::Value::Object(map));
    }
    let mut out = format!("{:<22} {:>12}\n", "REASON", "PACKETS");
    for ((_, name), n) in DecapReason::ALL.iter().zip(counts) {
        if *n != 0 {
            out.push_str(&format!("{name:<22} {n:>12}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_are_found() {
        let addrs = interface_addrs("lo").unwrap();
        assert!(
            addrs.contains(&IpAddr::from([127, 0, 0, 1])),
            "lo has {addrs:?}"
        );
        assert!(interface_addrs("no-such-if0").unwrap().is_empty());
    }

    #[test]
    fn counters_render_nonzero_rows_and_full_json() {
        let mut counts = [0; DecapReason::COUNT as usize];
        counts[DecapReason::Gue6in4 as usize] = 7;
        let table = render(&counts, false);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.contains("decap_gue_6in4") && table.contains(" 7"));
        let json: serde_json::Value = serde_json::from_str(&render(&counts, true)).unwrap();
        assert_eq!(json["decap_gue_6in4"], 7);
        assert_eq!(json["drop_internal"], 0);
    }
}
