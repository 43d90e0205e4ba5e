//! nat and fullnat through the loaded program (`BPF_PROG_TEST_RUN`): the bytes going to the
//! backend and coming back to the client, every checksum recomputed here from scratch, the
//! NAT tables the program leaves, and the daemon's sweep over them.
//!
//! The program routes translated packets with the kernel's FIB, so each test runs on a thread
//! moved into a network namespace of its own (`unshare`; it goes away with the thread, also
//! when the test fails) holding a veth with forwarding on, the balancer's addresses and
//! permanent neighbour entries for the client and the backends; the test run's context names
//! that veth as the ingress interface. Needs root.

mod packet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use lb_common::{
    AF_INET, AF_INET6, BACKEND_F_ALIVE, Backend, CONFIG_F_NAT, DataplaneConfig, FLOW_F_CLOSED,
    FORWARD_FULLNAT, FORWARD_NAT, RING_SIZE, Reason, SCHED_MAGLEV, Service, ServiceKeyV4, names,
};
use lb_userspace::{
    api::HealthCheck,
    daemon::{Control, ProbeKey, ProbeTarget, Prober, ipv6_words},
    dataplane::{Dataplane, NatTables, ServiceKey},
};
use packet::{CLIENT_MAC, Frame, Frame6, LB_MAC, backend_mac, small_dataplane};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
const SNAT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 2);
/// The service port, and the port the backends listen on (mapped by NAT).
const VPORT: u16 = 80;
const BPORT: u16 = 8080;
const POOL: (u16, u16) = (40000, 40999);

/// Backend `n` (1-based) on the backends' subnet.
fn backend_ip(n: u8, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x98,
            0,
            0,
            0,
            0,
            0,
            0x10 + u16::from(n),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 98, 0, 10 + n))
    }
}

/// The id of backend `n`: 0 and 1 for the IPv4 ones, 2 and 3 for the IPv6 ones.
fn backend_id(n: u8, v6: bool) -> u32 {
    u32::from(n - 1) + if v6 { 2 } else { 0 }
}

fn vip(v6: bool) -> IpAddr {
    if v6 { VIP6.into() } else { VIP.into() }
}

fn client(v6: bool) -> IpAddr {
    if v6 { CLIENT6.into() } else { CLIENT.into() }
}

