//! The decapsulation program (`lb_decap`), run by the kernel with `BPF_PROG_TEST_RUN`: frames
//! encapsulated as the balancer will write them go in; what comes out must be exactly an
//! Ethernet header with the inner family's ethertype followed by the inner packet, unchanged.
//! Everything else must come out untouched, and broken encapsulations dropped. Each run is
//! checked against the one counter it must bump. Needs root (loading BPF).

mod common;
mod packet;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::{TestRun as _, TestRunOptions};
use common::netns;
use lb_common::{DEFAULT_GUE_PORT, DecapReason};
use lb_userspace::dataplane::Decap;
use packet::{CLIENT_MAC, Frame, LB_MAC};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The backend's own addresses (outer destinations) and the balancer's (outer sources).
const LOCAL4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const LOCAL6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const LB4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// Hosts that are not this one.
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);
/// The client and the VIP of the inner packet.
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 7);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 10);

const ETH_IP: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;

struct Harness {
    decap: Decap,
}

impl Harness {
    fn new() -> Self {
        Self::with_port(DEFAULT_GUE_PORT)
    }

    fn with_port(port: u16) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "BPF_PROG_TEST_RUN tests need root (run them through the README test command)"
        );
        let mut decap = Decap::load(port).expect("load the object");
        decap.program().expect("verifier accepts lb_decap");
        decap
            .set_addrs(&[IpAddr::V4(LOCAL4), IpAddr::V6(LOCAL6)])
            .expect("local addresses");
        Harness { decap }
    }

    /// Runs one frame; returns the verdict, the bytes out, and the one counter that moved.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>, DecapReason) {
        let before = self.decap.counts().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .decap
            .program()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        let after = self.decap.counts().unwrap();
        let moved: Vec<_> = DecapReason::ALL
            .iter()
            .zip(before.iter().zip(after))
            .filter(|(_, (b, a))| *a != **b)
            .map(|((r, _), (b, a))| (*r, a - b))
            .collect();
        assert!(
            moved.len() == 1 && moved[0].1 == 1,
            "exactly one counter must move by one, moved: {moved:?}"
        );
        (result.return_value, out, moved[0].0)
    }

    fn expect_decap(&mut self, frame: &[u8], inner: &[u8], kind: DecapReason) {
        let (verdict, out, reason) = self.run(frame);
        assert_eq!((verdict, reason), (XDP_PASS, kind));
        assert_eq!(out, eth(ether_type_of(inner), inner), "{kind:?}: bytes out");
    }

    fn expect_untouched(&mut self, frame: &[u8], why: DecapReason) {
        let (verdict, out, reason) = self.run(frame);
        assert_eq!((verdict, reason), (XDP_PASS, why));
        assert_eq!(out, frame, "{why:?}: the frame must pass untouched");
    }

    fn expect_drop(&mut self, frame: &[u8], why: DecapReason) {
        let (verdict, _, reason) = self.run(frame);
        assert_eq!((verdict, reason), (XDP_DROP, why));
    }
}

fn ether_type_of(ip: &[u8]) -> u16 {
    if ip[0] >> 4 == 6 { ETH_IPV6 } else { ETH_IP }
}

