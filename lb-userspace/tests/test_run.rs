//! The loaded XDP program, run by the kernel with `BPF_PROG_TEST_RUN`: crafted frames in, verdict
//! and bytes out. One call per packet (repeat = 1), because with repeat > 1 the kernel reruns the
//! program on the frame it already rewrote. Needs root (loading BPF).

mod packet;

use std::net::Ipv4Addr;

use aya::{TestRun as _, TestRunOptions};
use lb_common::{
    AF_INET, BACKEND_F_ALIVE, BACKEND_NONE, Backend, FlowKeyV4, RING_SIZE, Reason, Service,
    ServiceKeyV4, flow_table::SlotKey as _, hash::flow_hash_v4, names,
};
use lb_userspace::{
    daemon::ipv6_words,
    dataplane::{Dataplane, ServiceKey, Sizing},
    pins::PinDir,
};
use packet::{CLIENT_MAC, Frame, Frame6, LB_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
/// TCP flags: a connection's later packets carry ACK (a SYN opens a new connection).
const ACK: u8 = 0x10;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn mac_of(id: u32) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, id as u8 + 1]
}

/// A loaded balancer with small maps and helpers to configure it as the daemon would.
struct Harness {
    dp: Dataplane,
}

/// The maps of `Harness`.
const SIZING: Sizing = Sizing {
    max_services: 4,
    max_backends: 16,
    conntrack_size: 4096,
    nat_size: 1024,
};

impl Harness {
    fn new() -> Self {
        Self::loaded(None)
    }

    /// With the maps pinned in `pins` (those already there reused).
    fn loaded(pins: Option<&PinDir>) -> Self {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "BPF_PROG_TEST_RUN tests need root (run them through the README test command)"
        );
        let mut dp = match pins {
            Some(pins) => Dataplane::load_pinned(SIZING, false, pins),
            None => Dataplane::load(SIZING, false),
        }
        .expect("load the XDP object");
        dp.program(names::PROG_BALANCER)
            .expect("verifier accepts the balancer");
        Harness { dp }
    }

    fn backend(&mut self, id: u32, generation: u32, alive: bool) {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[10, 99, 0, 11 + id as u8]);
        let (forward, service) = packet::owner_of(&self.dp, id);
        self.dp
            .set_backend(
                id,
                Backend {
                    addr,
                    mac: mac_of(id),
                    port: 80u16.to_be(),
                    generation,
                    flags: if alive { BACKEND_F_ALIVE } else { 0 },
                    family: AF_INET,
                    forward,
                    _pad: 0,
                    service,
                },
            )
            .unwrap();
    }

    /// Service `id` on VIP:port/proto using ring table `ring`, filled round-robin with `ids`.
    fn service(&mut self, id: u32, ring: u32, port: u16, proto: u8, ids: &[u32]) {
        self.service_sched(id, ring, port, proto, ids, lb_common::SCHED_MAGLEV);
    }

    fn service_sched(&mut self, id: u32, ring: u32, port: u16, proto: u8, ids: &[u32], sched: u8) {
        let key = ServiceKey::V4(ServiceKeyV4 {
            addr: u32::from_ne_bytes(VIP.octets()),
            port: port.to_be(),
            proto,
            _pad: 0,
        });
        self.install(key, id, ring, ids, sched);
    }

    /// Writes ring table `ring` filled round-robin with `ids` (empty: no backend) and points
    /// service `key` (id `id`) at it.
    fn install(&mut self, key: ServiceKey, id: u32, ring: u32, ids: &[u32], sched: u8) {
        let table: Vec<u32> = (0..RING_SIZE as usize)
            .map(|i| {
                if ids.is_empty() {
                    BACKEND_NONE
                } else {
                    ids[i % ids.len()]
                }
            })
            .collect();
        self.dp.write_ring(ring, &table).unwrap();
        let service = Service {
            id,
            ring,
            forward: lb_common::FORWARD_DSR,
            scheduler: sched,
            flags: 0,
            _pad: 0,
        };
        packet::own_backends(&mut self.dp, ids, id, service.forward);
        self.dp.set_service(key, service).unwrap();
    }

    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.program(names::PROG_BALANCER).unwrap();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Runs a frame the program must forward; returns the backend id whose MAC it got.
    fn forwarded_to(&mut self, frame: &[u8]) -> u32 {
        let (verdict, out) = self.run(frame);
        assert_eq!(verdict, XDP_TX, "expected XDP_TX");
        assert_eq!(out.len(), frame.len());
        assert_eq!(&out[6..12], &LB_MAC, "source MAC becomes the balancer's");
        assert_eq!(&out[12..], &frame[12..], "nothing but the MACs changes");
        (0..16)
            .find(|id| out[0..6] == mac_of(*id))
            .expect("destination MAC is a backend's")
    }

    fn reason(&self, reason: Reason) -> u64 {
        self.dp.reason_counts().unwrap()[reason as usize]
    }
}

fn tcp(sport: u16) -> Frame {
    Frame::tcp(CLIENT, sport, VIP, 80)
}