fn snat(v6: bool) -> IpAddr {
    if v6 { SNAT6.into() } else { SNAT.into() }
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The client-side veth `lbn0` (and, for two-interface tests, the backend-side `lbn2`).
fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string; the lookup is in this thread's network namespace.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// A veth `name` (peer `name`p) with our MAC, forwarding on and `addrs` on it.
fn veth(name: &str, addrs: &[&str]) {
    sh(&format!(
        "ip link add {name} type veth peer name {name}p && ip link set {name} address {} \
         && ip link set {name} up && ip link set {name}p up \
         && sysctl -qw net.ipv4.conf.{name}.forwarding=1 net.ipv6.conf.{name}.forwarding=1",
        mac_str(LB_MAC)
    ));
    for a in addrs {
        let nodad = if a.contains(':') { " nodad" } else { "" };
        sh(&format!("ip addr add {a} dev {name}{nodad}"));
    }
}

fn neighbour(ip: IpAddr, mac: [u8; 6], dev: &str) {
    sh(&format!(
        "ip neigh replace {ip} lladdr {} dev {dev} nud permanent",
        mac_str(mac)
    ));
}

/// A balancer in a namespace of its own, with backends 1 and 2 and NAT configured.
struct Bed {
    dp: Dataplane,
    /// Where client packets come in, and where backend packets come in.
    client_if: u32,
    backend_if: u32,
}

impl Bed {
    /// One interface carries both the clients' and the backends' subnets.
    fn one_arm() -> Self {
        Self::new(false)
    }

    /// Clients on `lbn0`, backends on `lbn2`.
    fn two_arm() -> Self {
        Self::new(true)
    }

    fn new(two_arm: bool) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "these tests need root (run them through the README test command)"
        );
        // SAFETY: affects only the calling thread, which the test owns for its whole life.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        sh("sysctl -qw net.ipv4.conf.all.forwarding=1 net.ipv6.conf.all.forwarding=1");
        let back = if two_arm { "lbn2" } else { "lbn0" };
        if two_arm {
            veth("lbn0", &["10.99.0.2/24", "fd00:99::2/64"]);
            veth("lbn2", &["10.98.0.2/24", "fd00:98::2/64"]);
        } else {
            veth(
                "lbn0",
                &[
                    "10.99.0.2/24",
                    "10.98.0.2/24",
                    "fd00:99::2/64",
                    "fd00:98::2/64",
                ],
            );
        }
        neighbour(CLIENT.into(), CLIENT_MAC, "lbn0");
        neighbour(CLIENT6.into(), CLIENT_MAC, "lbn0");
        for n in 1..=2 {
            neighbour(backend_ip(n, false), backend_mac(n), back);
            neighbour(backend_ip(n, true), backend_mac(n), back);
        }
        let mut dp = small_dataplane();
        dp.program(names::PROG_BALANCER)
            .expect("the verifier accepts the balancer");
        let mut bed = Bed {
            dp,
            client_if: ifindex("lbn0"),
            backend_if: ifindex(back),
        };
        bed.config(POOL, true);
        for n in 1..=2 {
            bed.backend(n, false, 1, true);
        }
        bed
    }

    fn config(&mut self, (min, max): (u16, u16), nat: bool) {
        self.dp
            .set_config(&DataplaneConfig {
                snat4: u32::from_ne_bytes(SNAT.octets()),
                snat6: ipv6_words(&SNAT6),
                snat_port_min: min,
                snat_port_max: max,
                flags: if nat { CONFIG_F_NAT } else { 0 },
                syn_guard: 0,
                ..DataplaneConfig::default()
            })
            .unwrap();
    }

    /// Backend `n` of family `v6` (id `backend_id`), listening on `BPORT`.
    fn backend(&mut self, n: u8, v6: bool, generation: u32, alive: bool) {
        let mut addr = [0; 16];
        match backend_ip(n, v6) {
            IpAddr::V4(ip) => addr[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => addr.copy_from_slice(&ip.octets()),
        }
        self.dp
            .set_backend(
                backend_id(n, v6),
                Backend {
                    addr,
                    mac: [0; 6],
                    port: BPORT.to_be(),
                    generation,
                    flags: if alive { BACKEND_F_ALIVE } else { 0 },
                    family: if v6 { AF_INET6 } else { AF_INET },
                    forward: FORWARD_NAT,
                    _pad: 0,
                    service: 0,
                },
            )
            .unwrap();
    }

    /// The service VIP:VPORT/proto of family `v6` (id 0, ring table `ring`) on backends `ns`.
    fn service(&mut self, v6: bool, proto: u8, forward: u8, ring: u32, ns: &[u8]) {
        for n in ns {
            self.backend(*n, v6, 1, true);
        }
        let table: Vec<u32> = (0..RING_SIZE as usize)
            .map(|i| backend_id(ns[i % ns.len()], v6))
            .collect();
        self.dp.write_ring(ring, &table).unwrap();
        let key = ServiceKey::new(vip(v6), VPORT, proto);
        let service = Service {
            id: 0,
            ring,
            forward,
            scheduler: SCHED_MAGLEV,
            flags: 0,
            _pad: 0,
        };
        self.dp.set_service(key, service).unwrap();
    }

    fn run_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        packet::run_on(&mut self.dp, ifindex, frame)
    }

    /// A client packet, sent out again (XDP_TX) to a backend: the frame that left.
    fn forward(&mut self, frame: &[u8]) -> Vec<u8> {
        sent_out(&mut self.dp, self.client_if, frame)
    }

    /// A backend's packet sent back out to the client (XDP_TX).
    fn reply(&mut self, frame: &[u8]) -> Vec<u8> {
        sent_out(&mut self.dp, self.backend_if, frame)
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.dp.reason_counts().unwrap()[reason as usize]
    }

    fn tables(&self) -> NatTables {
        self.dp.nat_tables().unwrap()
    }
}

