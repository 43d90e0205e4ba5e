//! A small typed builder for the Ethernet/IPv4/IPv6/TCP/UDP frames the tests feed to the
//! loaded program, and helpers to load the balancer small and run a frame through it.
#![allow(
    dead_code,
    reason = "each test crate that includes this module uses part of it"
)]

use std::net::Ipv4Addr;

pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];

#[derive(Clone)]
pub struct Frame {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    vlan: Option<u16>,
    options: usize,
    frags: u16,
    trailer: usize,
    tcp_flags: u8,
    tos: u8,
    payload: Option<usize>,
}

/// The transport payload of built frames: a short request by default, or `len` bytes of a
/// counting pattern.
fn payload_bytes(len: Option<usize>) -> Vec<u8> {
    match len {
        None => b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        Some(n) => (0..n).map(|i| (i % 251) as u8).collect(),
    }
}

impl Frame {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Frame {
            src,
            dst,
            sport,
            dport,
            proto: 6,
            vlan: None,
            options: 0,
            frags: 0,
            trailer: 0,
            tcp_flags: 0x02,
            tos: 0,
            payload: None,
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Frame {
            proto: 17,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    pub fn protocol(mut self, proto: u8) -> Self {
        self.proto = proto;
        self
    }

    pub fn vlan(mut self, id: u16) -> Self {
        self.vlan = Some(id);
        self
    }

    /// IPv4 options of `len` bytes (a multiple of 4, at most 40): NOPs ended by end-of-list.
    pub fn ip_options(mut self, len: usize) -> Self {
        assert!(len.is_multiple_of(4) && len <= 40);
        self.options = len;
        self
    }

    /// The IPv4 flags + fragment offset field (host order).
    pub fn frags(mut self, frags: u16) -> Self {
        self.frags = frags;
        self
    }

    /// TCP flags (SYN by default).
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    /// Bytes after the IP datagram (Ethernet padding).
    pub fn trailer(mut self, len: usize) -> Self {
        self.trailer = len;
        self
    }

    /// The IPv4 type-of-service byte.
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// `len` bytes of transport payload instead of the short request.
    pub fn payload_len(mut self, len: usize) -> Self {
        self.payload = Some(len);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let payload = &payload_bytes(self.payload)[..];
        let l4_len = if self.proto == 17 { 8 } else { 20 };
        let ihl = 20 + self.options;
        let total = ihl + l4_len + payload.len();

        let mut f = Vec::new();
        f.extend_from_slice(&LB_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        if let Some(id) = self.vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&0x0800u16.to_be_bytes());

        let ip_start = f.len();
        f.push(0x40 | (ihl / 4) as u8);
        f.push(self.tos);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frags.to_be_bytes());
        f.push(64);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        for i in 0..self.options {
            f.push(if i + 1 == self.options { 0 } else { 1 });
        }
        let csum = checksum(&f[ip_start..ip_start + ihl]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&csum.to_be_bytes());

        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 17 {
            f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        } else {
            f.extend_from_slice(&1u32.to_be_bytes()); // seq
            f.extend_from_slice(&0u32.to_be_bytes()); // ack
            f.push(0x50); // data offset 5
            f.push(self.tcp_flags);
            f.extend_from_slice(&64240u16.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]);
        }
        f.extend_from_slice(payload);
        f.extend(std::iter::repeat_n(0, self.trailer));
        f
    }

    pub fn arp() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[10, 99, 0, 1, 0, 0, 0, 0, 0, 0, 10, 99, 0, 2]);
        f
    }

    pub fn ipv6() -> Vec<u8> {
        let mut f = LB_MAC.to_vec();
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
        f.extend_from_slice(&[0; 32]);
        f.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        f
    }
}

/// The Internet checksum of `bytes` (0 over a block that includes a correct checksum).
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv6 TCP/UDP frame, with optional extension headers before the transport header.
#[derive(Clone)]
pub struct Frame6 {
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    /// (next-header value of the extension, its body length in 8-byte units beyond the first)
    ext: Vec<(u8, u8)>,
    tcp_flags: u8,
    traffic_class: u8,
    payload: Option<usize>,
}