#[test]
fn vip_packet_gets_backend_mac_and_nothing_else_changes() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let frame = tcp(40000).build();
    assert_eq!(h.forwarded_to(&frame), 0);
    assert_eq!(h.reason(Reason::Forwarded), 1);
    let t = h.dp.service_traffic(0).unwrap();
    assert_eq!((t.packets, t.bytes), (1, frame.len() as u64));
    let t = h.dp.backend_traffic(0).unwrap();
    assert_eq!((t.packets, t.bytes, t.flows), (1, frame.len() as u64, 1));
    // The same flow again: a packet more, no new flow.
    h.forwarded_to(&tcp(40000).tcp_flags(ACK).build());
    let t = h.dp.service_traffic(0).unwrap();
    assert_eq!((t.packets, t.flows), (2, 1));
}

#[test]
fn backend_choice_follows_the_flow_hash_into_the_ring() {
    let mut h = Harness::new();
    for id in 0..4 {
        h.backend(id, 1, true);
    }
    h.service(0, 1, 80, 6, &[0, 1, 2, 3]);
    let mut seen = [0; 4];
    for sport in 1000..1200u16 {
        let got = h.forwarded_to(&tcp(sport).build());
        let hash = flow_hash_v4(
            u32::from_ne_bytes(CLIENT.octets()),
            u32::from_ne_bytes(VIP.octets()),
            sport.to_be(),
            80u16.to_be(),
            6,
        );
        // The table is filled round-robin, so entry i holds backend i % 4.
        assert_eq!(got, (hash % RING_SIZE) % 4, "sport {sport}");
        seen[got as usize] += 1;
    }
    assert!(seen.iter().all(|n| *n > 20), "flows spread: {seen:?}");
}

#[test]
fn packets_not_for_a_vip_pass_untouched() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let cases = [
        (
            Frame::tcp(CLIENT, 1, Ipv4Addr::new(10, 99, 0, 2), 80).build(),
            Reason::PassNotVip,
        ),
        (Frame::tcp(CLIENT, 1, VIP, 443).build(), Reason::PassNotVip),
        (Frame::udp(CLIENT, 1, VIP, 80).build(), Reason::PassNotVip),
        (
            Frame::tcp(CLIENT, 1, VIP, 80).protocol(1).build(),
            Reason::PassNotTcpUdp,
        ),
        (Frame::arp(), Reason::PassNotIp),
        (Frame::ipv6(), Reason::PassNotVip),
        (
            {
                // A VLAN ethertype with no room for the tag (the kernel needs 14 bytes at least).
                let mut f = tcp(1).build()[..14].to_vec();
                f[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
                f
            },
            Reason::PassShortL2,
        ),
    ];
    for (frame, reason) in cases {
        let before = h.reason(reason);
        let (verdict, out) = h.run(&frame);
        assert_eq!(verdict, XDP_PASS, "{reason:?}");
        assert_eq!(out, frame, "{reason:?}: bytes untouched");
        assert_eq!(h.reason(reason), before + 1, "{reason:?} counted");
    }
}

#[test]
fn fragments_pass_and_are_never_forwarded() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    for frags in [0x2000u16, 0x0010, 0x2010] {
        let frame = tcp(5).frags(frags).build();
        let (verdict, out) = h.run(&frame);
        assert_eq!(verdict, XDP_PASS, "frags {frags:#x}");
        assert_eq!(out, frame);
    }
    assert_eq!(h.reason(Reason::PassFragment), 3);
    // Don't-fragment is not a fragment.
    assert_eq!(h.forwarded_to(&tcp(5).frags(0x4000).build()), 0);
}

#[test]
fn malformed_headers_are_dropped_and_counted() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let good = tcp(7).build();
    let ip_cases: Vec<(&str, Vec<u8>)> = vec![
        ("IP header cut short", good[..14 + 12].to_vec()),
        ("version 6 in an IPv4 ethertype", patch(&good, 14, 0x65)),
        ("IHL below 5", patch(&good, 14, 0x44)),
        ("IHL beyond the frame", {
            let f = patch(&good, 14, 0x4f);
            f[..14 + 40].to_vec()
        }),
        ("total length beyond the frame", patch(&good, 16, 0x7f)),
        ("total length below the header", patch2(&good, 16, 10)),
    ];
    for (what, frame) in ip_cases {
        let (verdict, _) = h.run(&frame);
        assert_eq!(verdict, XDP_DROP, "{what}");
    }
    assert_eq!(h.reason(Reason::DropMalformedIp), 6);

    let l4_cases: Vec<(&str, Vec<u8>)> = vec![
        ("TCP header cut short", {
            let mut f = good[..14 + 20 + 10].to_vec();
            f[16..18].copy_from_slice(&30u16.to_be_bytes());
            f
        }),
        (
            "TCP header beyond the IP total length",
            patch2(&good, 16, 20 + 10),
        ),
        ("UDP header cut short", {
            let u = Frame::udp(CLIENT, 9, VIP, 53).build();
            let mut f = u[..14 + 20 + 4].to_vec();
            f[16..18].copy_from_slice(&24u16.to_be_bytes());
            f
        }),
    ];
    for (what, frame) in l4_cases {
        let (verdict, _) = h.run(&frame);
        assert_eq!(verdict, XDP_DROP, "{what}");
    }
    assert_eq!(h.reason(Reason::DropMalformedL4), 3);
    assert_eq!(h.reason(Reason::Forwarded), 0);
}

fn patch(frame: &[u8], at: usize, byte: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[at] = byte;
    f
}

fn patch2(frame: &[u8], at: usize, value: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[at..at + 2].copy_from_slice(&value.to_be_bytes());
    f
}