/// `run_on` for a packet that must go out again the way it came (XDP_TX).
fn sent_out(dp: &mut Dataplane, ifindex: u32, frame: &[u8]) -> Vec<u8> {
    let (verdict, out) = packet::run_on(dp, ifindex, frame);
    assert_eq!(verdict, XDP_TX, "the packet goes out again");
    out
}

/// Runs a test body on its own thread, so the namespace it enters dies with it.
fn in_netns(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(body).join().expect("test thread");
}

// ---- frames -----------------------------------------------------------------------------

/// A TCP or UDP frame from `src`:`sport` to `dst`:`dport` with valid checksums (IPv4 header,
/// and TCP/UDP over the pseudo-header).
fn frame(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = match (src, dst, proto) {
        (IpAddr::V4(s), IpAddr::V4(d), TCP) => Frame::tcp(s, sport, d, dport).build(),
        (IpAddr::V4(s), IpAddr::V4(d), _) => Frame::udp(s, sport, d, dport).build(),
        (IpAddr::V6(s), IpAddr::V6(d), TCP) => Frame6::tcp(s, sport, d, dport).build(),
        (IpAddr::V6(s), IpAddr::V6(d), _) => Frame6::udp(s, sport, d, dport).build(),
        _ => panic!("mixed families"),
    };
    let v = View::of(&f);
    if proto == TCP {
        f[v.l4 + 13] = flags;
    }
    let check = v.l4 + if proto == TCP { 16 } else { 6 };
    f[check..check + 2].copy_from_slice(&[0, 0]);
    let sum = l4_sum(&f);
    let mut c = !fold(sum);
    if c == 0 && proto == UDP {
        c = 0xffff;
    }
    f[check..check + 2].copy_from_slice(&c.to_be_bytes());
    f
}

/// The fields of a frame the tests look at.
#[derive(Debug)]
struct View {
    dmac: [u8; 6],
    smac: [u8; 6],
    v6: bool,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    l3: usize,
    l4: usize,
    /// The L4 length (header and payload).
    l4_len: usize,
    l4_check: u16,
}

impl View {
    fn of(f: &[u8]) -> View {
        let be16 = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
        let v6 = be16(12) == 0x86dd;
        let l3 = 14;
        let (proto, src, dst, l4, l4_len) = if v6 {
            let a = |at: usize| {
                IpAddr::V6(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&f[at..at + 16]).unwrap(),
                ))
            };
            (
                f[l3 + 6],
                a(l3 + 8),
                a(l3 + 24),
                l3 + 40,
                usize::from(be16(l3 + 4)),
            )
        } else {
            let a = |at: usize| IpAddr::V4(Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]));
            let ihl = usize::from(f[l3] & 0x0f) * 4;
            (
                f[l3 + 9],
                a(l3 + 12),
                a(l3 + 16),
                l3 + ihl,
                usize::from(be16(l3 + 2)) - ihl,
            )
        };
        View {
            dmac: f[0..6].try_into().unwrap(),
            smac: f[6..12].try_into().unwrap(),
            v6,
            proto,
            src,
            dst,
            sport: be16(l4),
            dport: be16(l4 + 2),
            l3,
            l4,
            l4_len,
            l4_check: be16(l4 + if proto == TCP { 16 } else { 6 }),
        }
    }
}