/// Ethernet header (balancer → backend MACs) + `l3`.
fn eth(ether_type: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = LB_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// Ethernet header with an 802.1Q tag + `l3`.
fn eth_vlan(vlan: u16, ether_type: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = LB_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vlan.to_be_bytes());
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

/// The client's UDP datagram to the VIP as an IPv4 packet (from the shared frame builder).
fn inner4() -> Vec<u8> {
    Frame::udp(CLIENT4, 40000, VIP4, 80).build()[14..].to_vec()
}

/// The same datagram over IPv6, with a real checksum.
fn inner6() -> Vec<u8> {
    let payload = b"hello over ipv6";
    let udp = udp(40000, 80, payload);
    let mut p = ipv6(CLIENT6, VIP6, 17, &udp);
    let sum = checksum6(&CLIENT6, &VIP6, 17, &udp);
    p[40 + 6..40 + 8].copy_from_slice(&sum.to_be_bytes());
    p
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let sum = fold(sum16(&h));
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A UDP datagram with a zero checksum (as GUE over IPv4 may send).
fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A GUE version 0 data message (no options) carrying `inner` of protocol `proto`.
fn gue(proto: u8, inner: &[u8]) -> Vec<u8> {
    let mut g = vec![0, proto, 0, 0];
    g.extend_from_slice(inner);
    g
}

fn proto_of(inner: &[u8]) -> u8 {
    if inner[0] >> 4 == 6 { 41 } else { 4 }
}

/// `inner` in IPIP from the balancer to `dst` (outer family from `dst`).
fn ipip(dst: IpAddr, inner: &[u8]) -> Vec<u8> {
    match dst {
        IpAddr::V4(d) => eth(ETH_IP, &ipv4(LB4, d, proto_of(inner), inner)),
        IpAddr::V6(d) => eth(ETH_IPV6, &ipv6(LB6, d, proto_of(inner), inner)),
    }
}

/// `inner` in GUE on UDP port `port` from the balancer to `dst`.
fn gue_frame(dst: IpAddr, port: u16, inner: &[u8]) -> Vec<u8> {
    let u = udp(51234, port, &gue(proto_of(inner), inner));
    match dst {
        IpAddr::V4(d) => eth(ETH_IP, &ipv4(LB4, d, 17, &u)),
        IpAddr::V6(d) => eth(ETH_IPV6, &ipv6(LB6, d, 17, &u)),
    }
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, next: u8, l4: &[u8]) -> u16 {
    let mut pseudo = src.octets().to_vec();
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, next]);
    fold(sum16(&pseudo) + sum16(l4))
}

const L4: IpAddr = IpAddr::V4(LOCAL4);
const L6: IpAddr = IpAddr::V6(LOCAL6);

#[test]
fn ipip_in_all_four_family_mixes_leaves_ethernet_and_the_inner_packet() {
    let mut h = Harness::new();
    for (dst, inner, kind) in [
        (L4, inner4(), DecapReason::Ipip4in4),
        (L4, inner6(), DecapReason::Ipip6in4),
        (L6, inner4(), DecapReason::Ipip4in6),
        (L6, inner6(), DecapReason::Ipip6in6),
    ] {
        h.expect_decap(&ipip(dst, &inner), &inner, kind);
    }
}

#[test]
fn gue_over_ipv4_and_ipv6_leaves_ethernet_and_the_inner_packet() {
    let mut h = Harness::new();
    for (dst, inner, kind) in [
        (L4, inner4(), DecapReason::Gue4in4),
        (L4, inner6(), DecapReason::Gue6in4),
        (L6, inner4(), DecapReason::Gue4in6),
        (L6, inner6(), DecapReason::Gue6in6),
    ] {
        h.expect_decap(&gue_frame(dst, DEFAULT_GUE_PORT, &inner), &inner, kind);
    }
}

#[test]
fn gue_variant_1_without_a_gue_header_is_decapsulated_as_katran_sends_it() {
    let mut h = Harness::new();
    for (inner, kind) in [
        (inner4(), DecapReason::Gue4in4),
        (inner6(), DecapReason::Gue6in4),
    ] {
        let frame = eth(
            ETH_IP,
            &ipv4(LB4, LOCAL4, 17, &udp(51234, DEFAULT_GUE_PORT, &inner)),
        );
        h.expect_decap(&frame, &inner, kind);
    }
}

#[test]
fn encapsulated_packets_for_another_host_pass_untouched() {
    let mut h = Harness::new();
    let o4 = IpAddr::V4(OTHER4);
    let o6 = IpAddr::V6(OTHER6);
    for frame in [
        ipip(o4, &inner4()),
        ipip(o4, &inner6()),
        ipip(o6, &inner4()),
        ipip(o6, &inner6()),
        gue_frame(o4, DEFAULT_GUE_PORT, &inner4()),
        gue_frame(o6, DEFAULT_GUE_PORT, &inner6()),
        // The inner destination is not what is matched: an inner packet to a local address in
        // an outer packet for another host is not ours either.
        ipip(o4, &ipv4(CLIENT4, LOCAL4, 17, &udp(1, 2, b"x"))),
    ] {
        h.expect_untouched(&frame, DecapReason::PassNotLocal);
    }
}

