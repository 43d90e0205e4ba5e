//! Hosts the benchmark adds to the test bed's bridge next to the balancer: the kernel's NAT
//! (the alternative users would pick), and two floors: a minimal XDP forwarder (for any XDP_TX
//! forwarder on this test bed) and plain kernel IP forwarding (for anything the kernel's stack
//! forwards, NAT included).
//!
//! Each is its own namespace rather than the balancer's, so no path carries another's
//! machinery: the NAT host has no XDP program on its interface or its bridge port (an XDP
//! program on a veth peer puts every skb sent to it through the XDP path), and neither runs
//! the daemon or health checks.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::common::{Testbed, netns};

/// A host namespace `lbt<pid>x<n>-<role>` with `eth0` plugged into the test bed's bridge
/// through `port`. Removed on drop, also when the benchmark panics; named like the test bed's
/// namespaces so a killed run's leftovers are swept by the next run.
pub struct Host {
    pub ns: String,
    /// Its port on the bridge (in the test bed's switch namespace).
    pub port: String,
}

impl Host {
    pub fn add(tb: &Testbed, role: &str, ip: Ipv4Addr) -> Host {
        let ns = format!("{}-{role}", tb.id);
        netns::netns_add(&ns);
        // Owned from here on: if a step below panics, drop removes the namespace.
        let host = Host {
            ns,
            port: format!("p{role}"),
        };
        let ns = host.ns.as_str();
        netns::sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1");
        netns::sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1");
        netns::ip(&["-n", ns, "link", "set", "lo", "up"]);
        netns::ip(&[
            "-n", &tb.sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0",
            "netns", ns,
        ]);
        netns::ip(&[
            "-n", &tb.sw, "link", "set", &host.port, "master", "br0", "up",
        ]);
        netns::ip(&["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        netns::ip(&["-n", ns, "link", "set", "eth0", "up"]);
        host
    }

    /// A plain IPv4 router: forwards `vip` over `backends` (address, MAC) by a multipath route
    /// hashing the 5-tuple, as a balancer spreads flows; no netfilter rules, so no conntrack
    /// either.
    pub fn router(
        tb: &Testbed,
        ip: Ipv4Addr,
        vip: Ipv4Addr,
        backends: &[(Ipv4Addr, String)],
    ) -> Host {
        let host = Host::add(tb, "kfwd", ip);
        host.forwarding(backends);
        netns::sysctl(&host.ns, "net.ipv4.fib_multipath_hash_policy", "1");
        let mut route = vec![
            "-n".to_owned(),
            host.ns.clone(),
            "route".to_owned(),
            "add".to_owned(),
            format!("{vip}/32"),
        ];
        for (addr, _) in backends {
            route.extend(["nexthop".to_owned(), "via".to_owned(), addr.to_string()]);
        }
        netns::ip(&route.iter().map(String::as_str).collect::<Vec<_>>());
        host
    }

    /// IPv4 forwarding on, and permanent neighbour entries for `neighbours` (address, MAC), so
    /// no packet waits for ARP.
    fn forwarding(&self, neighbours: &[(Ipv4Addr, String)]) {
        let ns = self.ns.as_str();
        netns::sysctl(ns, "net.ipv4.ip_forward", "1");
        // Packets leave through the interface they came in on: no ICMP redirect for each.
        netns::sysctl(ns, "net.ipv4.conf.all.send_redirects", "0");
        netns::sysctl(ns, "net.ipv4.conf.eth0.send_redirects", "0");
        self.neighbours(neighbours);
    }

    /// Permanent neighbour entries (address, MAC) on eth0.
    pub fn neighbours(&self, neighbours: &[(Ipv4Addr, String)]) {
        let ns = self.ns.as_str();
        for (addr, mac) in neighbours {
            netns::ip(&[
                "-n",
                ns,
                "neigh",
                "replace",
                &addr.to_string(),
                "lladdr",
                mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
        }
    }

    /// A NAT host: nftables DNAT of `vip:port/udp`, and of `http` (address, port) over TCP, to
    /// `backends` (same port), the way kube-proxy's nftables mode does it (a random endpoint
    /// for each new connection; conntrack keeps the rest of the flow on it), and IPv4
    /// forwarding. `backends` are (address, MAC). The backends' answers to a TCP client must
    /// be routed back through this host, which undoes the DNAT.
    pub fn nat(
        tb: &Testbed,
        ip: Ipv4Addr,
        vip: Ipv4Addr,
        port: u16,
        http: (Ipv4Addr, u16),
        backends: &[(Ipv4Addr, String)],
    ) -> Host {
        let host = Host::add(tb, "nat", ip);
        host.forwarding(backends);
        let ns = host.ns.as_str();
        let map: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, (addr, _))| format!("{i} : {addr}"))
            .collect();
        let (http_addr, http_port) = http;
        let rules = format!(
            "table ip lbbench {{\n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tip daddr {vip} udp dport {port} dnat to numgen random mod {n} map {{ {map} }}\n\
             \t\tip daddr {http_addr} tcp dport {http_port} dnat to numgen random mod {n} map {{ {map} }}\n\
             \t}}\n\
             }}\n",
            n = backends.len(),
            map = map.join(", ")
        );
        let file = tb.dir.join("nat.nft");
        std::fs::write(&file, &rules).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        netns::must(
            Command::new("ip")
                .args(["netns", "exec", ns, "nft", "-f"])
                .arg(&file),
        );
        host
    }

    /// Connection-tracking entries in this host's namespace.
    pub fn conntrack_count(&self) -> Option<u64> {
        self.sysctl("nf_conntrack_count")
    }

    /// The most entries conntrack takes (the kernel's setting for every namespace).
    pub fn conntrack_max(&self) -> Option<u64> {
        self.sysctl("nf_conntrack_max")
    }

    fn sysctl(&self, name: &str) -> Option<u64> {
        let path = format!("/proc/sys/net/netfilter/{name}");
        netns::run_in(&self.ns, || std::fs::read_to_string(&path).ok())
            .ok()
            .flatten()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // The bridge port goes with it: deleting one end of a veth pair deletes both.
        netns::netns_del(&self.ns);
    }
}