fn sum_bytes(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The ones' complement sum of the TCP/UDP segment and its pseudo-header, checksum included.
fn l4_sum(f: &[u8]) -> u64 {
    let v = View::of(f);
    let addrs = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let mut pseudo = addrs(v.src);
    pseudo.extend(addrs(v.dst));
    pseudo.extend((v.l4_len as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, v.proto]);
    sum_bytes(&pseudo) + sum_bytes(&f[v.l4..v.l4 + v.l4_len])
}

/// Recomputes every checksum of `f` from scratch and compares: the IPv4 header's, and the
/// TCP/UDP one over the pseudo-header (an IPv4 UDP checksum of 0 means none).
fn assert_checksums(f: &[u8]) {
    let v = View::of(f);
    if !v.v6 {
        let ihl = usize::from(f[v.l3] & 0x0f) * 4;
        let mut header = f[v.l3..v.l3 + ihl].to_vec();
        let stored = u16::from_be_bytes([header[10], header[11]]);
        header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(stored, !fold(sum_bytes(&header)), "IPv4 header checksum");
    }
    if v.proto == UDP && v.l4_check == 0 {
        assert!(!v.v6, "an IPv6 UDP checksum is never 0");
        return;
    }
    let mut zeroed = f.to_vec();
    let at = v.l4 + if v.proto == TCP { 16 } else { 6 };
    zeroed[at..at + 2].copy_from_slice(&[0, 0]);
    let fresh = !fold(l4_sum(&zeroed));
    // 0x0000 and 0xffff are the same number in ones' complement; UDP must send the latter.
    let ok = v.l4_check == fresh
        || (fresh == 0 && v.l4_check == 0xffff)
        || (v.proto == TCP && fresh == 0xffff && v.l4_check == 0);
    assert!(
        ok,
        "L4 checksum {:#06x}, recomputed {fresh:#06x}",
        v.l4_check
    );
    assert_eq!(fold(l4_sum(f)), 0xffff, "the segment verifies");
}

/// Asserts that `out` is `sent` with only the MACs, addresses, ports and checksums changed.
fn assert_only_translation_changed(sent: &[u8], out: &[u8]) {
    assert_eq!(sent.len(), out.len());
    let (s, o) = (View::of(sent), View::of(out));
    let mut a = sent.to_vec();
    let mut b = out.to_vec();
    for f in [&mut a, &mut b] {
        f[0..12].fill(0);
        let (src_at, len) = if s.v6 { (s.l3 + 8, 32) } else { (s.l3 + 12, 8) };
        f[src_at..src_at + len].fill(0);
        if !s.v6 {
            f[s.l3 + 10..s.l3 + 12].fill(0);
        }
        // The TTL / hop limit: checked below.
        f[s.l3 + if s.v6 { 7 } else { 8 }] = 0;
        f[s.l4..s.l4 + 4].fill(0);
        let at = s.l4 + if s.proto == TCP { 16 } else { 6 };
        f[at..at + 2].fill(0);
    }
    assert_eq!(
        a, b,
        "only MACs, addresses, ports, TTL and checksums change"
    );
    let ttl_at = s.l3 + if s.v6 { 7 } else { 8 };
    assert_eq!(
        out[ttl_at],
        sent[ttl_at] - 1,
        "the TTL / hop limit goes down by one"
    );
    assert_eq!(o.proto, s.proto);
}

// ---- tests ------------------------------------------------------------------------------

const CASES: [(bool, u8); 4] = [(false, TCP), (false, UDP), (true, TCP), (true, UDP)];

#[test]
fn nat_sends_to_the_backends_port_and_translates_replies_back() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        for (v6, proto) in CASES {
            bed.service(v6, proto, FORWARD_NAT, 0, &[1]);
            let sent = frame(proto, client(v6), 5000, vip(v6), VPORT, SYN);
            let out = bed.forward(&sent);
            let v = View::of(&out);
            assert_eq!(
                v.dmac,
                backend_mac(1),
                "to the backend's MAC (neighbour table)"
            );
            assert_eq!(v.smac, LB_MAC, "from this interface's MAC");
            assert_eq!((v.src, v.sport), (client(v6), 5000), "nat keeps the client");
            assert_eq!((v.dst, v.dport), (backend_ip(1, v6), BPORT), "{v6} {proto}");
            assert_checksums(&out);
            assert_only_translation_changed(&sent, &out);

            let reply = frame(proto, backend_ip(1, v6), BPORT, client(v6), 5000, SYN_ACK);
            let back = bed.reply(&reply);
            let v = View::of(&back);
            assert_eq!((v.dmac, v.smac), (CLIENT_MAC, LB_MAC));
            assert_eq!(
                (v.src, v.sport),
                (vip(v6), VPORT),
                "the client sees the VIP"
            );
            assert_eq!((v.dst, v.dport), (client(v6), 5000));
            assert_checksums(&back);
            assert_only_translation_changed(&reply, &back);
        }
        assert_eq!(bed.reason(Reason::Forwarded), 4);
        assert_eq!(bed.reason(Reason::NatReply), 4);
        let t = bed.tables();
        assert_eq!((t.flows_v4.len(), t.replies_v4.len()), (2, 2));
        assert_eq!((t.flows_v6.len(), t.replies_v6.len()), (2, 2));
        assert!(
            t.flows_v4
                .iter()
                .all(|(_, s)| s.nat_port == 0 && s.backend == 0)
        );
    });
}

