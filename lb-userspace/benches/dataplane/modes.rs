//! Per-packet cost of each forwarding mode, established flows. The routed modes ask the kernel's
//! FIB for the next hop, so this part runs in a namespace of its own with a real one: a veth
//! (forwarding on) with a PERMANENT neighbour as the next hop to the backends' and the clients'
//! networks; every packet is run as if received on that veth.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use lb_common::{
    AF_INET, AF_INET6, BACKEND_F_ALIVE, Backend, CONFIG_F_NAT, DataplaneConfig, FORWARD_DSR,
    FORWARD_FULLNAT, FORWARD_GUE, FORWARD_IPIP, FORWARD_NAT, RING_SIZE, SCHED_MAGLEV, Service,
    names,
};
use lb_userspace::{
    dataplane::{Dataplane, ServiceKey, Sizing},
    maglev::{MaglevBackend, build_table},
};

use super::{
    Report, TCP_ACK, XDP_TX, established_template, flow_frame, measure_from, run_once_from,
    template, vip,
};

const NS: &str = "lbbench-modes";
const BACKENDS: u32 = 100;
const FLOWS: u32 = 16_384;

/// The namespace and its FIB; removed on drop.
struct Fib;

fn ip(args: &str) {
    let st = Command::new("ip")
        .args(["-n", NS])
        .args(args.split_whitespace())
        .status()
        .expect("running ip");
    assert!(st.success(), "ip -n {NS} {args} failed");
}

impl Fib {
    fn new() -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", NS])
            .stderr(std::process::Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", NS])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {NS}");
        let fib = Fib;
        ip("link add lbe0 type veth peer name lbe1");
        ip("link set lbe0 up");
        ip("link set lbe1 up");
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ] {
            let st = Command::new("ip")
                .args(["netns", "exec", NS, "sysctl", "-qw", &format!("{k}={v}")])
                .status()
                .expect("sysctl");
            assert!(st.success(), "sysctl {k}");
        }
        ip("addr add 10.1.0.1/24 dev lbe0");
        ip("-6 addr add fd00:1::1/64 dev lbe0 nodad");
        ip("neigh add 10.1.0.2 lladdr 02:aa:00:00:00:01 nud permanent dev lbe0");
        ip("neigh add fd00:1::2 lladdr 02:aa:00:00:00:01 nud permanent dev lbe0");
        // Backends, and the clients (10.0.0.0/16: the benchmark's flow sources).
        ip("route add 10.2.0.0/16 via 10.1.0.2 dev lbe0");
        ip("route add 10.0.0.0/16 via 10.1.0.2 dev lbe0");
        ip("-6 route add fd00:2::/64 via fd00:1::2 dev lbe0");
        ip("-6 route add fd00:99::/64 via fd00:1::2 dev lbe0");
        fib
    }
}

impl Drop for Fib {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", NS])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn ifindex(dev: &str) -> u32 {
    let name = std::ffi::CString::new(dev).expect("interface name");
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(i != 0, "no interface {dev}");
    i
}

/// The IPv6 VIP.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);

/// A forwarding mode measured: its row name, `FORWARD_*`, and whether the VIP (and clients)
/// and the backends are IPv6.
struct Mode {
    name: &'static str,
    forward: u8,
    v6_vip: bool,
    v6_backends: bool,
}

const MODES: [Mode; 9] = [
    Mode::new("dsr", FORWARD_DSR, false, false),
    Mode::new("ipip 4in4", FORWARD_IPIP, false, false),
    Mode::new("gue 4in4", FORWARD_GUE, false, false),
    Mode::new("ipip 4in6", FORWARD_IPIP, false, true),
    Mode::new("nat", FORWARD_NAT, false, false),
    Mode::new("fullnat", FORWARD_FULLNAT, false, false),
    Mode::new("IPv6 dsr", FORWARD_DSR, true, true),
    Mode::new("IPv6 ipip 6in6", FORWARD_IPIP, true, true),
    Mode::new("IPv6 nat", FORWARD_NAT, true, true),
];

