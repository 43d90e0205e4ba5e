//! The routed forwarding modes (ipip, gue), "too big" answers, ICMP errors forwarded to a
//! flow's backend, and fragments, run by the kernel with `BPF_PROG_TEST_RUN`.
//!
//! The program asks the kernel's FIB for the next hop (`bpf_fib_lookup`), so each test builds a
//! real one: a namespace with a veth (forwarding on), routes to the backends' networks through
//! a next hop with a PERMANENT neighbour entry (resolved), through one with none (unresolved),
//! and through the resolved one with a small MTU. The test thread joins the namespace and runs
//! the program with an `xdp_md` context whose ingress interface is that veth. Every output byte
//! the program writes is checked, and every checksum recomputed. Needs root.

mod common;
mod packet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};

use common::netns;
use lb_common::{
    AF_INET, AF_INET6, BACKEND_F_ALIVE, Backend, DataplaneConfig, FORWARD_DSR, FORWARD_GUE,
    FORWARD_IPIP, FORWARD_NAT, FlowKeyV4, PROTO_IPIP, PROTO_IPV6, RING_SIZE, Reason, SCHED_MAGLEV,
    SCHED_SOURCE_HASH, SERVICE_F_FRAGMENTS, Service,
    hash::{flow_hash_v4, flow_hash_v6, gue_source_port, source_hash},
    names,
};
use lb_userspace::{
    daemon::ipv6_words,
    dataplane::{Dataplane, ServiceKey},
};
use packet::{CLIENT_MAC, Frame, Frame6, LB_MAC, checksum, icmp4, icmp6, icmp6_checksum};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

/// The balancer's side of the veth and the next hops on it.
const LB4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const HOP4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const HOP4_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
const HOP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
const HOP6_UNRESOLVED: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 3);
/// The MAC of the resolved next hop (its permanent neighbour entry).
const HOP_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];

/// Backends: one network per route kind.
const BE4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 11);
const BE4_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 11);
const BE4_SMALL_MTU: Ipv4Addr = Ipv4Addr::new(10, 4, 0, 11);
const BE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11);
const BE6_UNRESOLVED: Ipv6Addr = Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 0x11);
const BE6_SMALL_MTU: Ipv6Addr = Ipv6Addr::new(0xfd00, 4, 0, 0, 0, 0, 0, 0x11);
/// The MTU of the routes to the `*_SMALL_MTU` backends.
const MTU4: usize = 1000;
const MTU6: usize = 1280;

/// Encapsulation sources and the number of low bits taken from the flow hash.
const SRC4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 0);
const SRC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 0);
const HASH_BITS: u8 = 8;
const GUE_PORT: u16 = 6080;

/// A namespace holding the FIB the program consults; removed on drop, even when a test fails.
struct Bed {
    ns: String,
}

impl Bed {
    fn new() -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "BPF_PROG_TEST_RUN tests need root (run them through the README test command)"
        );
        netns::sweep_stale();
        // Numbered from 700 so they never meet the other test files' names.
        static NEXT: AtomicU32 = AtomicU32::new(700);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let bed = Bed {
            ns: format!("{}{}x{n}-encap", netns::NS_PREFIX, std::process::id()),
        };
        netns::netns_add(&bed.ns);
        let ns = bed.ns.clone();
        let ip = |args: &str| {
            let mut all = vec!["-n", ns.as_str()];
            all.extend(args.split_whitespace());
            netns::ip(&all);
        };
        let lb_mac = mac_str(&LB_MAC);
        ip(&format!(
            "link add lbe0 address {lb_mac} type veth peer name lbe1"
        ));
        ip("link set lbe0 up");
        ip("link set lbe1 up");
        netns::sysctl(&ns, "net.ipv4.ip_forward", "1");
        netns::sysctl(&ns, "net.ipv6.conf.all.forwarding", "1");
        ip(&format!("addr add {LB4}/24 dev lbe0"));
        ip(&format!("addr add {LB6}/64 dev lbe0 nodad"));
        let hop_mac = mac_str(&HOP_MAC);
        ip(&format!(
            "neigh add {HOP4} lladdr {hop_mac} nud permanent dev lbe0"
        ));
        ip(&format!(
            "neigh add {HOP6} lladdr {hop_mac} nud permanent dev lbe0"
        ));
        ip(&format!("route add 10.2.0.0/24 via {HOP4} dev lbe0"));
        ip(&format!(
            "route add 10.3.0.0/24 via {HOP4_UNRESOLVED} dev lbe0"
        ));
        // Locked: bpf_fib_lookup reports a route's MTU only when it is locked (for IPv4 also
        // with net.ipv4.ip_forward_use_pmtu); unlocked, it gives the device's.
        ip(&format!(
            "route add 10.4.0.0/24 via {HOP4} dev lbe0 mtu lock {MTU4}"
        ));
        ip(&format!("-6 route add fd00:2::/64 via {HOP6} dev lbe0"));
        ip(&format!(
            "-6 route add fd00:3::/64 via {HOP6_UNRESOLVED} dev lbe0"
        ));
        ip(&format!(
            "-6 route add fd00:4::/64 via {HOP6} dev lbe0 mtu lock {MTU6}"
        ));
        bed
    }

    /// Runs `f` on a thread inside the namespace with a freshly loaded balancer whose `CONFIG`
    /// is set; a panic in `f` fails the test with its own message.
    fn run(&self, f: impl FnOnce(&mut Lb) + Send) {
        std::thread::scope(|scope| {
            let joined = scope
                .spawn(|| {
                    netns::enter(&self.ns).expect("joining the test namespace");
                    let mut lb = Lb::new();
                    f(&mut lb);
                })
                .join();
            if let Err(panic) = joined {
                std::panic::resume_unwind(panic);
            }
        });
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        netns::netns_del(&self.ns);
    }
}