#[test]
fn vlan_tagged_ip_options_and_padded_frames_are_balanced() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    h.service(1, 1, 53, 17, &[0]);
    assert_eq!(h.forwarded_to(&tcp(1).vlan(42).build()), 0);
    assert_eq!(h.forwarded_to(&tcp(2).ip_options(12).build()), 0);
    assert_eq!(h.forwarded_to(&tcp(3).vlan(7).ip_options(40).build()), 0);
    assert_eq!(h.forwarded_to(&tcp(4).trailer(20).build()), 0);
    assert_eq!(h.forwarded_to(&Frame::udp(CLIENT, 5, VIP, 53).build()), 0);
    assert_eq!(h.dp.service_traffic(1).unwrap().packets, 1);
}

#[test]
fn a_service_without_backends_drops() {
    let mut h = Harness::new();
    h.service(0, 0, 80, 6, &[]);
    let (verdict, _) = h.run(&tcp(1).build());
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.reason(Reason::DropNoBackend), 1);
}

#[test]
fn established_flows_keep_their_backend_when_the_table_changes() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let flows: Vec<Vec<u8>> = (100..150).map(|p| tcp(p).build()).collect();
    for f in &flows {
        assert_eq!(h.forwarded_to(f), 0);
    }
    // New table (in the spare ring, switched in one update) sends everything to backend 1.
    h.service(0, 1, 80, 6, &[1]);
    for p in 100..150 {
        let f = tcp(p).tcp_flags(ACK).build();
        assert_eq!(h.forwarded_to(&f), 0, "established flow moved");
    }
    assert_eq!(
        h.forwarded_to(&tcp(999).build()),
        1,
        "new flow uses the new table"
    );

    // Backend 0 fails: its flows move to a live backend.
    h.backend(0, 1, false);
    for f in &flows {
        assert_eq!(h.forwarded_to(f), 1, "flow of a dead backend not moved");
    }
}

#[test]
fn a_reused_backend_id_does_not_inherit_old_flows() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let flow = tcp(4242).build();
    assert_eq!(h.forwarded_to(&flow), 0);
    let key = key_of(4242);
    assert_eq!(
        h.dp.flow(&key).map(|s| (s.backend, s.generation)),
        Some((0, 1))
    );
    // Id 0 now names another backend (generation 2); the table points at backend 1. The
    // flow's next packet (an ACK: looked up, not placed as a SYN is) finds its entry stale.
    h.backend(0, 2, true);
    h.service(0, 1, 80, 6, &[1]);
    assert_eq!(
        h.dp.flow(&key),
        None,
        "the entry names the id's earlier holder"
    );
    assert_eq!(h.forwarded_to(&tcp(4242).tcp_flags(ACK).build()), 1);
    assert_eq!(h.dp.flow(&key).map(|s| s.backend), Some(1));
}

/// The connection-table key of `tcp(sport)`.
fn key_of(sport: u16) -> FlowKeyV4 {
    FlowKeyV4 {
        src: u32::from_ne_bytes(CLIENT.octets()),
        dst: u32::from_ne_bytes(VIP.octets()),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        _pad0: 0,
        _pad1: 0,
    }
}

/// `n` client ports whose flows share one set of the connection table.
fn ports_of_one_set(h: &mut Harness, n: usize) -> Vec<u16> {
    let table = h.dp.flow_table();
    let set = table.set_index(&key_of(1000));
    let ports: Vec<u16> = (1000..u16::MAX)
        .filter(|p| table.set_index(&key_of(*p)) == set)
        .take(n)
        .collect();
    assert_eq!(ports.len(), n);
    ports
}

#[test]
fn a_full_set_gives_up_its_stalest_flow_and_keeps_the_others() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let ports = ports_of_one_set(&mut h, lb_common::FLOW_WAYS + 2);
    // Four flows fill the set, seen at ticks 10..13.
    for (tick, &p) in (10..).zip(&ports[..4]) {
        h.dp.set_clock(tick).unwrap();
        assert_eq!(h.forwarded_to(&tcp(p).build()), 0);
    }
    // The ring now says backend 1: a flow placed again shows it.
    h.service(0, 1, 80, 6, &[1]);
    h.dp.set_clock(20).unwrap();
    assert_eq!(h.forwarded_to(&tcp(ports[4]).build()), 1);
    assert_eq!(
        h.dp.flow(&key_of(ports[0])),
        None,
        "the stalest flow made room"
    );
    for &p in &ports[1..5] {
        assert!(h.dp.flow(&key_of(p)).is_some(), "port {p} kept its entry");
    }
    for &p in &ports[1..4] {
        assert_eq!(
            h.forwarded_to(&tcp(p).tcp_flags(ACK).build()),
            0,
            "port {p} moved"
        );
    }
    // A closed flow goes before an open one, however recent.
    h.forwarded_to(&tcp(ports[3]).tcp_flags(ACK | 0x01).build());
    h.forwarded_to(&tcp(ports[5]).build());
    assert_eq!(
        h.dp.flow(&key_of(ports[3])),
        None,
        "the closed flow made room"
    );
    assert!(h.dp.flow(&key_of(ports[1])).is_some());
    // The evicted open flow is placed again by the ring.
    assert_eq!(h.forwarded_to(&tcp(ports[0]).tcp_flags(ACK).build()), 1);
}