impl Mode {
    const fn new(name: &'static str, forward: u8, v6_vip: bool, v6_backends: bool) -> Self {
        Mode {
            name,
            forward,
            v6_vip,
            v6_backends,
        }
    }

    fn nat(&self) -> bool {
        matches!(self.forward, FORWARD_NAT | FORWARD_FULLNAT)
    }
}

/// Mode `m`'s VIP: the benchmark's VIP `m`, or `VIP6` + `m`.
fn mode_vip(m: u32, v6: bool) -> IpAddr {
    if v6 {
        let mut s = VIP6.segments();
        s[7] += m as u16;
        Ipv6Addr::from(s).into()
    } else {
        vip(m).into()
    }
}

/// One balancer, loaded once, with a service per mode (service and ring `m`, TCP port 80 of
/// `mode_vip(m)`) of `BACKENDS` backends each (ids `m * BACKENDS ..`): 10.2.m.x, or
/// fd00:2::m:x for IPv6 backends.
fn balancer() -> Dataplane {
    let modes = MODES.len() as u32;
    let mut dp = Dataplane::load(
        Sizing {
            max_services: modes,
            max_backends: modes * BACKENDS,
            conntrack_size: 1 << 20,
            nat_size: 1 << 18,
        },
        false,
    )
    .expect("load the balancer");
    for (m, mode) in (0u32..).zip(&MODES) {
        let addr = |b: u32| -> IpAddr {
            if mode.v6_backends {
                Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, m as u16, (b + 1) as u16).into()
            } else {
                Ipv4Addr::from(0x0a02_0000 | m << 8 | (b + 1)).into()
            }
        };
        let members: Vec<MaglevBackend> = (0..BACKENDS)
            .map(|b| MaglevBackend::new(addr(b), 80, 1))
            .collect();
        let table: Vec<u32> = build_table(&members, RING_SIZE)
            .expect("maglev")
            .iter()
            .map(|b| m * BACKENDS + b)
            .collect();
        for b in 0..BACKENDS {
            let mut bytes = [0u8; 16];
            let family = match addr(b) {
                IpAddr::V4(v4) => {
                    bytes[..4].copy_from_slice(&v4.octets());
                    AF_INET
                }
                IpAddr::V6(v6) => {
                    bytes.copy_from_slice(&v6.octets());
                    AF_INET6
                }
            };
            dp.set_backend(
                m * BACKENDS + b,
                Backend {
                    addr: bytes,
                    mac: [2, 0, 0, 0, m as u8, b as u8],
                    port: 80u16.to_be(),
                    generation: 1,
                    flags: BACKEND_F_ALIVE,
                    family,
                    forward: mode.forward,
                    _pad: 0,
                    service: m,
                },
            )
            .expect("backend");
        }
        dp.write_ring(m, &table).expect("ring");
        dp.set_service(
            ServiceKey::new(mode_vip(m, mode.v6_vip), 80, 6),
            Service {
                id: m,
                ring: m,
                forward: mode.forward,
                scheduler: SCHED_MAGLEV,
                flags: 0,
                _pad: 0,
            },
        )
        .expect("service");
    }
    dp.set_config(&DataplaneConfig {
        encap_src4: u32::from_ne_bytes([10, 1, 0, 1]),
        encap_src6: lb_userspace::daemon::ipv6_words(&"fd00:1::1".parse().expect("address")),
        encap_src_hash_bits: 0,
        _pad0: 0,
        gue_port: lb_common::DEFAULT_GUE_PORT.to_be(),
        snat4: u32::from_ne_bytes([10, 1, 0, 1]),
        snat6: lb_userspace::daemon::ipv6_words(&"fd00:1::1".parse().expect("address")),
        snat_port_min: 1024,
        snat_port_max: 65535,
        flags: CONFIG_F_NAT,
        syn_guard: 0,
    })
    .expect("config");
    dp.program(names::PROG_BALANCER).expect("verifier");
    dp
}