fn mac_str(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A loaded balancer (in the namespace) and helpers to configure it as the daemon would.
struct Lb {
    dp: Dataplane,
    ifindex: u32,
}

impl Lb {
    fn new() -> Self {
        let mut dp = packet::small_dataplane();
        dp.program(names::PROG_BALANCER)
            .expect("verifier accepts the balancer");
        dp.set_config(&DataplaneConfig {
            encap_src4: u32::from_ne_bytes(SRC4.octets()),
            encap_src6: ipv6_words(&SRC6),
            encap_src_hash_bits: HASH_BITS,
            gue_port: GUE_PORT.to_be(),
            ..DataplaneConfig::default()
        })
        .unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c"lbe0".as_ptr()) };
        assert_ne!(ifindex, 0, "lbe0 in the test namespace");
        Lb { dp, ifindex }
    }

    fn backend(&mut self, id: u32, addr: std::net::IpAddr) {
        let (bytes, family) = match addr {
            std::net::IpAddr::V4(a) => {
                let mut b = [0; 16];
                b[..4].copy_from_slice(&a.octets());
                (b, AF_INET)
            }
            std::net::IpAddr::V6(a) => (a.octets(), AF_INET6),
        };
        let (forward, service) = packet::owner_of(&self.dp, id);
        self.dp
            .set_backend(
                id,
                Backend {
                    addr: bytes,
                    mac: [0x02, 0xbe, 0, 0, 0, id as u8 + 1],
                    port: 80u16.to_be(),
                    generation: 1,
                    flags: BACKEND_F_ALIVE,
                    family,
                    forward,
                    _pad: 0,
                    service,
                },
            )
            .unwrap();
    }

    /// Service `id` under `key` with ring table `id` filled round-robin with `ids`.
    fn service(
        &mut self,
        key: ServiceKey,
        id: u32,
        ids: &[u32],
        forward: u8,
        sched: u8,
        flags: u8,
    ) {
        let table: Vec<u32> = (0..RING_SIZE as usize)
            .map(|i| ids[i % ids.len()])
            .collect();
        self.dp.write_ring(id, &table).unwrap();
        let service = Service {
            id,
            ring: id,
            forward,
            scheduler: sched,
            flags,
            _pad: 0,
        };
        packet::own_backends(&mut self.dp, ids, id, forward);
        self.dp.set_service(key, service).unwrap();
    }

    /// A Maglev service on VIP:80/tcp (id 0) or VIP6:80/tcp (id 1) sending to `backend` by
    /// `forward`.
    fn simple(&mut self, v6: bool, forward: u8, backend: u32) {
        let id = u32::from(v6);
        self.service(key(v6, 80, 6), id, &[backend], forward, SCHED_MAGLEV, 0);
    }

    /// Runs `frame` once through the program as received on lbe0.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        packet::run_on(&mut self.dp, self.ifindex, frame)
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.dp.reason_counts().unwrap()[reason as usize]
    }

    /// Runs `frame` and checks the verdict and that exactly one packet was counted as `reason`.
    fn expect(&mut self, frame: &[u8], verdict: u32, reason: Reason) -> Vec<u8> {
        let before = self.reason(reason);
        let (got, out) = self.run(frame);
        assert_eq!(
            got,
            verdict,
            "verdict (reasons: {:?})",
            self.dp.reason_counts()
        );
        assert_eq!(self.reason(reason), before + 1, "counted as {reason:?}");
        out
    }
}

fn key(v6: bool, port: u16, proto: u8) -> ServiceKey {
    let vip = if v6 {
        IpAddr::V6(VIP6)
    } else {
        IpAddr::V4(VIP)
    };
    ServiceKey::new(vip, port, proto)
}

fn hash4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> u32 {
    flow_hash_v4(
        u32::from_ne_bytes(src.octets()),
        u32::from_ne_bytes(dst.octets()),
        sport.to_be(),
        dport.to_be(),
        proto,
    )
}