/// The multiplicative inverse of an odd `k` modulo 2^32 (Newton's iteration).
fn inverse(k: u32) -> u32 {
    let mut x = k;
    for _ in 0..5 {
        x = x.wrapping_mul(2u32.wrapping_sub(k.wrapping_mul(x)));
    }
    x
}

#[test]
fn one_client_port_keeps_a_flow_to_each_service_even_of_equal_table_hash() {
    // A way holds only the client's address and port: flows of one client port to two
    // services must each find their own way. Service 1's VIP is chosen so both flows have the
    // same table hash (the hash is a sum of each word times a constant): one set, and equal
    // seals for equal backends, so only the check of the backend's service tells them apart.
    let mut h = Harness::new();
    for id in 0..4 {
        h.backend(id, 1, true);
    }
    h.service(0, 0, 80, 6, &[0]);
    let [_, k1, k2, ..] = lb_common::hash::TABLE_K;
    let vip0 = u32::from_ne_bytes(VIP.octets());
    let ports = |dport: u16| u32::from(777u16.to_be()) | u32::from(dport.to_be()) << 16;
    let vip1 = vip0
        .wrapping_add(inverse(k1).wrapping_mul(ports(80).wrapping_sub(ports(81)).wrapping_mul(k2)));
    let key1 = ServiceKey::V4(ServiceKeyV4 {
        addr: vip1,
        port: 81u16.to_be(),
        proto: 6,
        _pad: 0,
    });
    h.install(key1, 1, 1, &[1], lb_common::SCHED_MAGLEV);
    let flow0 = key_of(777);
    let flow1 = FlowKeyV4 {
        dst: vip1,
        dport: 81u16.to_be(),
        ..flow0
    };
    assert_eq!(flow0.table_hash(), flow1.table_hash(), "the test's premise");
    let to1 = || Frame::tcp(CLIENT, 777, Ipv4Addr::from(vip1.to_ne_bytes()), 81);
    assert_eq!(h.forwarded_to(&tcp(777).build()), 0);
    assert_eq!(h.forwarded_to(&to1().build()), 1);
    // New tables: both flows keep their backends, each through its own way.
    h.service(0, 2, 80, 6, &[2]);
    h.install(key1, 1, 3, &[3], lb_common::SCHED_MAGLEV);
    for _ in 0..2 {
        assert_eq!(h.forwarded_to(&tcp(777).tcp_flags(ACK).build()), 0);
        assert_eq!(h.forwarded_to(&to1().tcp_flags(ACK).build()), 1);
    }
    assert_eq!(h.dp.flow(&flow0).map(|s| s.backend), Some(0));
    assert_eq!(h.dp.flow(&flow1).map(|s| s.backend), Some(1));
    // A SYN placing flow 1 again takes its own way, not flow 0's.
    assert_eq!(h.forwarded_to(&to1().build()), 3);
    assert_eq!(h.forwarded_to(&tcp(777).tcp_flags(ACK).build()), 0);
    assert_eq!(h.forwarded_to(&to1().tcp_flags(ACK).build()), 3);
}

#[test]
fn a_torn_entry_is_placed_again_never_followed() {
    let mut h = Harness::new();
    for id in 0..3 {
        h.backend(id, 1, true);
    }
    h.service(0, 0, 80, 6, &[0]);
    assert_eq!(h.forwarded_to(&tcp(777).build()), 0);
    // Another CPU's half-done write: backend 1 in the way, the seal still backend 0's.
    let key = key_of(777);
    let table = h.dp.flow_table();
    let i = table.set_index(&key);
    let mut set = table.set(i);
    let way = set
        .ways
        .iter()
        .position(|w| w.has_client(&key))
        .expect("the flow's way");
    set.ways[way].id_low = 1;
    table.put_set(i, set);
    h.service(0, 1, 80, 6, &[2]);
    assert_eq!(
        h.forwarded_to(&tcp(777).tcp_flags(ACK).build()),
        2,
        "the flow went to the torn entry's backend instead of being placed again"
    );
    let state = h.dp.flow(&key).expect("entered again");
    assert_eq!((state.backend, state.generation), (2, 1));
    assert_eq!(h.forwarded_to(&tcp(777).tcp_flags(ACK).build()), 2);
}

/// A pin directory on the root namespace's bpffs, removed on drop.
struct TempPins(PinDir);

impl Drop for TempPins {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

/// Runs bpftool (scripts/setup.sh installs it) and checks it succeeded.
fn bpftool(args: &[&str]) {
    let status = std::process::Command::new("bpftool")
        .args(args)
        .status()
        .expect("bpftool (scripts/setup.sh installs it)");
    assert!(status.success(), "bpftool {args:?}");
}

/// Creates the map `name` pinned at `path` as an older build left it, holding `key` → `value`.
fn pin_older_map(path: &std::path::Path, spec: &[&str], name: &str, key: &[u8], value: &[u8]) {
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
    };
    let path = path.to_str().unwrap();
    let mut create = vec!["map", "create", path];
    create.extend(spec);
    create.extend(["name", name]);
    bpftool(&create);
    let (key, value) = (hex(key), hex(value));
    let mut update = vec!["map", "update", "pinned", path, "key"];
    update.extend(key.iter().map(String::as_str));
    update.push("value");
    update.extend(value.iter().map(String::as_str));
    bpftool(&update);
}