#[test]
fn fullnat_rewrites_both_ends_and_a_flow_keeps_its_port() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        for (v6, proto) in CASES {
            bed.service(v6, proto, FORWARD_FULLNAT, 0, &[1]);
            let sent = frame(proto, client(v6), 5000, vip(v6), VPORT, SYN);
            let out = bed.forward(&sent);
            let v = View::of(&out);
            assert_eq!((v.dmac, v.smac), (backend_mac(1), LB_MAC));
            assert_eq!((v.dst, v.dport), (backend_ip(1, v6), BPORT));
            assert_eq!(v.src, snat(v6), "the source is the SNAT address");
            let port = v.sport;
            assert!(
                (POOL.0..=POOL.1).contains(&port),
                "port {port} from the pool"
            );
            assert_checksums(&out);
            assert_only_translation_changed(&sent, &out);

            // The same flow again: the same port. Another flow: another port.
            let again = bed.forward(&frame(proto, client(v6), 5000, vip(v6), VPORT, ACK));
            assert_eq!(View::of(&again).sport, port, "a flow keeps its SNAT port");
            let other = bed.forward(&frame(proto, client(v6), 5001, vip(v6), VPORT, SYN));
            let other_port = View::of(&other).sport;
            assert_ne!(other_port, port, "two flows to one backend, two ports");
            assert!((POOL.0..=POOL.1).contains(&other_port));

            let reply = frame(proto, backend_ip(1, v6), BPORT, snat(v6), port, SYN_ACK);
            let back = bed.reply(&reply);
            let v = View::of(&back);
            assert_eq!((v.dmac, v.smac), (CLIENT_MAC, LB_MAC));
            assert_eq!((v.src, v.sport), (vip(v6), VPORT));
            assert_eq!(
                (v.dst, v.dport),
                (client(v6), 5000),
                "back to the client's port"
            );
            assert_checksums(&back);
            assert_only_translation_changed(&reply, &back);
            let reply2 = frame(proto, backend_ip(1, v6), BPORT, snat(v6), other_port, ACK);
            assert_eq!(View::of(&bed.reply(&reply2)).dport, 5001);
        }
        let t = bed.tables();
        let ports: Vec<u16> = t
            .flows_v4
            .iter()
            .map(|(_, s)| u16::from_be(s.nat_port))
            .collect();
        assert_eq!(ports.len(), 4);
        assert!(
            ports.iter().all(|p| (POOL.0..=POOL.1).contains(p)),
            "{ports:?}"
        );
        assert_eq!(t.replies_v4.len(), 4);
        assert_eq!((t.flows_v6.len(), t.replies_v6.len()), (4, 4));
    });
}

#[test]
fn an_ipv4_udp_checksum_of_zero_stays_zero() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        bed.service(false, UDP, FORWARD_FULLNAT, 0, &[1]);
        // The builder leaves the UDP checksum at 0 ("none").
        let sent = Frame::udp(CLIENT, 5000, VIP, VPORT).build();
        let out = bed.forward(&sent);
        let v = View::of(&out);
        assert_eq!(v.l4_check, 0);
        assert_eq!(v.src, snat(false));
        assert_checksums(&out);
    });
}