#[test]
fn gue_to_another_port_passes_untouched_and_the_port_is_configurable() {
    let mut h = Harness::new();
    for dst in [L4, L6] {
        h.expect_untouched(
            &gue_frame(dst, DEFAULT_GUE_PORT + 1, &inner4()),
            DecapReason::PassNotEncap,
        );
    }
    let mut h = Harness::with_port(9000);
    h.expect_untouched(
        &gue_frame(L4, DEFAULT_GUE_PORT, &inner4()),
        DecapReason::PassNotEncap,
    );
    let inner = inner6();
    h.expect_decap(&gue_frame(L6, 9000, &inner), &inner, DecapReason::Gue6in6);
}

#[test]
fn traffic_that_is_not_encapsulated_passes_untouched() {
    let mut h = Harness::new();
    let udp_to_local = eth(ETH_IP, &ipv4(CLIENT4, LOCAL4, 17, &udp(5000, 53, b"query")));
    let tcp_to_local = Frame::tcp(CLIENT4, 40000, LOCAL4, 80).build();
    let icmp_to_local = eth(ETH_IP, &ipv4(CLIENT4, LOCAL4, 1, &[8, 0, 0, 0, 0, 1, 0, 1]));
    let udp6_to_local = eth(ETH_IPV6, &ipv6(CLIENT6, LOCAL6, 17, &udp(5000, 53, b"q")));
    let tcp_vlan = Frame::tcp(CLIENT4, 40000, LOCAL4, 80).vlan(7).build();
    for frame in [
        udp_to_local,
        tcp_to_local,
        icmp_to_local,
        udp6_to_local,
        tcp_vlan,
        eth(ETH_IP, &inner4()),
    ] {
        h.expect_untouched(&frame, DecapReason::PassNotEncap);
    }
    h.expect_untouched(&Frame::arp(), DecapReason::PassNotIp);
    // Too short to hold an IP header: not ours to judge.
    h.expect_untouched(&eth(ETH_IP, &[0x45, 0, 0]), DecapReason::PassNotIp);
    // An outer IPv6 header followed by an extension header is not walked.
    let mut hop_by_hop = vec![4, 0, 1, 4, 0, 0, 0, 0];
    hop_by_hop.extend_from_slice(&inner4());
    h.expect_untouched(
        &eth(ETH_IPV6, &ipv6(LB6, LOCAL6, 0, &hop_by_hop)),
        DecapReason::PassNotEncap,
    );
}

#[test]
fn outer_ipv4_fragments_pass_to_the_kernel() {
    let mut h = Harness::new();
    let mut frame = ipip(L4, &inner4());
    frame[14 + 6] = 0x20; // more fragments
    h.expect_untouched(&frame, DecapReason::PassFragment);
}

#[test]
fn truncated_or_inconsistent_outer_headers_are_dropped() {
    let mut h = Harness::new();
    // The outer header claims more bytes than the frame has (the tail was cut off).
    for dst in [L4, L6] {
        for frame in [
            ipip(dst, &inner4()),
            gue_frame(dst, DEFAULT_GUE_PORT, &inner6()),
        ] {
            h.expect_drop(&frame[..frame.len() - 5], DecapReason::DropMalformedOuter);
        }
    }
    // IPv4 header length below 20.
    let mut frame = ipip(L4, &inner4());
    frame[14] = 0x44;
    h.expect_drop(&frame, DecapReason::DropMalformedOuter);
    // UDP length past the IP datagram, or shorter than a UDP header.
    for bad_len in [200u16, 4] {
        for dst in [L4, L6] {
            let mut frame = gue_frame(dst, DEFAULT_GUE_PORT, &inner4());
            let udp_at = if dst.is_ipv4() { 14 + 20 } else { 14 + 40 };
            frame[udp_at + 4..udp_at + 6].copy_from_slice(&bad_len.to_be_bytes());
            h.expect_drop(&frame, DecapReason::DropMalformedOuter);
        }
    }
}