impl Frame6 {
    pub fn tcp(src: std::net::Ipv6Addr, sport: u16, dst: std::net::Ipv6Addr, dport: u16) -> Self {
        Frame6 {
            src,
            dst,
            sport,
            dport,
            proto: 6,
            ext: Vec::new(),
            tcp_flags: 0x02,
            traffic_class: 0,
            payload: None,
        }
    }

    pub fn udp(src: std::net::Ipv6Addr, sport: u16, dst: std::net::Ipv6Addr, dport: u16) -> Self {
        Frame6 {
            proto: 17,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    /// Adds an extension header of type `kind` (0 hop-by-hop, 43 routing, 60 destination
    /// options, 44 fragment) of `8 * (1 + extra)` bytes.
    pub fn ext(mut self, kind: u8, extra: u8) -> Self {
        self.ext.push((kind, extra));
        self
    }

    /// TCP flags (SYN by default).
    pub fn tcp_flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    /// The traffic class byte.
    pub fn traffic_class(mut self, tc: u8) -> Self {
        self.traffic_class = tc;
        self
    }

    /// `len` bytes of transport payload instead of the short request.
    pub fn payload_len(mut self, len: usize) -> Self {
        self.payload = Some(len);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let payload = &payload_bytes(self.payload)[..];
        let l4_len = if self.proto == 17 { 8 } else { 20 };
        let ext_len: usize = self.ext.iter().map(|(_, x)| 8 * (1 + *x as usize)).sum();
        let mut f = LB_MAC.to_vec();
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        let vtc = (6u32 << 28) | (u32::from(self.traffic_class) << 20) | 0x12345;
        f.extend_from_slice(&vtc.to_be_bytes());
        f.extend_from_slice(&((ext_len + l4_len + payload.len()) as u16).to_be_bytes());
        let first = self.ext.first().map_or(self.proto, |(k, _)| *k);
        f.push(first);
        f.push(64);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        for (i, (_, extra)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.proto, |(k, _)| *k);
            let len = 8 * (1 + *extra as usize);
            f.push(next);
            f.push(*extra);
            f.extend(std::iter::repeat_n(0, len - 2));
        }
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 17 {
            f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        } else {
            f.extend_from_slice(&1u32.to_be_bytes());
            f.extend_from_slice(&0u32.to_be_bytes());
            f.push(0x50);
            f.push(self.tcp_flags);
            f.extend_from_slice(&64240u16.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]);
        }
        f.extend_from_slice(payload);
        f
    }
}

/// An ICMP error from `src` to `dst` (type `kind`, `code`, the 4 type-specific bytes `rest`)
/// quoting `quoted` (an IP packet, usually cut short), in an Ethernet frame to the balancer.
pub fn icmp4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = LB_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field included) from `src` to `dst`: 0 when
/// the message's checksum is right.
pub fn icmp6_checksum(src: &std::net::Ipv6Addr, dst: &std::net::Ipv6Addr, msg: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(msg);
    checksum(&pseudo)
}