/// The bytes of flow 10.99.0.1:555 → VIP:80/tcp as a key of the older tables.
fn older_key() -> Vec<u8> {
    let mut key = CLIENT.octets().to_vec();
    key.extend(VIP.octets());
    key.extend(555u16.to_be_bytes());
    key.extend(80u16.to_be_bytes());
    key.extend([6, 0, 0, 0]);
    key
}

/// Loads a balancer over `pins` (an older table pinned there as `legacy`), with backends 0
/// and 1 and the ring on 0; checks flow 555 of the older table is carried over on backend 1
/// and the older table unpinned.
fn check_carried(pins: &TempPins, legacy: &std::path::Path) {
    let mut h = Harness::loaded(Some(&pins.0));
    h.backend(0, 1, true);
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    packet::own_backends(&mut h.dp, &[1], 0, lb_common::FORWARD_DSR);
    assert_eq!(h.dp.carry_legacy_flows(&pins.0, true).unwrap(), 1);
    assert!(!legacy.exists(), "the older table is unpinned once carried");
    let state = h.dp.flow(&key_of(555)).expect("carried into the new table");
    assert_eq!((state.backend, state.generation), (1, 1));
    assert_eq!(
        h.forwarded_to(&tcp(555).tcp_flags(ACK).build()),
        1,
        "the carried flow keeps its backend (the ring says 0)"
    );
    assert_eq!(h.forwarded_to(&tcp(556).tcp_flags(ACK).build()), 0);
    assert_eq!(
        h.dp.carry_legacy_flows(&pins.0, true).unwrap(),
        0,
        "nothing left"
    );
}

fn temp_pins(what: &str) -> TempPins {
    let dir =
        std::path::PathBuf::from(format!("/sys/fs/bpf/lb-test-{what}-{}", std::process::id()));
    TempPins(PinDir::open(&dir).expect("a bpffs on /sys/fs/bpf"))
}

#[test]
fn flows_of_an_older_builds_lru_table_are_carried_over() {
    let pins = temp_pins("carry-lru");
    // What a build with the kernel's LRU connection table left pinned: flow 555 on backend 1
    // of generation 1.
    let legacy = pins.0.map_path(names::LEGACY_CONNTRACK);
    let mut value = 1u32.to_ne_bytes().to_vec(); // backend
    value.extend(1u32.to_ne_bytes()); // generation
    value.extend([0; 8]); // last seen, flags, NAT port
    let spec = [
        "type", "lru_hash", "key", "16", "value", "16", "entries", "1024",
    ];
    pin_older_map(&legacy, &spec, "CONNTRACK", &older_key(), &value);
    check_carried(&pins, &legacy);
}

#[test]
fn flows_of_an_older_builds_table_of_whole_5_tuples_are_carried_over() {
    let pins = temp_pins("carry-sets");
    // What a build whose ways held the whole 5-tuple (32 bytes, sets of 128) left pinned: flow
    // 555 on backend 1 of generation 1, in the set its table hash names in 1024 sets.
    let legacy = pins.0.map_path(names::LEGACY_FLOW_TABLE);
    let hash = key_of(555).table_hash();
    let mut set = older_key(); // way 0: the 5-tuple,
    set.extend(1u32.to_ne_bytes()); // backend,
    set.extend(0u32.to_ne_bytes()); // last seen,
    set.extend(0u32.to_ne_bytes()); // flags and padding,
    set.extend(lb_common::flow_seal(hash, 1, 1).to_ne_bytes()); // seal;
    set.resize(128, 0); // ways 1-3 free.
    let index = (hash & 1023).to_ne_bytes();
    let spec = [
        "type", "array", "key", "4", "value", "128", "entries", "1024", "flags", "1024",
    ];
    pin_older_map(&legacy, &spec, "FLOW_TABLE", &index, &set);
    check_carried(&pins, &legacy);
}

#[test]
fn the_source_mac_is_the_frames_destination() {
    let mut h = Harness::new();
    h.backend(3, 1, true);
    h.service(0, 0, 80, 6, &[3]);
    let frame = tcp(1).build();
    assert_eq!(&frame[0..6], &LB_MAC);
    assert_eq!(&frame[6..12], &CLIENT_MAC);
    let (_, out) = h.run(&frame);
    assert_eq!(&out[0..6], &mac_of(3));
    assert_eq!(&out[6..12], &LB_MAC);
}

#[test]
fn the_debug_logging_build_passes_the_verifier_and_forwards() {
    let mut dp = Dataplane::load(
        Sizing {
            max_services: 2,
            max_backends: 4,
            conntrack_size: 1024,
            nat_size: 1024,
        },
        true,
    )
    .expect("load with --debug-packets");
    // The program logs into a map that needs its reader set up before the program loads.
    let _logger = aya_log::EbpfLogger::init(dp.ebpf_mut()).expect("logger");
    let mut h = Harness { dp };
    h.dp.program(names::PROG_BALANCER)
        .expect("verifier accepts the logging build");
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[1]);
    assert_eq!(h.forwarded_to(&tcp(1).build()), 1);
}

#[test]
fn tables_written_through_memory_read_back_through_the_map() {
    // The ring map is written with a memory copy; the kernel's view must match it entry for
    // entry, including the last entry of a table and the first of the next.
    let mut h = Harness::new();
    let table: Vec<u32> = (0..RING_SIZE)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    h.dp.write_ring(1, &table).unwrap();
    h.dp.write_ring(2, &vec![7; RING_SIZE as usize]).unwrap();
    for i in [0, 1, 15, 16, 17, 4095, 65520, RING_SIZE - 2, RING_SIZE - 1] {
        assert_eq!(
            h.dp.ring_entry(1, i).unwrap(),
            table[i as usize],
            "entry {i}"
        );
    }
    assert_eq!(h.dp.ring_entry(2, 0).unwrap(), 7);
    assert_eq!(
        h.dp.ring_entry(0, RING_SIZE - 1).unwrap(),
        0,
        "table 0 untouched"
    );
}