#[test]
fn broken_gue_headers_are_dropped() {
    let mut h = Harness::new();
    let inner = inner4();
    let with_gue = |g: &[u8]| {
        let mut payload = g.to_vec();
        payload.extend_from_slice(&inner);
        eth(
            ETH_IP,
            &ipv4(LB4, LOCAL4, 17, &udp(1, DEFAULT_GUE_PORT, &payload)),
        )
    };
    for (what, header) in [
        ("unknown inner protocol", &[0u8, 17, 0, 0][..]),
        ("control message", &[0x20, 0, 0, 0]),
        ("options (hlen 1)", &[0x01, 4, 0, 0]),
        ("flags without options", &[0, 4, 0x80, 0]),
        ("version 3", &[0xc0, 4, 0, 0]),
    ] {
        let (verdict, _, reason) = h.run(&with_gue(header));
        assert_eq!(
            (verdict, reason),
            (XDP_DROP, DecapReason::DropMalformedGue),
            "{what}"
        );
    }
    // A UDP payload too short to hold the GUE header.
    let frame = eth(
        ETH_IP,
        &ipv4(LB4, LOCAL4, 17, &udp(1, DEFAULT_GUE_PORT, &[0, 4])),
    );
    h.expect_drop(&frame, DecapReason::DropMalformedGue);
}

#[test]
fn truncated_or_mismatched_inner_packets_are_dropped() {
    let mut h = Harness::new();
    for dst in [L4, L6] {
        for inner in [inner4(), inner6()] {
            // The outer packet carries only part of the inner header.
            let mut cut = ipip(dst, &inner[..12]);
            let ip_proto_at = if dst.is_ipv4() { 14 + 9 } else { 14 + 6 };
            cut[ip_proto_at] = proto_of(&inner);
            h.expect_drop(&cut, DecapReason::DropMalformedInner);
            // The whole header, but the inner packet says it is longer than what is carried.
            let short = &inner[..inner.len() - 3];
            let mut frame = ipip(dst, short);
            frame[ip_proto_at] = proto_of(&inner);
            h.expect_drop(&frame, DecapReason::DropMalformedInner);
            // GUE the same way.
            let u = udp(1, DEFAULT_GUE_PORT, &gue(proto_of(&inner), short));
            let frame = match dst {
                IpAddr::V4(d) => eth(ETH_IP, &ipv4(LB4, d, 17, &u)),
                IpAddr::V6(d) => eth(ETH_IPV6, &ipv6(LB6, d, 17, &u)),
            };
            h.expect_drop(&frame, DecapReason::DropMalformedInner);
        }
    }
    // The outer protocol says IPv4 but an IPv6 packet follows.
    let mut frame = ipip(L4, &inner6());
    frame[14 + 9] = 4;
    h.expect_drop(&frame, DecapReason::DropMalformedInner);
}

#[test]
fn vlan_tags_options_and_padding_survive_decapsulation() {
    let mut h = Harness::new();
    // The tag stays, with the inner family's ethertype after it.
    let inner = inner6();
    let frame = eth_vlan(42, ETH_IP, &ipv4(LB4, LOCAL4, 41, &inner));
    let (verdict, out, reason) = h.run(&frame);
    assert_eq!((verdict, reason), (XDP_PASS, DecapReason::Ipip6in4));
    assert_eq!(out, eth_vlan(42, ETH_IPV6, &inner));

    // Outer IPv4 options are skipped with the header.
    let inner = inner4();
    let mut outer = ipv4(LB4, LOCAL4, 4, &[]);
    outer[0] = 0x46;
    outer.extend_from_slice(&[1, 1, 1, 0]);
    let total = (outer.len() + inner.len()) as u16;
    outer[2..4].copy_from_slice(&total.to_be_bytes());
    outer.extend_from_slice(&inner);
    h.expect_decap(&eth(ETH_IP, &outer), &inner, DecapReason::Ipip4in4);

    // Ethernet padding after the outer datagram stays after the inner one (the stack trims it).
    let mut frame = ipip(L6, &inner);
    frame.extend_from_slice(&[0; 6]);
    let (verdict, out, reason) = h.run(&frame);
    assert_eq!((verdict, reason), (XDP_PASS, DecapReason::Ipip4in6));
    let mut want = eth(ETH_IP, &inner);
    want.extend_from_slice(&[0; 6]);
    assert_eq!(out, want);
}

/// Two namespaces joined by a veth pair: `tx` (the balancer's side, which sends encapsulated
/// packets with raw and UDP sockets) and `be` (a backend running `lb decap` on its veth, with
/// the VIPs on `lo`). Removed on drop, with the `lb decap` process, also when the test fails.
struct DecapBed {
    tx: String,
    be: String,
    decap: Option<Child>,
}

const TX4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const BE4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const TX6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1);
const BE6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const VIP_PORT: u16 = 5000;