/// `icmp4` for ICMPv6.
pub fn icmp6(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let sum = icmp6_checksum(&src, &dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = LB_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// A balancer with small maps, loaded but not attached, for tests that drive it through
/// `BPF_PROG_TEST_RUN`. Room for 64k flows: the tests send a few thousand, and a table of sets
/// of four keeps nearly all of them only well below its size (`flow_table::retention`).
pub fn small_dataplane() -> lb_userspace::dataplane::Dataplane {
    lb_userspace::dataplane::Dataplane::load(
        lb_userspace::dataplane::Sizing {
            max_services: 4,
            max_backends: 16,
            conntrack_size: 1 << 16,
            nat_size: 1024,
        },
        false,
    )
    .expect("load the XDP object")
}

/// Runs `frame` through the balancer as received on interface `ifindex`: the verdict and the
/// bytes after.
pub fn run_on(
    dp: &mut lb_userspace::dataplane::Dataplane,
    ifindex: u32,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    use aya::TestRun as _;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let mut out = vec![0u8; frame.len() + 256];
    let prog = dp.program(lb_common::names::PROG_BALANCER).unwrap();
    let r = prog
        .test_run(aya::TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..aya::TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Marks backends `ids` as belonging to service `service` forwarded by `forward`, as the
/// daemon writes them (the program forwards established flows by these fields).
pub fn own_backends(
    dp: &mut lb_userspace::dataplane::Dataplane,
    ids: &[u32],
    service: u32,
    forward: u8,
) {
    for &id in ids {
        let mut b = dp.backend(id).expect("backend entry");
        b.service = service;
        b.forward = forward;
        dp.set_backend(id, b).expect("backend entry");
    }
}

/// The owner fields (`forward`, `service`) backend `id` has now: a test rewriting the entry
/// keeps them.
pub fn owner_of(dp: &lb_userspace::dataplane::Dataplane, id: u32) -> (u8, u32) {
    dp.backend(id).map_or((0, 0), |b| (b.forward, b.service))
}

/// The MAC the control-level tests give backend number `n` (in the neighbour table).
pub fn backend_mac(n: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, n]
}

/// Runs `frame` through the loaded balancer once: `Some(n)` when it went to backend number `n`
/// (by `backend_mac`), `None` when dropped, `Some(0)` when passed to the kernel.
pub fn through_balancer(dp: &mut lb_userspace::dataplane::Dataplane, frame: &[u8]) -> Option<u8> {
    use aya::TestRun as _;
    let mut out = vec![0u8; frame.len()];
    let prog = dp
        .program(lb_common::names::PROG_BALANCER)
        .expect("the balancer loads");
    let r = prog
        .test_run(aya::TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..aya::TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    match r.return_value {
        3 => Some(
            (1..=9)
                .find(|n| out[0..6] == backend_mac(*n))
                .expect("a backend MAC"),
        ),
        1 => None,
        2 => Some(0),
        v => panic!("verdict {v}"),
    }
}

/// Backend number `n` of the control-level tests: 10.99.0.(10 + n), on `lbc0`'s subnet.
pub fn backend_ip(n: u8) -> std::net::IpAddr {
    std::net::IpAddr::V4(Ipv4Addr::new(10, 99, 0, 10 + n))
}

/// Runs a shell command; panics when it fails.
pub fn sh(cmd: &str) {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("running sh");
    assert!(status.success(), "{cmd} failed");
}

/// Puts backend `n`'s MAC (`backend_mac`) in the neighbour table of `lbc0`.
pub fn add_neighbour(n: u8) {
    let mac = backend_mac(n)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    sh(&format!(
        "ip neigh replace {} lladdr {mac} dev lbc0 nud permanent",
        backend_ip(n)
    ));
}

/// Moves the calling thread into a new network namespace with interface `lbc0`
/// (10.99.0.2/24) and neighbour entries for backends 1..=`with_mac` (the control-level tests:
/// the daemon learns backend MACs from the neighbour table). The namespace dies with the
/// thread.
pub fn enter_control_netns(with_mac: u8) {
    assert!(
        // SAFETY: a plain system call.
        unsafe { libc::geteuid() } == 0,
        "these tests need root (run them through the README test command)"
    );
    // SAFETY: affects only the calling thread, which the test owns for its whole life.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    sh(
        "ip link add lbc0 type veth peer name lbc1 && ip link set lbc0 up && ip link set lbc1 up \
        && ip addr add 10.99.0.2/24 dev lbc0",
    );
    for n in 1..=with_mac {
        add_neighbour(n);
    }
}

/// Records the probes the control loop starts; the test plays their results.
#[derive(Clone, Default)]
pub struct FakeProber(pub std::sync::Arc<std::sync::Mutex<Vec<lb_userspace::daemon::ProbeKey>>>);

impl lb_userspace::daemon::Prober for FakeProber {
    type Handle = lb_userspace::daemon::ProbeKey;
    fn start(
        &mut self,
        key: lb_userspace::daemon::ProbeKey,
        _: lb_userspace::daemon::ProbeTarget,
        _: lb_userspace::api::HealthCheck,
    ) -> Self::Handle {
        self.0.lock().unwrap().push(key);
        key
    }
    fn stop(&mut self, handle: Self::Handle) {
        self.0.lock().unwrap().retain(|k| *k != handle);
    }
}

/// Keeps the calling thread on CPU 0, for tests of per-CPU state (round-robin cursors, the
/// route cache): each test run executes on the caller's CPU.
pub fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}