#[test]
fn source_hash_sends_every_connection_of_a_client_to_one_backend() {
    let mut h = Harness::new();
    for id in 0..4 {
        h.backend(id, 1, true);
    }
    h.service_sched(0, 0, 80, 6, &[0, 1, 2, 3], lb_common::SCHED_SOURCE_HASH);
    let mut seen = std::collections::BTreeSet::new();
    for client in 1..=40u8 {
        let src = Ipv4Addr::new(10, 99, 1, client);
        let first = h.forwarded_to(&Frame::tcp(src, 1000, VIP, 80).build());
        for sport in 1001..1010 {
            assert_eq!(
                h.forwarded_to(&Frame::tcp(src, sport, VIP, 80).build()),
                first,
                "client {src} moved"
            );
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 4, "clients spread over every backend");
}

#[test]
fn round_robin_gives_new_flows_to_backends_in_turn() {
    packet::pin_to_cpu0();
    let mut h = Harness::new();
    for id in 0..3 {
        h.backend(id, 1, true);
    }
    h.service_sched(0, 0, 80, 6, &[0, 1, 2], lb_common::SCHED_ROUND_ROBIN);
    let got: Vec<u32> = (0..9)
        .map(|p| h.forwarded_to(&tcp(2000 + p).build()))
        .collect();
    assert_eq!(got, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    // An established flow does not take a turn, even with a SYN (a retransmission): round
    // robin looks a SYN up before placing it, so it is not placed or counted twice.
    assert_eq!(h.forwarded_to(&tcp(2000).build()), 0);
    assert_eq!(h.forwarded_to(&tcp(3000).build()), 0);
    assert_eq!(h.dp.flow_count(0).unwrap(), 4);
    assert_eq!(h.dp.backend_traffic(0).unwrap().flows, 4);
}

#[test]
fn a_syn_is_placed_by_the_ring_and_the_packets_after_it_follow_the_table() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    assert_eq!(h.forwarded_to(&tcp(7000).build()), 0);
    h.service(0, 1, 80, 6, &[1]);
    // The connection's later packets keep its backend. A SYN opens a connection: Maglev
    // places it by the ring without a look in the table (a retransmitted SYN's half-open
    // connection moves when the ring changed in between), and the packets after it follow.
    assert_eq!(h.forwarded_to(&tcp(7000).tcp_flags(ACK).build()), 0);
    assert_eq!(h.forwarded_to(&tcp(7000).build()), 1);
    assert_eq!(h.forwarded_to(&tcp(7000).tcp_flags(ACK).build()), 1);
    assert_eq!(h.dp.backend_traffic(1).unwrap().flows, 1);
}

#[test]
fn least_conn_picks_the_backend_with_fewest_open_flows() {
    let mut h = Harness::new();
    for id in 0..3 {
        h.backend(id, 1, true);
    }
    h.service_sched(0, 0, 80, 6, &[0, 1, 2], lb_common::SCHED_LEAST_CONN);
    let mut list = lb_common::LcList {
        len: 3,
        _pad: 0,
        ids: [BACKEND_NONE; lb_common::LC_MAX_BACKENDS as usize],
        weights: [0; lb_common::LC_MAX_BACKENDS as usize],
    };
    list.ids[..3].copy_from_slice(&[0, 1, 2]);
    list.weights[..3].copy_from_slice(&[1, 1, 2]);
    h.dp.write_lc_list(0, &list).unwrap();
    // Weights 1:1:2 and nothing open: 8 new flows land 2:2:4.
    let mut placed = Vec::new();
    for p in 0..8u16 {
        placed.push((4000 + p, h.forwarded_to(&tcp(4000 + p).build())));
    }
    let counts: Vec<i64> = (0..3).map(|id| h.dp.flow_count(id).unwrap()).collect();
    assert_eq!(counts, vec![2, 2, 4], "{placed:?}");
    // Backend 0's flows end (FIN, then RST: counted once): new flows go there first.
    for (sport, backend) in &placed {
        if *backend == 0 {
            h.forwarded_to(&tcp(*sport).tcp_flags(0x11).build());
            h.forwarded_to(&tcp(*sport).tcp_flags(0x04).build());
        }
    }
    assert_eq!(h.dp.flow_count(0).unwrap(), 0);
    assert_eq!(h.forwarded_to(&tcp(5000).build()), 0);
    assert_eq!(h.forwarded_to(&tcp(5001).build()), 0);
    assert_eq!(h.dp.flow_count(0).unwrap(), 2);
}

#[test]
fn a_closed_flow_reopened_by_a_syn_counts_again() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    h.forwarded_to(&tcp(6000).build());
    h.forwarded_to(&tcp(6000).tcp_flags(0x10).build());
    assert_eq!(h.dp.flow_count(0).unwrap(), 1);
    h.forwarded_to(&tcp(6000).tcp_flags(0x11).build());
    h.forwarded_to(&tcp(6000).tcp_flags(0x10).build());
    assert_eq!(h.dp.flow_count(0).unwrap(), 0, "FIN closes it once");
    h.forwarded_to(&tcp(6000).build());
    assert_eq!(
        h.dp.flow_count(0).unwrap(),
        1,
        "a new SYN on the same 5-tuple reopens it"
    );
}