impl DecapBed {
    /// The topology, with `lb decap --iface dbe0` running in `be` if `decap`.
    fn start(decap: bool) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the namespace test needs root"
        );
        netns::sweep_stale();
        // Numbered from 900 so they never meet the shared test bed's names.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(900);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{}{}x{n}", netns::NS_PREFIX, std::process::id());
        let mut bed = DecapBed {
            tx: format!("{id}-tx"),
            be: format!("{id}-be"),
            decap: None,
        };
        netns::netns_add(&bed.tx);
        netns::netns_add(&bed.be);
        let (tx, be) = (bed.tx.clone(), bed.be.clone());
        let ip_in = |ns: &str, args: &str| {
            let mut all = vec!["-n", ns];
            all.extend(args.split_whitespace());
            netns::ip(&all);
        };
        netns::ip(&[
            "link", "add", "dtx0", "netns", &tx, "type", "veth", "peer", "name", "dbe0", "netns",
            &be,
        ]);
        for (ns, dev, v4, v6) in [(&tx, "dtx0", TX4, TX6), (&be, "dbe0", BE4, BE6)] {
            ip_in(ns, &format!("addr add {v4}/24 dev {dev}"));
            ip_in(ns, &format!("addr add {v6}/64 dev {dev} nodad"));
            ip_in(ns, &format!("link set {dev} up"));
            ip_in(ns, "link set lo up");
        }
        ip_in(&be, &format!("addr add {VIP4}/32 dev lo"));
        ip_in(&be, &format!("addr add {VIP6}/128 dev lo"));
        // The inner sources (the clients) are reached back through the balancer's side.
        ip_in(&be, &format!("route add default via {TX4}"));
        ip_in(&be, &format!("-6 route add default via {TX6}"));
        if !decap {
            return bed;
        }
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &be,
                common::LB_BIN,
                "decap",
                "--iface",
                "dbe0",
            ])
            .arg("--json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting lb decap");
        bed.decap = Some(child);
        bed
    }

    /// Stops `lb decap` with SIGTERM and returns its counters (printed on exit).
    fn stop(&mut self) -> serde_json::Value {
        let child = self.decap.take().expect("lb decap runs");
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(child.wait_with_output());
        });
        let out = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("lb decap exits within 10 s of SIGTERM")
            .expect("waiting for lb decap");
        assert!(out.status.success(), "lb decap exited with {}", out.status);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lb decap printed no JSON counters ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for DecapBed {
    fn drop(&mut self) {
        if let Some(mut child) = self.decap.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        netns::netns_del(&self.tx);
        netns::netns_del(&self.be);
    }
}

/// Calls `send` every 200 ms until `sock` receives `want` (the attach takes a moment after the
/// process starts), for at most `limit`.
fn deliver(
    sock: &UdpSocket,
    want: &[u8],
    limit: Duration,
    mut send: impl FnMut(),
) -> Result<(), String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        send();
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && &buf[..n] == want
        {
            return Ok(());
        }
    }
    Err("the inner datagram never arrived".into())
}

/// A UDP datagram from a client to the VIP, with a correct checksum, inside an IP packet.
fn inner_datagram(v6: bool, payload: &[u8]) -> Vec<u8> {
    let mut u = udp(40000, VIP_PORT, payload);
    if v6 {
        let sum = checksum6(&CLIENT6, &VIP6, 17, &u);
        u[6..8].copy_from_slice(&sum.to_be_bytes());
        ipv6(CLIENT6, VIP6, 17, &u)
    } else {
        let mut pseudo = CLIENT4.octets().to_vec();
        pseudo.extend_from_slice(&VIP4.octets());
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(u.len() as u16).to_be_bytes());
        let sum = fold(sum16(&pseudo) + sum16(&u));
        u[6..8].copy_from_slice(&sum.to_be_bytes());
        ipv4(CLIENT4, VIP4, 17, &u)
    }
}

/// Sockets for the test: receivers on the VIPs in `be`, senders in `tx`.
struct Sockets {
    rx4: UdpSocket,
    rx6: UdpSocket,
    /// Raw sockets send the inner packet as the payload of an outer IP header with protocol
    /// 4 or 41 (the kernel writes the outer header); UDP sockets send GUE.
    raw4_4: Socket,
    raw4_41: Socket,
    raw6_4: Socket,
    raw6_41: Socket,
    gue4: UdpSocket,
    gue6: UdpSocket,
}