#[test]
fn a_full_snat_pool_drops_the_next_flow_and_leaves_no_entry() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        bed.config((41000, 41000), true);
        bed.service(false, TCP, FORWARD_FULLNAT, 0, &[1]);
        let first = bed.forward(&frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, SYN));
        assert_eq!(View::of(&first).sport, 41000);
        let (verdict, _) = bed.run_on(
            bed.client_if,
            &frame(TCP, CLIENT.into(), 5001, VIP.into(), VPORT, SYN),
        );
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(bed.reason(Reason::DropNatNoPort), 1);
        let t = bed.tables();
        assert_eq!(t.flows_v4.len(), 1, "no forward entry for the dropped flow");
        assert_eq!(u16::from_be(t.flows_v4[0].0.sport), 5000);
        assert_eq!(t.replies_v4.len(), 1);
        assert_eq!(
            bed.dp.flow_count(0).unwrap(),
            1,
            "only the first flow counts"
        );
        // The first flow still goes through with its port.
        let again = bed.forward(&frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, ACK));
        assert_eq!(View::of(&again).sport, 41000);
    });
}

#[test]
fn a_nat_reply_tuple_held_by_another_flow_is_not_taken() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        bed.service(false, TCP, FORWARD_NAT, 0, &[1]);
        bed.forward(&frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, SYN));
        // Another VIP port mapped to the same backend port: the client's same source port
        // would need the same reply 5-tuple.
        let key = ServiceKey::V4(ServiceKeyV4 {
            addr: u32::from_ne_bytes(VIP.octets()),
            port: 81u16.to_be(),
            proto: TCP,
            _pad: 0,
        });
        let service = Service {
            id: 1,
            ring: 0,
            forward: FORWARD_NAT,
            scheduler: SCHED_MAGLEV,
            flags: 0,
            _pad: 0,
        };
        bed.dp.set_service(key, service).unwrap();
        let (verdict, _) = bed.run_on(
            bed.client_if,
            &frame(TCP, CLIENT.into(), 5000, VIP.into(), 81, SYN),
        );
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(bed.reason(Reason::DropNatNoPort), 1);
        assert_eq!(bed.tables().flows_v4.len(), 1);
    });
}

#[test]
fn fin_marks_both_entries_closed_and_ends_the_active_count() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        for forward in [FORWARD_NAT, FORWARD_FULLNAT] {
            bed.service(false, TCP, forward, 0, &[1]);
            let sport = 6000 + u16::from(forward);
            let out = bed.forward(&frame(TCP, CLIENT.into(), sport, VIP.into(), VPORT, SYN));
            let (dst, dport) = {
                let v = View::of(&out);
                (v.src, v.sport)
            };
            assert_eq!(bed.dp.flow_count(0).unwrap(), 1);
            bed.forward(&frame(
                TCP,
                CLIENT.into(),
                sport,
                VIP.into(),
                VPORT,
                FIN_ACK,
            ));
            assert_eq!(
                bed.dp.flow_count(0).unwrap(),
                0,
                "a FIN ends the active count"
            );
            let back = frame(TCP, backend_ip(1, false), BPORT, dst, dport, FIN_ACK);
            bed.reply(&back);
            let t = bed.tables();
            let (_, fwd) = t
                .flows_v4
                .iter()
                .find(|(k, _)| u16::from_be(k.sport) == sport)
                .unwrap();
            assert_ne!(fwd.flags & FLOW_F_CLOSED, 0, "the forward entry is closed");
            let (_, rep) = t
                .replies_v4
                .iter()
                .find(|(k, _)| u16::from_be(k.dport) == dport)
                .unwrap();
            assert_ne!(rep.flags & FLOW_F_CLOSED, 0, "the reply entry is closed");
        }
    });
}