/// The packet a backend sends back for the translated packet `out` (addresses and ports
/// swapped, MACs as if from the next hop).
fn reply_to(out: &[u8], v6: bool) -> Vec<u8> {
    // Offsets of the source address, its length, and of the source port.
    let (src, len, sport) = if v6 { (22, 16, 54) } else { (26, 4, 34) };
    let dst = src + len;
    let mut r = out.to_vec();
    r[0..6].copy_from_slice(&out[6..12]);
    r[6..12].copy_from_slice(&out[0..6]);
    r[src..dst].copy_from_slice(&out[dst..dst + len]);
    r[dst..dst + len].copy_from_slice(&out[src..dst]);
    r[sport..sport + 2].copy_from_slice(&out[sport + 2..sport + 4]);
    r[sport + 2..sport + 4].copy_from_slice(&out[sport..sport + 2]);
    r
}

/// Flow `i` to `VIP6`: a distinct client address (fd00:99::/64) and port.
fn flow_frame6(template: &[u8], i: u32) -> Vec<u8> {
    let mut f = template.to_vec();
    f[34..38].copy_from_slice(&((i >> 14) + 1).to_be_bytes());
    f[54..56].copy_from_slice(&(1024 + (i & 0x3fff) as u16).to_be_bytes());
    f
}

/// Established flows through each mode, all services of one balancer.
pub fn forwarding_modes(report: &mut Report, per_run: usize) {
    println!("# forwarding modes: established, {FLOWS} flows, next hop from the FIB");
    let _fib = Fib::new();
    let rows = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/var/run/netns/{NS}")).expect("netns");
                // SAFETY: setns on a descriptor we own; changes only this thread's namespace.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns");
                let ingress = Some(ifindex("lbe0"));
                let mut dp = balancer();
                let prog = dp.program(names::PROG_BALANCER).expect("program");
                let mut out = vec![0u8; 512];
                let mut rows = Vec::new();
                for (m, mode) in (0u32..).zip(&MODES) {
                    // The flow's SYN, then ACKs.
                    let (syn, ack) = match mode_vip(m, mode.v6_vip) {
                        IpAddr::V4(vip) => (template(vip, false), established_template(vip, false)),
                        IpAddr::V6(vip) => {
                            let client = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
                            let f = super::packet::Frame6::tcp(client, 1, vip, 80);
                            (f.clone().build(), f.tcp_flags(TCP_ACK).build())
                        }
                    };
                    let flow = |i: u32, t: &[u8]| {
                        if mode.v6_vip {
                            flow_frame6(t, i)
                        } else {
                            flow_frame(t, i)
                        }
                    };
                    let mut replies = Vec::new();
                    for i in 0..FLOWS {
                        let frame = flow(i, &syn);
                        run_once_from(prog, &frame, &mut out, XDP_TX, ingress);
                        if mode.nat() {
                            replies.push(reply_to(&out[..frame.len()], mode.v6_vip));
                        }
                    }
                    let mut frames = |k: usize| flow(k as u32 % FLOWS, &ack);
                    rows.push((
                        format!("{}: established", mode.name),
                        measure_from(prog, &mut frames, per_run, XDP_TX, ingress),
                    ));
                    if mode.nat() {
                        let mut frames = |k: usize| replies[k % FLOWS as usize].clone();
                        rows.push((
                            format!("{}: reply translated back", mode.name),
                            measure_from(prog, &mut frames, per_run, XDP_TX, ingress),
                        ));
                    }
                }
                rows
            })
            .join()
            .expect("the forwarding-mode benchmark thread")
    });
    for (name, figure) in rows {
        report.row(&name, figure, None);
    }
    println!();
}