const VIP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);

impl Harness {
    /// An IPv6 service on VIP6:port/proto using ring table `ring` filled with `ids`.
    fn service6(&mut self, id: u32, ring: u32, port: u16, proto: u8, ids: &[u32]) {
        let key = ServiceKey::V6(lb_common::ServiceKeyV6 {
            addr: ipv6_words(&VIP6),
            port: port.to_be(),
            proto,
            _pad: 0,
        });
        self.install(key, id, ring, ids, lb_common::SCHED_MAGLEV);
    }
}

fn tcp6(sport: u16) -> Frame6 {
    Frame6::tcp(CLIENT6, sport, VIP6, 80)
}

#[test]
fn ipv6_vip_packets_are_balanced_with_only_the_macs_changed() {
    let mut h = Harness::new();
    for id in 0..3 {
        h.backend(id, 1, true);
    }
    h.service6(0, 0, 80, 6, &[0, 1, 2]);
    let mut seen = [0; 3];
    for sport in 1000..1150u16 {
        let got = h.forwarded_to(&tcp6(sport).build());
        let hash = lb_common::hash::flow_hash_v6(
            &ipv6_words(&CLIENT6),
            &ipv6_words(&VIP6),
            sport.to_be(),
            80u16.to_be(),
            6,
        );
        assert_eq!(got, (hash % RING_SIZE) % 3, "sport {sport}");
        seen[got as usize] += 1;
    }
    assert!(seen.iter().all(|n| *n > 20), "{seen:?}");
    // Sticky like IPv4: a new table does not move established flows.
    let ack = |p| tcp6(p).tcp_flags(ACK).build();
    let before: Vec<u32> = (1000..1050u16).map(|p| h.forwarded_to(&ack(p))).collect();
    h.service6(0, 1, 80, 6, &[2]);
    for (p, b) in (1000..1050u16).zip(before) {
        assert_eq!(h.forwarded_to(&ack(p)), b, "flow {p} moved");
    }
    assert_eq!(
        h.forwarded_to(&tcp6(5000).build()),
        2,
        "new flows use the new table"
    );
    // UDP to the same VIP and port is another service (none here): passed.
    assert_eq!(
        h.run(&Frame6::udp(CLIENT6, 1, VIP6, 80).build()).0,
        XDP_PASS
    );
}

#[test]
fn ipv6_extension_headers_are_walked_and_fragments_pass() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service6(0, 0, 80, 6, &[0]);
    assert_eq!(h.forwarded_to(&tcp6(1).ext(0, 0).build()), 0, "hop-by-hop");
    assert_eq!(
        h.forwarded_to(&tcp6(2).ext(60, 1).ext(43, 0).build()),
        0,
        "dst opts + routing"
    );
    let frag = tcp6(3).ext(44, 0).build();
    let (verdict, out) = h.run(&frag);
    assert_eq!((verdict, out), (XDP_PASS, frag), "fragments pass untouched");
    assert_eq!(h.reason(Reason::PassFragment), 1);
    // Five extension headers: beyond the walk, passed (not forwarded, not dropped).
    let long = tcp6(4)
        .ext(60, 0)
        .ext(60, 0)
        .ext(60, 0)
        .ext(60, 0)
        .ext(60, 0)
        .build();
    assert_eq!(h.run(&long).0, XDP_PASS);
    // Not a VIP, and a VIP on another port: passed.
    let other = Frame6::tcp(CLIENT6, 5, CLIENT6, 80).build();
    assert_eq!(h.run(&other).0, XDP_PASS);
    assert_eq!(h.run(&tcp6(6).build()).0, XDP_TX);
}

#[test]
fn malformed_ipv6_is_dropped() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.service6(0, 0, 80, 6, &[0]);
    let good = tcp6(1).build();
    let cut_ip = good[..14 + 30].to_vec();
    let long_payload = patch2(&good, 14 + 4, 4000);
    let mut cut_tcp = good[..14 + 40 + 10].to_vec();
    cut_tcp[18..20].copy_from_slice(&10u16.to_be_bytes());
    let bad_version = patch(&good, 14, 0x40);
    for (what, frame, reason) in [
        ("IPv6 header cut short", cut_ip, Reason::DropMalformedIp),
        (
            "payload length beyond the frame",
            long_payload,
            Reason::DropMalformedIp,
        ),
        ("TCP header cut short", cut_tcp, Reason::DropMalformedL4),
        (
            "version 4 in an IPv6 ethertype",
            bad_version,
            Reason::DropMalformedIp,
        ),
    ] {
        let before = h.reason(reason);
        assert_eq!(h.run(&frame).0, XDP_DROP, "{what}");
        assert_eq!(h.reason(reason), before + 1, "{what} counted");
    }
}