fn hash6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, proto: u8) -> u32 {
    flow_hash_v6(
        &ipv6_words(&src),
        &ipv6_words(&dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    )
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What the outer headers must say.
struct Outer {
    /// Destination MAC (the next hop's, or ours when passed to the kernel).
    dmac: [u8; 6],
    backend: std::net::IpAddr,
    /// Protocol / next header of the outer IP header.
    proto: u8,
    /// TOS / traffic class of the inner packet.
    tos: u8,
    hash: u32,
    gue: bool,
}

/// Checks every byte of an encapsulated frame: Ethernet, outer IP (checksum recomputed), GUE's
/// UDP header, and the inner packet unchanged. Returns the outer source address's last octet
/// and the GUE source port (0 for ipip).
fn check_encap(out: &[u8], inner: &[u8], o: &Outer) -> (u8, u16) {
    assert_eq!(&out[0..6], &o.dmac, "destination MAC");
    assert_eq!(&out[6..12], &LB_MAC, "source MAC is lbe0's");
    let outer_v6 = o.backend.is_ipv6();
    let udp_len = if o.gue { 8 } else { 0 };
    let ip_len = if outer_v6 { 40 } else { 20 };
    assert_eq!(
        out.len(),
        14 + ip_len + udp_len + inner.len(),
        "frame length"
    );
    let ip = &out[14..];
    let last;
    if outer_v6 {
        assert_eq!(be16(out, 12), 0x86dd, "ethertype");
        let vtc = u32::from_be_bytes(ip[0..4].try_into().unwrap());
        assert_eq!(vtc >> 28, 6, "version");
        assert_eq!((vtc >> 20) as u8, o.tos, "traffic class copied");
        assert_eq!(vtc & 0xfffff, o.hash & 0xfffff, "flow label from the hash");
        assert_eq!(
            be16(ip, 4) as usize,
            udp_len + inner.len(),
            "payload length"
        );
        assert_eq!(ip[6], o.proto, "next header");
        assert_eq!(ip[7], 64, "hop limit");
        let src = SRC6.octets();
        assert_eq!(&ip[8..23], &src[..15], "outer source prefix from CONFIG");
        last = ip[23];
        let std::net::IpAddr::V6(be) = o.backend else {
            unreachable!()
        };
        assert_eq!(&ip[24..40], &be.octets(), "outer destination");
    } else {
        assert_eq!(be16(out, 12), 0x0800, "ethertype");
        assert_eq!(ip[0], 0x45, "version and IHL");
        assert_eq!(ip[1], o.tos, "TOS copied");
        assert_eq!(
            be16(ip, 2) as usize,
            20 + udp_len + inner.len(),
            "total length"
        );
        assert_eq!(be16(ip, 4), 0, "id");
        assert_eq!(be16(ip, 6), 0x4000, "DF set, not a fragment");
        assert_eq!(ip[8], 64, "TTL");
        assert_eq!(ip[9], o.proto, "protocol");
        assert_eq!(checksum(&ip[..20]), 0, "outer IPv4 header checksum");
        assert_eq!(
            &ip[12..15],
            &SRC4.octets()[..3],
            "outer source prefix from CONFIG"
        );
        last = ip[15];
        let std::net::IpAddr::V4(be) = o.backend else {
            unreachable!()
        };
        assert_eq!(&ip[16..20], &be.octets(), "outer destination");
    }
    assert_eq!(
        last, o.hash as u8,
        "low {HASH_BITS} source bits from the flow hash"
    );
    let mut sport = 0;
    if o.gue {
        let udp = &ip[ip_len..];
        sport = be16(udp, 0);
        assert_eq!(
            sport,
            gue_source_port(o.hash),
            "GUE source port from the hash"
        );
        assert!(sport >= 0xc000, "GUE source port in the dynamic range");
        assert_eq!(be16(udp, 2), GUE_PORT, "GUE destination port");
        assert_eq!(be16(udp, 4) as usize, 8 + inner.len(), "UDP length");
        assert_eq!(be16(udp, 6), 0, "UDP checksum 0");
    }
    assert_eq!(&ip[ip_len + udp_len..], inner, "inner packet unchanged");
    (last, sport)
}

/// One encapsulation case: a VIP family, a backend, a mode; two flows through it.
fn encap_case(v6_vip: bool, backend: std::net::IpAddr, forward: u8) {
    let bed = Bed::new();
    bed.run(|lb| {
        lb.backend(3, backend);
        lb.simple(v6_vip, forward, 3);
        let gue = forward == FORWARD_GUE;
        let proto = if gue {
            17
        } else if v6_vip {
            PROTO_IPV6
        } else {
            PROTO_IPIP
        };
        let mut seen = Vec::new();
        for sport in [40000u16, 40001] {
            // The flow's SYN, then an ACK of it.
            let (frame, next, hash) = if v6_vip {
                let f = Frame6::tcp(CLIENT6, sport, VIP6, 80).traffic_class(0xb8);
                let hash = hash6(CLIENT6, sport, VIP6, 80, 6);
                (f.clone().build(), f.tcp_flags(0x10).build(), hash)
            } else {
                let f = Frame::tcp(CLIENT, sport, VIP, 80).tos(0xb8);
                let hash = hash4(CLIENT, sport, VIP, 80, 6);
                (f.clone().build(), f.tcp_flags(0x10).build(), hash)
            };
            let o = Outer {
                dmac: HOP_MAC,
                backend,
                proto,
                tos: 0xb8,
                hash,
                gue,
            };
            let out = lb.expect(&frame, XDP_TX, Reason::Forwarded);
            let first = check_encap(&out, &frame[14..], &o);
            // The flow's next packet (now from the connection table): the same outer fields.
            let out = lb.expect(&next, XDP_TX, Reason::Forwarded);
            assert_eq!(
                check_encap(&out, &next[14..], &o),
                first,
                "same flow, same fields"
            );
            seen.push(first);
        }
        assert_ne!(
            seen[0], seen[1],
            "two flows get different hash bits / GUE ports"
        );
        let t = lb.dp.backend_traffic(3).unwrap();
        assert_eq!((t.packets, t.flows), (4, 2));
    });
}

#[test]
fn ipip_4in4_carries_the_packet_to_the_next_hop() {
    encap_case(false, BE4.into(), FORWARD_IPIP);
}

#[test]
fn ipip_6in6_carries_the_packet_to_the_next_hop() {
    encap_case(true, BE6.into(), FORWARD_IPIP);
}

#[test]
fn ipip_4in6_uses_the_backends_family_outside() {
    encap_case(false, BE6.into(), FORWARD_IPIP);
}

#[test]
fn ipip_6in4_uses_protocol_41() {
    encap_case(true, BE4.into(), FORWARD_IPIP);
}

#[test]
fn gue_v4_puts_the_packet_in_udp_with_ports_from_the_flow() {
    encap_case(false, BE4.into(), FORWARD_GUE);
}

#[test]
fn gue_v6_puts_the_packet_in_udp_with_ports_from_the_flow() {
    encap_case(true, BE6.into(), FORWARD_GUE);
}

#[test]
fn gue_mixed_families_work_both_ways() {
    encap_case(false, BE6.into(), FORWARD_GUE);
    encap_case(true, BE4.into(), FORWARD_GUE);
}

#[test]
fn a_vlan_tag_is_not_carried_into_the_routed_packet() {
    let bed = Bed::new();
    bed.run(|lb| {
        lb.backend(0, BE4.into());
        lb.simple(false, FORWARD_IPIP, 0);
        let frame = Frame::tcp(CLIENT, 1234, VIP, 80).vlan(42).build();
        let out = lb.expect(&frame, XDP_TX, Reason::Forwarded);
        let o = Outer {
            dmac: HOP_MAC,
            backend: BE4.into(),
            proto: PROTO_IPIP,
            tos: 0,
            hash: hash4(CLIENT, 1234, VIP, 80, 6),
            gue: false,
        };
        check_encap(&out, &frame[18..], &o);
    });
}

#[test]
fn an_unresolved_next_hop_passes_the_encapsulated_packet_to_the_kernel() {
    let bed = Bed::new();
    bed.run(|lb| {
        lb.backend(0, BE4_UNRESOLVED.into());
        lb.backend(1, BE6_UNRESOLVED.into());
        lb.simple(false, FORWARD_IPIP, 0);
        lb.simple(true, FORWARD_GUE, 1);
        let frame = Frame::tcp(CLIENT, 1, VIP, 80).build();
        let out = lb.expect(&frame, XDP_PASS, Reason::PassToKernel);
        let o = Outer {
            dmac: LB_MAC,
            backend: BE4_UNRESOLVED.into(),
            proto: PROTO_IPIP,
            tos: 0,
            hash: hash4(CLIENT, 1, VIP, 80, 6),
            gue: false,
        };
        // Still addressed to this host's MAC, so the stack takes it and forwards it.
        let mut want_src = out.clone();
        want_src[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(&out[6..12], &CLIENT_MAC, "source MAC as received");
        check_encap(&want_src, &frame[14..], &o);

        let frame = Frame6::tcp(CLIENT6, 2, VIP6, 80).build();
        let mut out = lb.expect(&frame, XDP_PASS, Reason::PassToKernel);
        out[6..12].copy_from_slice(&LB_MAC);
        let o = Outer {
            dmac: LB_MAC,
            backend: BE6_UNRESOLVED.into(),
            proto: 17,
            tos: 0,
            hash: hash6(CLIENT6, 2, VIP6, 80, 6),
            gue: true,
        };
        check_encap(&out, &frame[14..], &o);
    });
}

#[test]
fn a_next_hop_is_remembered_for_a_clock_tick_and_an_unresolved_one_not_at_all() {
    let bed = Bed::new();
    let ip = |args: &str| {
        let mut all = vec!["-n", bed.ns.as_str()];
        all.extend(args.split_whitespace());
        netns::ip(&all);
    };
    bed.run(|lb| {
        // The cache is per CPU: every packet of this test must run on the same one.
        packet::pin_to_cpu0();
        lb.dp.set_clock(7).unwrap();
        lb.backend(0, BE4.into());
        lb.backend(1, BE4_UNRESOLVED.into());
        lb.simple(false, FORWARD_IPIP, 0);
        lb.service(key(false, 81, 6), 2, &[1], FORWARD_IPIP, SCHED_MAGLEV, 0);
        let to = |port| Frame::tcp(CLIENT, port, VIP, 80).build();
        let out = lb.expect(&to(1), XDP_TX, Reason::Forwarded);
        assert_eq!(&out[0..6], &HOP_MAC, "to the next hop's MAC");

        // The next hop's MAC changes: the balancer keeps the one it looked up until the
        // daemon's clock moves on (about a second), then asks the kernel again.
        let new_mac = [0x02, 0xaa, 0, 0, 0, 0x02];
        ip(&format!(
            "neigh replace {HOP4} lladdr {} nud permanent dev lbe0",
            mac_str(&new_mac)
        ));
        let out = lb.expect(&to(2), XDP_TX, Reason::Forwarded);
        assert_eq!(&out[0..6], &HOP_MAC, "remembered within the tick");
        lb.dp.set_clock(8).unwrap();
        let out = lb.expect(&to(3), XDP_TX, Reason::Forwarded);
        assert_eq!(&out[0..6], &new_mac, "looked up again in the next tick");

        // An unresolved next hop is not remembered: once the neighbour is known, the very
        // next packet goes straight to it.
        let frame = Frame::tcp(CLIENT, 4, VIP, 81).build();
        lb.expect(&frame, XDP_PASS, Reason::PassToKernel);
        ip(&format!(
            "neigh replace {HOP4_UNRESOLVED} lladdr {} nud permanent dev lbe0",
            mac_str(&new_mac)
        ));
        let out = lb.expect(&frame, XDP_TX, Reason::Forwarded);
        assert_eq!(&out[0..6], &new_mac);
        assert_eq!(&out[30..34], &BE4_UNRESOLVED.octets(), "to the backend");
    });
}

/// Checks an ICMPv4 "fragmentation needed" built from `frame` (untagged), reporting `mtu`.
fn check_frag_needed(out: &[u8], frame: &[u8], mtu: u16) {
    assert_eq!(out.len(), 14 + 20 + 8 + 84, "a 112-byte datagram");
    assert_eq!(&out[0..6], &frame[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &frame[0..6], "from ours");
    assert_eq!(be16(out, 12), 0x0800);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(be16(ip, 2), 112, "total length");
    assert_eq!(ip[8], 64, "TTL");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(checksum(ip), 0, "IPv4 header checksum");
    assert_eq!(&ip[12..16], &VIP.octets(), "from the VIP");
    assert_eq!(&ip[16..20], &CLIENT.octets(), "to the client");
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
    assert_eq!(checksum(icmp), 0, "ICMP checksum");
    assert_eq!(be16(icmp, 4), 0, "unused");
    assert_eq!(be16(icmp, 6), mtu, "next-hop MTU");
    assert_eq!(
        &icmp[8..],
        &frame[14..14 + 84],
        "quotes the packet's first 84 bytes"
    );
}

#[test]
fn too_big_for_the_route_answers_fragmentation_needed_or_drops_without_df() {
    let bed = Bed::new();
    bed.run(|lb| {
        lb.backend(0, BE4_SMALL_MTU.into());
        lb.simple(false, FORWARD_IPIP, 0);
        lb.service(key(false, 53, 17), 1, &[0], FORWARD_GUE, SCHED_MAGLEV, 0);
        // 980 bytes fit with 20 of IP-in-IP; 981 do not.
        let fits = Frame::tcp(CLIENT, 1, VIP, 80)
            .frags(0x4000)
            .payload_len(MTU4 - 20 - 40)
            .build();
        lb.expect(&fits, XDP_TX, Reason::Forwarded);
        let big = Frame::tcp(CLIENT, 2, VIP, 80)
            .frags(0x4000)
            .payload_len(MTU4 - 20 - 40 + 1)
            .build();
        // Answered from the route remembered for the first packet, with its MTU.
        let out = lb.expect(&big, XDP_TX, Reason::IcmpTooBig);
        check_frag_needed(&out, &big, (MTU4 - 20) as u16);
        // GUE costs 8 bytes more.
        let big = Frame::udp(CLIENT, 3, VIP, 53)
            .frags(0x4000)
            .payload_len(1200)
            .build();
        let out = lb.expect(&big, XDP_TX, Reason::IcmpTooBig);
        check_frag_needed(&out, &big, (MTU4 - 28) as u16);
        // No DF: the balancer does not fragment, so the packet is dropped.
        let no_df = Frame::tcp(CLIENT, 4, VIP, 80).payload_len(1200).build();
        lb.expect(&no_df, XDP_DROP, Reason::DropTooBig);
        // The answer is not traffic of the service.
        assert_eq!(lb.dp.service_traffic(0).unwrap().packets, 1);
    });
}

#[test]
fn too_big_for_an_ipv6_route_answers_packet_too_big() {
    let bed = Bed::new();
    bed.run(|lb| {
        lb.backend(0, BE6_SMALL_MTU.into());
        lb.simple(true, FORWARD_IPIP, 0);
        let frame = Frame6::tcp(CLIENT6, 1, VIP6, 80).payload_len(1300).build();
        let out = lb.expect(&frame, XDP_TX, Reason::IcmpTooBig);
        assert_eq!(
            out.len(),
            14 + 40 + 8 + 248,
            "a reply well inside 1280 bytes"
        );
        assert_eq!(&out[0..6], &CLIENT_MAC, "back to the sender's MAC");
        assert_eq!(&out[6..12], &LB_MAC);
        assert_eq!(be16(&out, 12), 0x86dd);
        let ip = &out[14..54];
        assert_eq!(u32::from_be_bytes(ip[0..4].try_into().unwrap()), 6 << 28);
        assert_eq!(be16(ip, 4), 256, "payload length");
        assert_eq!((ip[6], ip[7]), (58, 64), "ICMPv6, hop limit 64");
        assert_eq!(&ip[8..24], &VIP6.octets(), "from the VIP");
        assert_eq!(&ip[24..40], &CLIENT6.octets(), "to the client");
        let icmp = &out[54..];
        assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
        assert_eq!(icmp6_checksum(&VIP6, &CLIENT6, icmp), 0, "ICMPv6 checksum");
        assert_eq!(
            u32::from_be_bytes(icmp[4..8].try_into().unwrap()) as usize,
            MTU6 - 40,
            "MTU left for the inner packet"
        );
        assert_eq!(
            &icmp[8..],
            &frame[14..14 + 248],
            "quotes the packet's start"
        );

        // 6in4 over the small IPv4 route: an IPv6 client also gets ICMPv6, with a tag kept.
        lb.backend(1, BE4_SMALL_MTU.into());
        lb.service(key(true, 53, 17), 2, &[1], FORWARD_GUE, SCHED_MAGLEV, 0);
        let mut frame = Frame6::udp(CLIENT6, 2, VIP6, 53).payload_len(1000).build();
        // Tag it (VLAN 7) by hand: the reply keeps the tag, the ICMPv6 follows it.
        frame.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        let out = lb.expect(&frame, XDP_TX, Reason::IcmpTooBig);
        assert_eq!(out.len(), 18 + 40 + 8 + 248);
        assert_eq!(&out[12..18], &frame[12..18], "VLAN tag and ethertype kept");
        let icmp = &out[58..];
        assert_eq!(icmp6_checksum(&VIP6, &CLIENT6, icmp), 0, "ICMPv6 checksum");
        assert_eq!(
            u32::from_be_bytes(icmp[4..8].try_into().unwrap()) as usize,
            MTU4 - 28
        );
        assert_eq!(&icmp[8..], &frame[18..18 + 248]);
    });
}

#[test]
fn icmp_errors_about_a_vip_flow_go_to_that_flows_backend() {
    let bed = Bed::new();
    bed.run(|lb| {
        // Each service has backends of its own, as the daemon gives them: 4 each.
        for id in 0..12 {
            lb.backend(id, Ipv4Addr::new(10, 2, 0, 11 + id as u8).into());
        }
        for (port, forward) in [(80, FORWARD_IPIP), (81, FORWARD_DSR), (82, FORWARD_NAT)] {
            let id = u32::from(port - 80);
            let ids: Vec<u32> = (4 * id..4 * id + 4).collect();
            lb.service(key(false, port, 6), id, &ids, forward, SCHED_MAGLEV, 0);
        }
        let router = Ipv4Addr::new(10, 50, 0, 1);
        // (vport, client port): each flow is opened, then an error about the VIP's reply.
        for sport in 1000..1008u16 {
            let data = Frame::tcp(CLIENT, sport, VIP, 80).build();
            let out = lb.expect(&data, XDP_TX, Reason::Forwarded);
            let backend = &out[14 + 16..14 + 20];
            let reply = Frame::tcp(VIP, 80, CLIENT, sport).build();
            let err = icmp4(router, VIP, 3, 4, 1400, &reply[14..14 + 28]);
            let out = lb.expect(&err, XDP_TX, Reason::IcmpForwarded);
            assert_eq!(&out[14 + 16..14 + 20], backend, "the flow's backend");
            let o = Outer {
                dmac: HOP_MAC,
                backend: Ipv4Addr::new(backend[0], backend[1], backend[2], backend[3]).into(),
                proto: PROTO_IPIP,
                tos: 0,
                hash: hash4(CLIENT, sport, VIP, 80, 6),
                gue: false,
            };
            check_encap(&out, &err[14..], &o);
        }
        // Time exceeded too; DSR: only the MACs change.
        let data = Frame::tcp(CLIENT, 2000, VIP, 81).build();
        let out = lb.expect(&data, XDP_TX, Reason::Forwarded);
        let mac = out[0..6].to_vec();
        let reply = Frame::tcp(VIP, 81, CLIENT, 2000).build();
        let err = icmp4(router, VIP, 11, 0, 0, &reply[14..14 + 28]);
        let out = lb.expect(&err, XDP_TX, Reason::IcmpForwarded);
        assert_eq!(&out[0..6], &mac[..], "the flow's backend MAC");
        assert_eq!(&out[12..], &err[12..], "nothing but the MACs changes");

        // Unknown flow, a nat service, a dead backend: passed to the kernel.
        let reply = Frame::tcp(VIP, 80, CLIENT, 3000).build();
        let err = icmp4(router, VIP, 3, 4, 1400, &reply[14..14 + 28]);
        assert_eq!(lb.expect(&err, XDP_PASS, Reason::PassIcmpNoFlow), err);
        let reply = Frame::tcp(VIP, 82, CLIENT, 3000).build();
        let err = icmp4(router, VIP, 3, 4, 1400, &reply[14..14 + 28]);
        lb.expect(&err, XDP_PASS, Reason::PassIcmpNoFlow);
        let key = FlowKeyV4 {
            src: u32::from_ne_bytes(CLIENT.octets()),
            dst: u32::from_ne_bytes(VIP.octets()),
            sport: 2000u16.to_be(),
            dport: 81u16.to_be(),
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        };
        let owner = lb.dp.flow(&key).expect("the DSR flow is tracked").backend;
        let mut dead = lb.dp.backend(owner).unwrap();
        dead.flags = 0;
        lb.dp.set_backend(owner, dead).unwrap();
        let err = icmp4(router, VIP, 11, 0, 0, &reply_of(81, 2000)[14..14 + 28]);
        lb.expect(&err, XDP_PASS, Reason::PassIcmpNoFlow);

        // Not errors about a VIP's packet: ICMP as before.
        let echo = icmp4(CLIENT, VIP, 8, 0, 0, b"ping");
        lb.expect(&echo, XDP_PASS, Reason::PassNotTcpUdp);
        let not_from_vip = Frame::tcp(CLIENT, 1000, VIP, 80).build();
        let err = icmp4(router, VIP, 3, 4, 1400, &not_from_vip[14..14 + 28]);
        lb.expect(&err, XDP_PASS, Reason::PassNotTcpUdp);
    });
}

fn reply_of(vport: u16, cport: u16) -> Vec<u8> {
    Frame::tcp(VIP, vport, CLIENT, cport).build()
}

#[test]
fn icmpv6_errors_about_a_vip_flow_go_to_that_flows_backend() {
    let bed = Bed::new();
    bed.run(|lb| {
        for id in 0..3 {
            lb.backend(
                id,
                Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11 + id as u16).into(),
            );
        }
        lb.service(
            key(true, 80, 17),
            0,
            &[0, 1, 2],
            FORWARD_GUE,
            SCHED_MAGLEV,
            0,
        );
        let router = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
        for sport in 5000..5006u16 {
            let data = Frame6::udp(CLIENT6, sport, VIP6, 80).build();
            let out = lb.expect(&data, XDP_TX, Reason::Forwarded);
            let backend: [u8; 16] = out[14 + 24..14 + 40].try_into().unwrap();
            let reply = Frame6::udp(VIP6, 80, CLIENT6, sport).build();
            for (kind, code) in [(2, 0), (1, 4), (3, 0)] {
                let err = icmp6(router, VIP6, kind, code, 1280, &reply[14..14 + 48]);
                let out = lb.expect(&err, XDP_TX, Reason::IcmpForwarded);
                let o = Outer {
                    dmac: HOP_MAC,
                    backend: Ipv6Addr::from(backend).into(),
                    proto: 17,
                    tos: 0,
                    hash: hash6(CLIENT6, sport, VIP6, 80, 17),
                    gue: true,
                };
                check_encap(&out, &err[14..], &o);
            }
        }
        let reply = Frame6::udp(VIP6, 80, CLIENT6, 9999).build();
        let err = icmp6(router, VIP6, 2, 0, 1280, &reply[14..14 + 48]);
        assert_eq!(lb.expect(&err, XDP_PASS, Reason::PassIcmpNoFlow), err);
        let echo = icmp6(CLIENT6, VIP6, 128, 0, 0, b"ping");
        lb.expect(&echo, XDP_PASS, Reason::PassNotTcpUdp);
    });
}

/// Where a fragment of `client` must go: ring[source_hash(client)] of a table filled
/// round-robin with `n` backends.
fn source_owner(words: &[u32], n: u32) -> u32 {
    (source_hash(words) % RING_SIZE) % n
}

#[test]
fn fragments_of_a_fragment_service_follow_the_client_address() {
    let bed = Bed::new();
    bed.run(|lb| {
        for id in 0..4 {
            lb.backend(id, Ipv4Addr::new(10, 2, 0, 11 + id as u8).into());
        }
        let ids = [0, 1, 2, 3];
        // The service under its port and under port 0, as the daemon installs it.
        for k in [key(false, 53, 17), key(false, 0, 17)] {
            lb.service(
                k,
                0,
                &ids,
                FORWARD_IPIP,
                SCHED_SOURCE_HASH,
                SERVICE_F_FRAGMENTS,
            );
        }
        let mut owners = std::collections::BTreeSet::new();
        for c in 1..=12u8 {
            let client = Ipv4Addr::new(10, 99, 3, c);
            let words = [u32::from_ne_bytes(client.octets())];
            let want = Ipv4Addr::new(10, 2, 0, 11 + source_owner(&words, 4) as u8);
            owners.insert(want);
            let hash = source_hash(&words);
            // First fragment (MF, offset 0) and a later one (offset 1480, no ports).
            for frags in [0x2000u16, 185] {
                let frag = Frame::udp(client, 4000, VIP, 53).frags(frags).build();
                let out = lb.expect(&frag, XDP_TX, Reason::Forwarded);
                let o = Outer {
                    dmac: HOP_MAC,
                    backend: want.into(),
                    proto: PROTO_IPIP,
                    tos: 0,
                    hash,
                    gue: false,
                };
                check_encap(&out, &frag[14..], &o);
            }
            // The client's unfragmented packets go to the same backend.
            let whole = Frame::udp(client, 4000, VIP, 53).build();
            let out = lb.expect(&whole, XDP_TX, Reason::Forwarded);
            assert_eq!(&out[30..34], &want.octets());
        }
        assert!(owners.len() > 1, "clients spread over backends");
        assert_eq!(
            lb.dp.flows().unwrap().len(),
            12,
            "fragments make no connection-table entries (only the 12 whole packets do)"
        );

        // Without the flag: passed as before.
        lb.service(
            key(false, 0, 17),
            0,
            &ids,
            FORWARD_IPIP,
            SCHED_SOURCE_HASH,
            0,
        );
        let frag = Frame::udp(CLIENT, 4000, VIP, 53).frags(0x2000).build();
        assert_eq!(lb.expect(&frag, XDP_PASS, Reason::PassFragment), frag);
        // Not a service's fragment (another port-0 key): passed.
        let frag = Frame::tcp(CLIENT, 4000, VIP, 80).frags(0x2000).build();
        assert_eq!(lb.expect(&frag, XDP_PASS, Reason::PassFragment), frag);
    });
}

#[test]
fn ipv6_fragments_of_a_fragment_service_follow_the_client_address() {
    let bed = Bed::new();
    bed.run(|lb| {
        for id in 0..3 {
            lb.backend(
                id,
                Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x11 + id as u16).into(),
            );
        }
        let ids = [0, 1, 2];
        for k in [key(true, 53, 17), key(true, 0, 17)] {
            lb.service(
                k,
                0,
                &ids,
                FORWARD_DSR,
                SCHED_SOURCE_HASH,
                SERVICE_F_FRAGMENTS,
            );
        }
        for c in 1..=6u16 {
            let client = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 3, c);
            let want = source_owner(&ipv6_words(&client), 3);
            let mac = [0x02, 0xbe, 0, 0, 0, want as u8 + 1];
            // A fragment header after a destination-options header; first and later fragment.
            for off_m in [0x0001u16, 0x05c8] {
                let mut frag = Frame6::udp(client, 4000, VIP6, 53)
                    .ext(60, 0)
                    .ext(44, 0)
                    .build();
                let at = 14 + 40 + 8;
                frag[at + 2..at + 4].copy_from_slice(&off_m.to_be_bytes());
                let out = lb.expect(&frag, XDP_TX, Reason::Forwarded);
                assert_eq!(&out[0..6], &mac, "client {client}: ring[source_hash]");
                assert_eq!(&out[12..], &frag[12..], "DSR: only the MACs change");
            }
        }
        assert_eq!(
            lb.dp.flows().unwrap().len(),
            0,
            "no connection-table entries"
        );
        // A fragment to a service without the flag passes.
        lb.service(key(true, 0, 17), 0, &ids, FORWARD_DSR, SCHED_SOURCE_HASH, 0);
        let frag = Frame6::udp(CLIENT6, 4000, VIP6, 53).ext(44, 0).build();
        assert_eq!(lb.expect(&frag, XDP_PASS, Reason::PassFragment), frag);
    });
}