#[test]
fn replies_of_no_flow_pass_untouched_and_lookups_need_the_nat_flag() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        bed.service(false, TCP, FORWARD_NAT, 0, &[1]);
        let stray = frame(
            TCP,
            backend_ip(1, false),
            BPORT,
            CLIENT.into(),
            5999,
            SYN_ACK,
        );
        let (verdict, out) = bed.run_on(bed.backend_if, &stray);
        assert_eq!((verdict, out), (XDP_PASS, stray));
        assert_eq!(bed.reason(Reason::PassNotVip), 1);

        bed.forward(&frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, SYN));
        let reply = frame(
            TCP,
            backend_ip(1, false),
            BPORT,
            CLIENT.into(),
            5000,
            SYN_ACK,
        );
        bed.config(POOL, false);
        let (verdict, out) = bed.run_on(bed.backend_if, &reply);
        assert_eq!(
            (verdict, out),
            (XDP_PASS, reply.clone()),
            "without CONFIG_F_NAT no reply is looked up"
        );
        bed.config(POOL, true);
        assert_eq!(bed.run_on(bed.backend_if, &reply).0, XDP_TX);
    });
}

#[test]
fn a_flow_whose_backend_died_is_placed_again_with_new_entries() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        bed.service(false, TCP, FORWARD_NAT, 0, &[1]);
        bed.forward(&frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, SYN));
        bed.backend(1, false, 1, false);
        bed.service(false, TCP, FORWARD_NAT, 1, &[2]);
        let out = bed.forward(&frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, ACK));
        assert_eq!(View::of(&out).dst, backend_ip(2, false));
        assert_eq!(View::of(&out).dmac, backend_mac(2));
        let t = bed.tables();
        assert_eq!(t.flows_v4.len(), 1);
        assert_eq!(
            t.flows_v4[0].1.backend, 1,
            "the entry names backend 2 (id 1) now"
        );
        assert_eq!(
            t.replies_v4.len(),
            2,
            "the old reply entry is left to the sweep"
        );
        let back = frame(TCP, backend_ip(2, false), BPORT, CLIENT.into(), 5000, ACK);
        assert_eq!(View::of(&bed.reply(&back)).src, IpAddr::V4(VIP));
    });
}

#[test]
fn two_interfaces_redirect_through_the_attached_ports() {
    in_netns(|| {
        let mut bed = Bed::two_arm();
        bed.service(false, TCP, FORWARD_FULLNAT, 0, &[1]);
        let sent = frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, SYN);

        // The backends' interface runs no balancer: the kernel forwards (our MAC kept).
        let (verdict, out) = bed.run_on(bed.client_if, &sent);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(bed.reason(Reason::PassToKernel), 1);
        assert_eq!(View::of(&out).dmac, LB_MAC, "still addressed to this host");
        assert_eq!(
            View::of(&out).dst,
            backend_ip(1, false),
            "already translated"
        );
        assert_checksums(&out);

        let mut ports: aya::maps::DevMapHash<_> = bed
            .dp
            .ebpf_mut()
            .map_mut(names::TX_PORTS)
            .expect("TX_PORTS")
            .try_into()
            .unwrap();
        for i in [bed.client_if, bed.backend_if] {
            ports.insert(i, i, None, 0).unwrap();
        }
        let (verdict, out) = bed.run_on(bed.client_if, &sent);
        assert_eq!(verdict, XDP_REDIRECT, "out of the backends' interface");
        let v = View::of(&out);
        assert_eq!((v.dmac, v.smac), (backend_mac(1), LB_MAC));
        assert_eq!(
            (v.src, v.dst, v.dport),
            (snat(false), backend_ip(1, false), BPORT)
        );
        assert_checksums(&out);

        let reply = frame(
            TCP,
            backend_ip(1, false),
            BPORT,
            snat(false),
            v.sport,
            SYN_ACK,
        );
        let (verdict, back) = bed.run_on(bed.backend_if, &reply);
        assert_eq!(verdict, XDP_REDIRECT, "back out of the clients' interface");
        let v = View::of(&back);
        assert_eq!(
            (v.dmac, v.src, v.dst, v.dport),
            (CLIENT_MAC, vip(false), client(false), 5000)
        );
        assert_checksums(&back);
    });
}

/// Records nothing: the sweep test drives no health checks.
struct NoProbes;

impl Prober for NoProbes {
    type Handle = ();
    fn start(&mut self, _: ProbeKey, _: ProbeTarget, _: HealthCheck) {}
    fn stop(&mut self, _: ()) {}
}