impl Sockets {
    fn open(bed: &DecapBed) -> Self {
        let (rx4, rx6) = netns::run_in(&bed.be, || {
            (
                UdpSocket::bind(SocketAddr::from((VIP4, VIP_PORT))).expect("bind the v4 VIP"),
                UdpSocket::bind(SocketAddr::from((VIP6, VIP_PORT))).expect("bind the v6 VIP"),
            )
        })
        .unwrap();
        netns::run_in(&bed.tx, || {
            let raw =
                |d: Domain, p: i32| Socket::new(d, Type::RAW, Some(Protocol::from(p))).unwrap();
            Sockets {
                rx4,
                rx6,
                raw4_4: raw(Domain::IPV4, 4),
                raw4_41: raw(Domain::IPV4, 41),
                raw6_4: raw(Domain::IPV6, 4),
                raw6_41: raw(Domain::IPV6, 41),
                gue4: UdpSocket::bind(SocketAddr::from((TX4, 0))).unwrap(),
                gue6: UdpSocket::bind(SocketAddr::from((TX6, 0))).unwrap(),
            }
        })
        .unwrap()
    }

    /// Sends a client's datagram to the VIP encapsulated as `kind` ("ipip 4in6", "gue 6in6",
    /// ...) until it arrives on the VIP's socket.
    fn deliver(&self, kind: &str, limit: Duration) -> Result<(), String> {
        let v6_outer = kind.ends_with("in6");
        let v6_inner = kind.contains(" 6in");
        let payload = format!("through {kind}");
        let packet = inner_datagram(v6_inner, payload.as_bytes());
        let to = SockAddr::from(if v6_outer {
            SocketAddr::from((BE6, 0))
        } else {
            SocketAddr::from((BE4, 0))
        });
        let gue_to = SocketAddr::from(if v6_outer {
            (IpAddr::V6(BE6), DEFAULT_GUE_PORT)
        } else {
            (IpAddr::V4(BE4), DEFAULT_GUE_PORT)
        });
        let proto = if v6_inner { 41 } else { 4 };
        let rx = if v6_inner { &self.rx6 } else { &self.rx4 };
        deliver(rx, payload.as_bytes(), limit, || {
            let _ = if kind.starts_with("gue") {
                let sock = if v6_outer { &self.gue6 } else { &self.gue4 };
                sock.send_to(&gue(proto, &packet), gue_to)
            } else {
                let sock = match (v6_outer, v6_inner) {
                    (false, false) => &self.raw4_4,
                    (false, true) => &self.raw4_41,
                    (true, false) => &self.raw6_4,
                    (true, true) => &self.raw6_41,
                };
                sock.send_to(&packet, &to)
            };
        })
        .map_err(|e| format!("{kind}: {e}"))
    }
}

const E2E_KINDS: [&str; 6] = [
    "ipip 4in4",
    "ipip 6in4",
    "ipip 4in6",
    "ipip 6in6",
    "gue 4in4",
    "gue 6in6",
];

#[test]
fn lb_decap_delivers_inner_datagrams_to_the_vip_on_loopback() {
    let mut bed = DecapBed::start(true);
    let sockets = Sockets::open(&bed);
    for kind in E2E_KINDS {
        sockets
            .deliver(kind, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let counts = bed.stop();
    for kind in E2E_KINDS {
        let name = format!("decap_{}", kind.replace(' ', "_"));
        assert!(counts[&name].as_u64() >= Some(1), "{name}: {counts}");
    }
    let link = netns::ip(&["-n", &bed.be, "link", "show", "dbe0"]);
    assert!(
        !link.contains("xdp"),
        "lb decap left its program attached: {link}"
    );
}

/// The control: this kernel has no ipip/sit/fou modules, so without `lb decap` nothing
/// arrives. Without this, the test above could pass by the kernel's own tunnels.
#[test]
fn without_lb_decap_nothing_arrives() {
    let bed = DecapBed::start(false);
    let sockets = Sockets::open(&bed);
    for kind in E2E_KINDS {
        assert!(
            sockets.deliver(kind, Duration::from_millis(600)).is_err(),
            "{kind} arrived without decapsulation: does this kernel have tunnel modules?"
        );
    }
}