#[test]
fn the_vip_filter_follows_service_adds_and_removals_also_for_keys_sharing_a_bit() {
    let mut h = Harness::new();
    h.backend(0, 1, true);
    h.backend(1, 1, true);
    h.service(0, 0, 80, 6, &[0]);
    let ours = ServiceKey::new(VIP.into(), 80, 6);
    // Another service whose key sets the same filter bit (searched over VIPs and ports).
    let twin = (1..=255u8)
        .flat_map(|last| (1..=u16::MAX).map(move |port| (last, port)))
        .map(|(last, port)| ServiceKey::new(Ipv4Addr::new(10, 201, 0, last).into(), port, 6))
        .find(|k| k.filter_bit() == ours.filter_bit())
        .expect("a key sharing the filter bit");
    h.install(twin, 1, 1, &[1], lb_common::SCHED_MAGLEV);
    let ServiceKey::V4(t) = twin else {
        unreachable!("an IPv4 key")
    };
    let twin_frame = |sport| {
        let dst = Ipv4Addr::from(t.addr.to_ne_bytes());
        Frame::tcp(CLIENT, sport, dst, u16::from_be(t.port)).build()
    };
    assert_eq!(h.forwarded_to(&tcp(1).build()), 0);
    assert_eq!(h.forwarded_to(&twin_frame(2)), 1);

    // The twin goes; the bit stays for ours, whose new flows are still balanced.
    h.dp.remove_service(&twin).unwrap();
    assert_eq!(h.forwarded_to(&tcp(3).build()), 0);
    let before = h.reason(Reason::PassNotVip);
    assert_eq!(h.run(&twin_frame(4)).0, XDP_PASS, "no service any more");
    assert_eq!(h.reason(Reason::PassNotVip), before + 1);

    // Ours goes too: its new flows pass, and so does anything else on that bit.
    h.dp.remove_service(&ours).unwrap();
    assert_eq!(h.run(&tcp(5).build()).0, XDP_PASS);
    assert_eq!(h.reason(Reason::PassNotVip), before + 2);
    // Added again: balanced again (the bit is set before the service is).
    h.service(0, 0, 80, 6, &[0]);
    assert_eq!(h.forwarded_to(&tcp(6).build()), 0);
}

/// The object's BTF must load: without it the kernel gets no function information, verifies the
/// global functions (`lb_pick`, `lb_nat`, …) again for every state of every caller, and the
/// balancer costs the verifier several times the work (it did, unnoticed, while a subprogram
/// returned a Rust enum whose BTF the kernel refuses). Prints the verifier's count.
#[test]
fn the_balancer_loads_with_its_btf_so_global_functions_are_verified_once() {
    let mut h = Harness::new();
    let info =
        h.dp.program(names::PROG_BALANCER)
            .unwrap()
            .info()
            .expect("program info");
    assert!(
        info.btf_id().is_some(),
        "the balancer was loaded without BTF (aya logs why: 'object BTF couldn't be loaded')"
    );
    println!(
        "verified instructions: {:?}",
        info.verified_instruction_count()
    );
}

#[test]
fn past_the_syn_flood_guard_syns_go_on_without_an_entry_and_the_next_packet_makes_it() {
    // The guard counts per CPU: every packet of this test runs on the same one.
    packet::pin_to_cpu0();
    let mut h = Harness::new();
    for id in 0..3 {
        h.backend(id, 1, true);
    }
    h.service(0, 0, 80, 6, &[0, 1, 2]);
    h.dp.set_clock(5).unwrap();
    h.dp.set_config(&lb_common::DataplaneConfig {
        syn_guard: 2,
        ..Default::default()
    })
    .unwrap();
    let active = |h: &Harness| (0..3).map(|id| h.dp.flow_count(id).unwrap()).sum::<i64>();
    // Two SYNs enter the table in this tick; the third goes to the same backend without an
    // entry.
    let first: Vec<u32> = (9000..9003)
        .map(|p| h.forwarded_to(&tcp(p).build()))
        .collect();
    assert_eq!(h.reason(Reason::Forwarded), 2);
    assert_eq!(h.reason(Reason::ForwardedUntracked), 1);
    assert_eq!(active(&h), 2, "the untracked SYN is not an active flow");
    // The table does not know the third flow; its ACK makes the entry, on the ring's backend.
    let ack = |p: u16| tcp(p).tcp_flags(ACK).build();
    assert_eq!(h.forwarded_to(&ack(9002)), first[2]);
    assert_eq!(active(&h), 3);
    // The ring changes: the tracked flows keep their backends, and so does the third now.
    h.service(0, 1, 80, 6, &[(first[0] + 1) % 3]);
    for (p, b) in (9000..9003).zip(&first) {
        assert_eq!(h.forwarded_to(&ack(p)), *b, "flow {p} moved");
    }
    // Past the limit a SYN is looked up, never entered: a retransmitted SYN of a tracked flow
    // keeps its backend although the ring changed.
    assert_eq!(h.forwarded_to(&tcp(9000).build()), first[0]);
    assert_eq!(h.reason(Reason::ForwardedUntracked), 1);
    // Round robin looks a SYN up and tracks it whatever the guard says.
    h.service_sched(1, 2, 81, 6, &[0, 1, 2], lb_common::SCHED_ROUND_ROBIN);
    h.forwarded_to(&Frame::tcp(CLIENT, 9050, VIP, 81).build());
    assert_eq!(h.reason(Reason::ForwardedUntracked), 1);
    assert_eq!(active(&h), 4);
    // A new tick admits SYNs again.
    h.dp.set_clock(6).unwrap();
    h.forwarded_to(&tcp(9100).build());
    assert_eq!(h.reason(Reason::ForwardedUntracked), 1);
    assert_eq!(active(&h), 5);
}