#[test]
fn the_sweep_removes_closed_and_idle_pairs_and_keeps_the_rest() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        bed.service(false, TCP, FORWARD_FULLNAT, 0, &[1]);
        bed.service(false, UDP, FORWARD_NAT, 1, &[1]);
        bed.service(true, TCP, FORWARD_NAT, 2, &[1]);
        let (lbn0, t0) = (bed.client_if, 1000);
        let mut control = Control::new(bed.dp, "lbn0".into(), NoProbes);
        let dp = control.dataplane();
        dp.set_clock(t0).unwrap();
        // A TCP flow closed by FINs both ways, an open TCP flow (IPv4 and IPv6), a UDP flow.
        let out = sent_out(
            dp,
            lbn0,
            &frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, SYN),
        );
        let port = View::of(&out).sport;
        sent_out(
            dp,
            lbn0,
            &frame(TCP, CLIENT.into(), 5000, VIP.into(), VPORT, FIN_ACK),
        );
        let fin = frame(TCP, backend_ip(1, false), BPORT, SNAT.into(), port, FIN_ACK);
        sent_out(dp, lbn0, &fin);
        sent_out(
            dp,
            lbn0,
            &frame(TCP, CLIENT.into(), 5001, VIP.into(), VPORT, SYN),
        );
        sent_out(
            dp,
            lbn0,
            &frame(TCP, CLIENT6.into(), 5002, VIP6.into(), VPORT, SYN),
        );
        sent_out(
            dp,
            lbn0,
            &frame(UDP, CLIENT.into(), 5003, VIP.into(), VPORT, 0),
        );
        let t = dp.nat_tables().unwrap();
        assert_eq!((t.flows_v4.len(), t.replies_v4.len()), (3, 3));
        assert!(t.flows_v4.iter().all(|(_, s)| s.last_seen == t0));

        let sports = |c: &mut Control<NoProbes>| -> (Vec<u16>, usize, usize) {
            let t = c.dataplane().nat_tables().unwrap();
            let mut s: Vec<u16> = t
                .flows_v4
                .iter()
                .map(|(k, _)| u16::from_be(k.sport))
                .collect();
            s.sort_unstable();
            (s, t.replies_v4.len(), t.flows_v6.len() + t.replies_v6.len())
        };
        control.sweep_nat_at(t0 + 9);
        assert_eq!(
            sports(&mut control),
            (vec![5000, 5001, 5003], 3, 2),
            "nothing idle yet"
        );
        control.sweep_nat_at(t0 + 10);
        assert_eq!(
            sports(&mut control),
            (vec![5001, 5003], 2, 2),
            "the closed pair went"
        );
        control.sweep_nat_at(t0 + 30);
        assert_eq!(
            sports(&mut control),
            (vec![5001], 1, 2),
            "the idle UDP pair went"
        );
        control.sweep_nat_at(t0 + 299);
        assert_eq!(sports(&mut control), (vec![], 0, 0), "idle TCP pairs went");
    });
}

#[test]
fn a_packet_whose_ttl_runs_out_goes_to_the_kernel_untranslated() {
    in_netns(|| {
        let mut bed = Bed::one_arm();
        for (v6, proto) in CASES {
            bed.service(v6, proto, FORWARD_NAT, 0, &[1]);
            let mut sent = frame(proto, client(v6), 5100, vip(v6), VPORT, SYN);
            let v = View::of(&sent);
            // TTL / hop limit 1: forwarding it would make it 0.
            sent[v.l3 + if v6 { 7 } else { 8 }] = 1;
            let before = bed.reason(Reason::PassToKernel);
            let client_if = bed.client_if;
            let (verdict, out) = bed.run_on(client_if, &sent);
            assert_eq!(verdict, XDP_PASS, "v6={v6} proto={proto}");
            assert_eq!(&out[..sent.len()], &sent[..], "passed as received");
            assert_eq!(bed.reason(Reason::PassToKernel), before + 1);
        }
    });
}
