//! Throughput through a namespace test bed (`cargo xtask bench`, or as root
//! `cargo bench -p lb-userspace --bench throughput -- [--quick]`).
//!
//! ```text
//!                          ┌─ lb    10.99.0.2  the balancer (lb daemon, XDP, L2 DSR) ─┐
//!   client ── bridge (sw) ─┼─ nat   10.99.0.3  nftables DNAT + conntrack             ─┼─ bridge ── b1, b2, b3
//!   (generator)            ├─ fwd   10.99.0.4  minimal XDP forwarder (MAC rewrite)   ─┤            (XDP sinks)
//!                          └─ kfwd  10.99.0.5  kernel IP forwarding, no netfilter    ─┘
//! ```
//! The CPU figures are measured twice: as drawn, and with the client's frames for a middlebox
//! redirected past the bridge (`uplink`, an XDP program on the client's switch port, hands
//! them to the middlebox's port), so the middlebox receives a raw frame as from a NIC's
//! driver. Through the bridge, XDP on a veth first copies every skb into a fresh page, which a
//! NIC driver never does: the minimal XDP forwarder's floor is 1.0 to 1.2 µs per packet that
//! way, 0.03 to 0.2 µs redirected. The kernel's stack on the NAT host and router builds its
//! own skb around a redirected frame, as from a NIC. What the middleboxes send, and the direct
//! path, cross the bridge either way. The rates and the HTTP runs go through the bridge: fed
//! raw frames, with no queue in front of its veth's 256-frame ring, the balancer's path drops
//! bursts of the generator (which shares its CPU) that the stack's queues absorb.
//! The generator transmits UDP datagrams to the VIP from the client's eth0 with the kernel's
//! live-frames test mode, in 65,536 distinct flows (8,192 in quick mode); an XDP program on
//! every backend counts and drops them. The same traffic goes five ways, spread over the same
//! three backends each time: straight to the backends (no middlebox; the generator gives each
//! flow a backend's MAC), through the balancer, through nftables DNAT (what users would pick
//! instead, as kube-proxy does), and through two floors: a minimal XDP forwarder (for any
//! XDP_TX forwarder on this test bed; it picks the backend by source port) and plain kernel
//! forwarding (for anything the kernel's stack forwards, NAT included; a multipath route
//! hashing the 5-tuple).
//! Delivering to three backends costs more per packet than to one (their receive batches are
//! smaller), so every path, the direct one too, pays the same for it.
//!
//! Figures, printed and written to target/lb-bench/throughput.json, never asserted:
//! 1. offered vs delivered rate at several offered rates, and the highest loss-free rate;
//! 2. CPU time per delivered packet at one fixed rate that every path carries without loss,
//!    minus the same for the direct path: each middlebox's own cost, as a ratio to the
//!    balancer's;
//! 3. requests per second of real HTTP (`wrk` in the client namespace, tiny HTTP responders
//!    on the backends, port 8080): through the balancer (to the VIP), through the nftables
//!    DNAT host (to its service address 10.200.0.20, which the client reaches from a second
//!    address, 10.99.0.6, that the backends route back through the NAT host so it can undo
//!    the DNAT), and straight to b1 (the ceiling); over keep-alive connections, and with
//!    `Connection: close` (a new connection, so a new flow, per request).
//!
//! Setup problems fail loudly (not root, a missing tool, nothing delivered); the namespaces go
//! on drop, also on a panic or Ctrl-C (a killed run's are swept by the next one).

// The end-to-end tests' test bed. Its unit tests (netns.rs) are compiled here too, without the
// harness that would run them, so their imports look unused.
#[path = "../tests/common/mod.rs"]
#[allow(
    unused_imports,
    reason = "the module's #[test] fns are not built into a bench"
)]
mod common;
#[path = "throughput/cpu.rs"]
mod cpu;
#[path = "throughput/frame.rs"]
mod frame;
#[path = "throughput/hosts.rs"]
mod hosts;
#[path = "throughput/progs.rs"]
mod progs;
#[path = "throughput/threads.rs"]
mod threads;
#[path = "throughput/web.rs"]
mod web;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::programs::xdp::XdpLinkId;
use common::{Testbed, VIP, netns};
use hosts::Host;
use progs::{Flows, Pace, Progs};

/// The service's port. The test bed's backends serve HTTP on TCP 80, which is what the
/// daemon's health checks of a UDP service connect to.
const PORT: u16 = 80;
const NAT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 3);
const FWD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 4);
const KFWD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);
/// HTTP: the port of the backends' responders and of the balancer's TCP service on the VIP.
const HTTP_PORT: u16 = 8080;
/// HTTP: the NAT host's service address (DNAT to the backends); the client routes it through
/// the NAT host.
const NAT_HTTP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 20);
/// HTTP: the client's source address towards the NAT host's service. The backends route it
/// through the NAT host, so their answers come back through the DNAT (the client's own address
/// they reach directly: the balancer's DSR answers and the direct path's).
const CLIENT_NAT_SRC: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 6);
/// HTTP: worker threads of the responders' runtime (all backends share it), and wrk's load.
const HTTP_WORKERS: usize = 1;
const WRK_THREADS: u32 = 1;
const WRK_CONNECTIONS: u32 = 16;
/// 4 source addresses × 16,384 ports. Source addresses on the test bed's subnet, outside the
/// hosts' (10.99.0.1-5, .11-13).
const FLOWS: Flows = Flows {
    flows: 65_536,
    ports_per_addr: 16_384,
    base_addr: Ipv4Addr::new(10, 99, 0, 100),
    base_port: 1024,
};
/// Quick mode: 8,192 flows, so every path's tables hold them all after a short warm-up.
const QUICK_FLOWS: Flows = Flows {
    flows: 8_192,
    ..FLOWS
};
/// The template's own source: in no flow, so every frame's rewrite changes both address and
/// port (and both checksums).
const TEMPLATE_SRC: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 99, 0, 99), 9);
/// Flows the balancer's connection table has room for: as many as the NAT host's conntrack
/// (the kernel's default `nf_conntrack_max` on this kind of machine), so the two tables are
/// compared at one capacity. (The daemon's default, 2M flows, costs the balancer a few tens of
/// ns more per packet here: docs/PERFORMANCE.md.)
const TABLE_FLOWS: u32 = 262_144;
/// "Loss-free": at most this share of the offered frames missing at the backends.
const LOSS_FREE: f64 = 1e-4;
/// Time after the generator stops before the counters are read (nothing is left in flight:
/// see `Progs::generate`; this is margin).
const DRAIN: Duration = Duration::from_millis(20);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag; the generator stops and the benchmark panics at the next
/// check, so the test bed's namespaces are removed on the way out.
fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_stop() {
    if STOP.load(Ordering::SeqCst) {
        panic!("interrupted; removing the test bed");
    }
}

struct Settings {
    flows: Flows,
    /// The balancer's health-check interval and timeout: how soon its backends come up at the
    /// start.
    hc_interval: &'static str,
    /// Length of each offered-rate trial.
    trial: Duration,
    /// Paced trials, as fractions of the rate the generator reached unpaced on that path.
    ladder: &'static [f64],
    cpu_rounds: usize,
    cpu_trial: Duration,
    /// How the CPU figures' frames reach the middleboxes, a table each.
    cpu_ingresses: &'static [Ingress],
    /// Length of each wrk run (whole seconds: wrk's shortest) and rounds of all HTTP runs.
    http_seconds: u32,
    http_rounds: usize,
    /// Also runs of `Connection: close` (a new connection per request), besides keep-alive.
    http_close: bool,
    /// The paths wrk runs through (`HttpPath::key`); one GET checks each path either way.
    http_paths: &'static [&'static str],
    /// A warm-up before the first round of the CPU figures (the flows are new to the
    /// middleboxes' tables only on the first pass of the rate trials otherwise).
    cpu_warm_up: bool,
}

impl Settings {
    fn new(quick: bool) -> Settings {
        if quick {
            // Every path once, briefly: CI runs this so the benchmark never rots. Paced trials
            // run in the CPU figures; HTTP runs keep-alive through the balancer only (a second
            // of wrk per run, its shortest, was most of this mode's time; `Connection: close`
            // differs by a header, the direct and NAT host's paths are checked by a GET).
            Settings {
                flows: QUICK_FLOWS,
                hc_interval: "100ms",
                trial: Duration::from_millis(100),
                ladder: &[],
                cpu_rounds: 1,
                cpu_trial: Duration::from_millis(100),
                // Raw only: it switches the redirect on and off again.
                cpu_ingresses: &[Ingress::Raw],
                http_seconds: 1,
                http_rounds: 1,
                http_close: false,
                http_paths: &["lb"],
                cpu_warm_up: false,
            }
        } else {
            Settings {
                flows: FLOWS,
                hc_interval: "500ms",
                trial: Duration::from_millis(1500),
                ladder: &[0.25, 0.5, 0.75, 0.9, 1.0],
                cpu_rounds: 25,
                cpu_trial: Duration::from_millis(500),
                cpu_ingresses: &[Ingress::Bridge, Ingress::Raw],
                http_seconds: 2,
                http_rounds: 5,
                http_close: true,
                http_paths: &["direct", "lb", "nft_dnat"],
                cpu_warm_up: true,
            }
        }
    }
}

/// One way through the test bed: the frame the generator sends for it, and the hosts it
/// spreads the flows over itself (the direct path; empty: every frame to the template's
/// destination, a middlebox that spreads them).
struct Path {
    name: &'static str,
    key: &'static str,
    frame: Vec<u8>,
    hops: Vec<[u8; 6]>,
}

/// What one run of the generator sent and what reached the backends.
#[derive(Clone, Copy, Debug)]
struct Trial {
    requested: Option<f64>,
    offered: u64,
    delivered: u64,
    wall: Duration,
    /// Generator thread + ksoftirqd on its CPU: everything the path cost (see
    /// `Progs::generate`).
    cpu: Duration,
    /// Busy time of the whole machine over the same interval, and that interval.
    machine: Duration,
    interval: Duration,
}

/// A trial and, when frames were lost, the interface counters that grew meanwhile.
struct Measured {
    t: Trial,
    lost_at: Option<String>,
}

impl Trial {
    fn offered_pps(&self) -> f64 {
        self.offered as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn delivered_pps(&self) -> f64 {
        self.delivered as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn loss(&self) -> f64 {
        if self.offered == 0 {
            return 0.0;
        }
        1.0 - self.delivered as f64 / self.offered as f64
    }

    fn loss_free(&self) -> bool {
        self.offered > 0 && self.loss() <= LOSS_FREE
    }

    /// Whether the generator sent at the rate asked for (otherwise the path, which runs on
    /// the generator's CPU, was already full).
    fn kept_up(&self) -> bool {
        self.requested
            .is_none_or(|r| self.offered_pps() >= 0.97 * r)
    }

    fn ns_per_packet(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.delivered.max(1) as f64
    }

    /// CPUs' worth of other work on the machine meanwhile.
    fn others_load(&self) -> f64 {
        (self.machine.as_secs_f64() - self.cpu.as_secs_f64()).max(0.0)
            / self.interval.as_secs_f64().max(1e-9)
    }
}

/// The test bed with the benchmark's hosts and programs. Fields drop in order: the HTTP
/// responders and the programs (their XDP links) first, the test bed (its namespaces and
/// daemon) last.
struct Bed {
    web: web::Responders,
    progs: Progs,
    fwd: Host,
    kfwd: Host,
    nat: Host,
    tb: Testbed,
    /// The CPU the generator (and so every path) runs on, and that CPU's ksoftirqd.
    cpu: usize,
    ksoftirqd: Option<i32>,
    /// `uplink` on the client's port (swapped for a sink to measure the generator alone).
    uplink_link: Option<XdpLinkId>,
    /// With raw ingress: the pass programs that let the NAT host and the kernel router receive
    /// redirected frames.
    stack_wires: Vec<XdpLinkId>,
    client_mac: [u8; 6],
    flows: Flows,
    /// The backends' MACs: every path spreads the flows over all of them.
    backend_macs: Vec<[u8; 6]>,
    /// Said once that the generator could not get its nice value.
    told_nice: bool,
}

impl Bed {
    fn start(flows: Flows, hc_interval: &str) -> Bed {
        let tb = Testbed::builder()
            .backends(3)
            .daemon_arg("--conntrack-size")
            .daemon_arg(&TABLE_FLOWS.to_string())
            .start();
        let web = web::Responders::start(
            &tb.backends
                .iter()
                .map(|b| (b.ns.clone(), b.name.clone()))
                .collect::<Vec<_>>(),
            HTTP_PORT,
            HTTP_WORKERS,
        );
        // The UDP service of the packet trials and the TCP service of the HTTP runs.
        let services = [
            format!("{VIP}:{PORT}/udp"),
            format!("{VIP}:{HTTP_PORT}/tcp"),
        ];
        let names: Vec<&str> = tb.backends.iter().map(|b| b.name.as_str()).collect();
        for service in &services {
            tb.lb_ok(&[
                "service",
                "add",
                service,
                "--hc-interval",
                hc_interval,
                "--hc-timeout",
                hc_interval,
            ]);
            for b in &names {
                tb.lb_ok(&["backend", "add", service, &tb.ip_of(b)]);
            }
        }
        for service in &services {
            tb.wait_in_table_of(service, &names, true, Duration::from_secs(15));
        }

        let backends: Vec<(Ipv4Addr, String)> = tb
            .backends
            .iter()
            .map(|b| (b.ip, mac_string(&mac_of(&b.ns, "eth0"))))
            .collect();
        let nat = Host::nat(
            &tb,
            NAT_IP,
            VIP,
            PORT,
            (NAT_HTTP_ADDR, HTTP_PORT),
            &backends,
        );
        let client_mac = mac_of(&tb.client, "eth0");
        http_routes(&tb, &nat, client_mac);
        let kfwd = Host::router(&tb, KFWD_IP, VIP, &backends);
        let fwd = Host::add(&tb, "fwd", FWD_IP);

        let mut progs = Progs::load(flows, PORT);
        for b in &tb.backends {
            progs.attach(progs::SINK, &b.ns, "eth0");
        }
        // Frames sent into a veth with XDP_TX are only received when the peer runs an XDP
        // program (ENVIRONMENT.md): the client's (generator) and the forwarder's bridge ports.
        // The test bed already has one on the balancer's.
        progs.attach(progs::WIRE, &tb.sw, &fwd.port);
        // The client's port runs `uplink`: with its map empty every frame passes to the
        // bridge; the CPU figures are also measured with the middleboxes' frames redirected
        // raw (`set_ingress`).
        let uplink_link = Some(progs.attach(progs::UPLINK, &tb.sw, "pclient"));
        let backend_macs: Vec<[u8; 6]> =
            tb.backends.iter().map(|b| mac_of(&b.ns, "eth0")).collect();
        progs.set_fwd_macs(mac_of(&fwd.ns, "eth0"), &backend_macs);
        progs.attach(progs::FWD, &fwd.ns, "eth0");

        // With repeat > 1, BPF_PROG_TEST_RUN adds the program to the kernel's XDP dispatcher
        // for the call and removes it after, each time waiting for an RCU grace period: a
        // generator making many short calls then spends most of its time idle (seen here: 340
        // kpps at 35% of a CPU). Attached to an interface, the program stays in the dispatcher
        // and the calls skip that. This veth pair carries no traffic.
        netns::ip(&[
            "-n", &tb.client, "link", "add", "gkeep0", "type", "veth", "peer", "name", "gkeep1",
        ]);
        progs.attach(progs::GENERATOR, &tb.client, "gkeep0");

        // Static bridge entries: no frame is ever flooded to every port (a sink would count a
        // flooded copy as delivered).
        let mut ports = vec![
            (tb.client.clone(), "pclient".to_owned()),
            (tb.lb.clone(), "plb".to_owned()),
            (nat.ns.clone(), nat.port.clone()),
            (kfwd.ns.clone(), kfwd.port.clone()),
            (fwd.ns.clone(), fwd.port.clone()),
        ];
        ports.extend(
            tb.backends
                .iter()
                .map(|b| (b.ns.clone(), format!("p{}", b.name))),
        );
        for (ns, port) in &ports {
            let mac = mac_string(&mac_of(ns, "eth0"));
            netns::must(Command::new("bridge").args([
                "-n", &tb.sw, "fdb", "replace", &mac, "dev", port, "master", "static",
            ]));
        }

        // SAFETY: sysconf has no preconditions.
        let ncpu = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
            .unwrap_or(1)
            .max(1);
        // The last CPU: CPU 0 usually takes more of the machine's own interrupts.
        let cpu = ncpu - 1;
        Bed {
            web,
            progs,
            fwd,
            kfwd,
            nat,
            tb,
            cpu,
            ksoftirqd: threads::ksoftirqd(cpu),
            uplink_link,
            stack_wires: Vec::new(),
            client_mac,
            flows,
            backend_macs,
            told_nice: false,
        }
    }

    /// How the client's frames reach the middleboxes. Raw: the client's port redirects them
    /// to the middlebox's port, so an XDP program gets the raw frame as from a NIC's driver
    /// and the kernel's stack (NAT host, router) builds its own skb around it; through the
    /// bridge an XDP program on a veth first copies each skb into a fresh page, which no NIC
    /// does. A redirected frame is only received by an interface that runs XDP: the NAT host
    /// and the router get a pass program meanwhile (it would copy every skb they receive
    /// through the bridge, so it goes again after). What the middleboxes send, and the direct
    /// path, cross the bridge either way.
    fn set_ingress(&mut self, ingress: Ingress) {
        let stack = [self.nat.ns.clone(), self.kfwd.ns.clone()];
        let middleboxes = [
            (self.tb.lb.clone(), "plb".to_owned()),
            (self.nat.ns.clone(), self.nat.port.clone()),
            (self.kfwd.ns.clone(), self.kfwd.port.clone()),
            (self.fwd.ns.clone(), self.fwd.port.clone()),
        ];
        match ingress {
            Ingress::Raw if self.stack_wires.is_empty() => {
                for ns in &stack {
                    let link = self.progs.attach(progs::WIRE, ns, "eth0");
                    self.stack_wires.push(link);
                }
                for (ns, port) in &middleboxes {
                    self.progs.set_uplink(&self.tb.sw, mac_of(ns, "eth0"), port);
                }
            }
            Ingress::Bridge if !self.stack_wires.is_empty() => {
                for (ns, _) in &middleboxes {
                    self.progs.clear_uplink(mac_of(ns, "eth0"));
                }
                for link in std::mem::take(&mut self.stack_wires) {
                    self.progs.detach(progs::WIRE, link);
                }
            }
            _ => {}
        }
    }

    fn namespaces(&self) -> Vec<String> {
        let mut v = self.tb.namespaces();
        v.extend([&self.nat, &self.kfwd, &self.fwd].map(|h| h.ns.clone()));
        v
    }

    fn frame_to(&self, mac: [u8; 6]) -> Vec<u8> {
        frame::udp(self.client_mac, mac, TEMPLATE_SRC, (VIP, PORT))
    }

    /// The ways through the test bed, in the order they are measured and printed.
    fn paths(&self) -> Vec<Path> {
        let via = |name, key, ns: &str| Path {
            name,
            key,
            frame: self.frame_to(mac_of(ns, "eth0")),
            hops: Vec::new(),
        };
        vec![
            Path {
                name: "direct to the backends (no middlebox)",
                key: "direct",
                frame: self.frame_to(self.backend_macs[0]),
                hops: self.backend_macs.clone(),
            },
            via(
                "kernel IP forwarding (no NAT, no conntrack)",
                "kernel_forwarding",
                &self.kfwd.ns,
            ),
            via(
                "minimal XDP forwarder (MAC rewrite, XDP_TX)",
                "xdp_forwarder",
                &self.fwd.ns,
            ),
            via("lb: the balancer (XDP, L2 DSR)", "lb", &self.tb.lb),
            via("nftables DNAT + conntrack", "nft_dnat", &self.nat.ns),
        ]
    }

    /// Checks what the generator makes of `path`'s template: the next flow's source (and
    /// destination MAC, when it spreads them), the rest unchanged, both checksums valid.
    /// Panics otherwise.
    fn check_generator(&mut self, path: &Path) {
        let template = &path.frame;
        self.progs.set_template(template);
        self.progs.set_generator_hops(&path.hops);
        for _ in 0..3 {
            let (seq, _) = self.progs.generated();
            let out = self.progs.generate_one(template);
            let (addr, port) = self.flows.source(seq);
            let mut want = template.to_vec();
            if !path.hops.is_empty() {
                let flow = seq % u64::from(self.flows.flows);
                want[..6].copy_from_slice(&path.hops[(flow % path.hops.len() as u64) as usize]);
            }
            want[26..30].copy_from_slice(&addr.octets());
            want[34..36].copy_from_slice(&port.to_be_bytes());
            assert_eq!(
                out.len(),
                want.len(),
                "generator changed the frame's length"
            );
            let same = |r: std::ops::Range<usize>| out[r.clone()] == want[r];
            assert!(
                same(0..24) && same(26..40) && same(42..want.len()),
                "the generator rewrote more than the source address and port:\n{out:02x?}\n{want:02x?}"
            );
            assert!(
                frame::checksums_ok(&out),
                "the generator's frame has a bad IPv4 or UDP checksum: {out:02x?}"
            );
        }
    }

    fn trial(&mut self, path: &Path, pace: Pace) -> Measured {
        self.progs.set_template(&path.frame);
        self.progs.set_generator_hops(&path.hops);
        let ksoft = || {
            self.ksoftirqd
                .and_then(threads::cpu_time)
                .unwrap_or_default()
        };
        let namespaces = self.namespaces();
        let d0 = drop_counters(&namespaces);
        let (g0, e0) = self.progs.generated();
        let s0 = self.progs.sunk();
        let k0 = ksoft();
        let c0 = cpu::Stat::read();
        let t0 = Instant::now();
        let run = self
            .progs
            .generate(&self.tb.client, self.cpu, &path.frame, pace, &STOP);
        std::thread::sleep(DRAIN);
        let (g1, e1) = self.progs.generated();
        let s1 = self.progs.sunk();
        let k1 = ksoft();
        let c1 = cpu::Stat::read();
        let interval = t0.elapsed();
        check_stop();
        let lost_at = (s1 - s0 < g1 - g0).then(|| {
            let d1 = drop_counters(&namespaces);
            let grew: Vec<String> = d1
                .iter()
                .filter_map(|(k, v)| {
                    let before = d0.get(k).copied().unwrap_or(0);
                    (*v > before).then(|| format!("{k} +{}", v - before))
                })
                .collect();
            if grew.is_empty() {
                "no interface counted them".to_owned()
            } else {
                grew.join(", ")
            }
        });
        if !run.niced && !self.told_nice {
            self.told_nice = true;
            eprintln!(
                "throughput benchmark: could not raise the generator's priority; other \
                 processes on the machine will slow it"
            );
        }
        assert_eq!(
            e1,
            e0,
            "the generator refused {} frames (not the template it expects)",
            e1 - e0
        );
        let t = Trial {
            requested: pace.rate,
            offered: g1 - g0,
            delivered: s1 - s0,
            wall: run.wall,
            cpu: run.cpu + k1.saturating_sub(k0),
            machine: c1.busy_since(&c0),
            interval,
        };
        assert!(
            t.delivered <= t.offered,
            "{}: {} datagrams reached the backends but {} were sent: something else sends \
             UDP to port {PORT}, or frames were duplicated",
            path.key,
            t.delivered,
            t.offered
        );
        Measured { t, lost_at }
    }

    /// Sends every flow at least once so the balancer's and conntrack's tables hold them all
    /// (and fails loudly when nothing gets through).
    fn warm_up(&mut self, path: &Path) {
        let Measured { t, .. } = self.trial(
            path,
            Pace {
                rate: None,
                duration: Duration::from_secs(3),
                max_frames: Some(u64::from(self.flows.flows) * 3 / 2),
            },
        );
        assert!(
            t.delivered > 0,
            "{}: none of {} datagrams reached the backends",
            path.name,
            t.offered
        );
    }
}

/// Routes for the HTTP runs through the NAT host. The client reaches the NAT host's service
/// address from a second address of its own, and the backends send what they answer to that
/// address back through the NAT host, which undoes the DNAT (a DNAT box must see both ways of
/// a connection). The client's own address stays on-link for the backends: the balancer's
/// DSR answers and the direct path's go straight back.
fn http_routes(tb: &Testbed, nat: &Host, client_mac: [u8; 6]) {
    let client = tb.client.as_str();
    netns::ip(&[
        "-n",
        client,
        "addr",
        "add",
        &format!("{CLIENT_NAT_SRC}/32"),
        "dev",
        "eth0",
    ]);
    netns::ip(&[
        "-n",
        client,
        "route",
        "add",
        &format!("{NAT_HTTP_ADDR}/32"),
        "via",
        &NAT_IP.to_string(),
        "src",
        &CLIENT_NAT_SRC.to_string(),
    ]);
    // Connection: close runs open tens of thousands of connections: all the ports, and a port
    // in TIME_WAIT may be reused (a new connection's timestamps are newer).
    netns::sysctl(client, "net.ipv4.ip_local_port_range", "1024 65535");
    netns::sysctl(client, "net.ipv4.tcp_tw_reuse", "1");
    nat.neighbours(&[(CLIENT_NAT_SRC, mac_string(&client_mac))]);
    for b in &tb.backends {
        netns::ip(&[
            "-n",
            &b.ns,
            "route",
            "add",
            &format!("{CLIENT_NAT_SRC}/32"),
            "via",
            &NAT_IP.to_string(),
        ]);
    }
}

/// Drop and error counters of every interface in `namespaces`, keyed "ns-role/dev counter".
fn drop_counters(namespaces: &[String]) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for ns in namespaces {
        let Ok(o) = netns::try_run(
            Command::new("ip").args(["-n", ns, "-s", "-j", "link", "show"]),
            Duration::from_secs(5),
        ) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
            continue;
        };
        let role = ns.rsplit('-').next().unwrap_or(ns);
        for link in v.as_array().into_iter().flatten() {
            let dev = link["ifname"].as_str().unwrap_or("?");
            for dir in ["rx", "tx"] {
                for what in ["dropped", "errors", "missed_errors"] {
                    if let Some(n) = link["stats64"][dir][what].as_u64() {
                        out.insert(format!("{role}/{dev} {dir}_{what}"), n);
                    }
                }
            }
        }
    }
    out
}

/// The balancer's `forwarded` counter and its packets per backend of the benchmark's service,
/// from `lb status --json`.
fn lb_counts(tb: &Testbed) -> (u64, Vec<(String, u64)>) {
    let st = tb.status_json();
    let forwarded = st["counters"]["forwarded"].as_u64().unwrap_or(0);
    let service = format!("{VIP}:{PORT}/udp");
    let per = common::find_service(&st, &service)
        .and_then(|s| s["backends"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["ip"].as_str().unwrap_or("?").to_owned(),
                b["packets"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    (forwarded, per)
}

fn mac_of(ns: &str, dev: &str) -> [u8; 6] {
    let out = netns::ip(&["-n", ns, "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("`ip -j link show` in {ns}: {e}: {out}"));
    let text = v[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {dev} in {ns}: {out}"));
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    assert_eq!(parts.len(), 6, "not a MAC address: {text}");
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}"));
    }
    mac
}

fn mac_string(mac: &[u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

fn preflight() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "throughput benchmark: needs root (network namespaces, XDP, BPF_PROG_TEST_RUN); \
             run it as root, e.g. through `cargo xtask bench`"
        );
        std::process::exit(1);
    }
    for (tool, arg) in [("nft", "--version"), ("bridge", "-V")] {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("throughput benchmark: `{tool}` is missing; scripts/setup.sh installs it");
            std::process::exit(1);
        }
    }
    if !web::present() {
        eprintln!("throughput benchmark: `wrk` is missing; scripts/setup.sh installs it");
        std::process::exit(1);
    }
}

fn kpps(pps: f64) -> String {
    format!("{:.0}", pps / 1e3)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// The figures for the JSON file (the terminal gets them as they come).
#[derive(Default)]
struct Report {
    figures: Vec<serde_json::Value>,
    /// CPUs' worth of other work on the machine, per trial.
    others: Vec<f64>,
}

impl Report {
    fn figure(&mut self, name: &str, value: f64, unit: &str, ratio: Option<f64>, method: &str) {
        self.figures.push(serde_json::json!({
            "name": name, "value": value, "unit": unit, "baseline_ratio": ratio,
            "baseline": ratio.map(|_| "lb (the balancer), same run"), "method": method,
        }));
    }
}

/// One table row per trial, and where frames were lost if they were.
fn print_trial(label: &str, m: &Measured) {
    let t = &m.t;
    let note = if t.requested.is_none() {
        "unpaced"
    } else if !t.loss_free() {
        "LOSS"
    } else if !t.kept_up() {
        "generator behind (its CPU is full)"
    } else {
        ""
    };
    println!(
        "{label:<46} {:>7} {:>7} {:>9} {:>7.3} {:>7.0} {:>6.2}  {note}",
        t.requested.map_or_else(|| "max".to_owned(), kpps),
        kpps(t.offered_pps()),
        kpps(t.delivered_pps()),
        100.0 * t.loss(),
        t.ns_per_packet(),
        t.others_load()
    );
    if let Some(at) = &m.lost_at {
        println!("{:<46}   lost {}: {at}", "", t.offered - t.delivered);
    }
}

fn main() {
    let mut quick = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => eprintln!("throughput benchmark: ignoring argument {other:?}"),
        }
    }
    preflight();
    install_signal_handlers();
    // Before anything is spawned, so the daemon and helpers share the session.
    if let Err(e) = threads::own_autogroup(progs::GENERATOR_NICE) {
        eprintln!(
            "throughput benchmark: could not raise the benchmark's priority ({e}); other \
             processes on the machine will slow the generator"
        );
    }
    let s = Settings::new(quick);
    let started = Instant::now();
    let method_rate = format!(
        "UDP 60-byte frames in {} flows from the client namespace (BPF_PROG_TEST_RUN live \
         frames, XDP_TX), counted by XDP sinks on the backends; highest delivered rate with \
         loss <= {}% over trials of {:.1} s, unpaced and paced; the whole path runs on the \
         generator's CPU",
        s.flows.flows,
        100.0 * LOSS_FREE,
        s.trial.as_secs_f64()
    );
    let method_cpu = format!(
        "CPU time of the generator's thread plus ksoftirqd on its CPU (scheduler clocks; the \
         whole path runs there in softirq) per delivered packet, at one fixed rate for all \
         paths, median of {} interleaved round(s) of {:.1} s; a cost over another path's \
         (minus direct, minus a floor) is the median of the rounds' differences; the balancer's \
         connection table has room for {TABLE_FLOWS} flows, as the NAT host's conntrack",
        s.cpu_rounds,
        s.cpu_trial.as_secs_f64()
    );

    println!(
        "== Throughput through the namespace test bed{} ==",
        if quick {
            " (quick: a look, not figures to publish)"
        } else {
            ""
        }
    );
    let mut bed = Bed::start(s.flows, s.hc_interval);
    let paths = bed.paths();
    let lb = paths
        .iter()
        .position(|p| p.key == "lb")
        .expect("the balancer's path");
    let direct = 0;
    bed.check_generator(&paths[direct]);
    println!(
        "client -> bridge -> {{lb | nft DNAT | kernel router | XDP forwarder}} -> bridge -> \
         backends, or client -> bridge -> backends;\nUDP to {VIP}:{PORT}, 60-byte frames, {} flows, \
         valid checksums; generator on CPU {}; set up in {:.1} s\n",
        s.flows.flows,
        bed.cpu,
        started.elapsed().as_secs_f64()
    );
    let mut report = Report::default();

    // The generator alone: its frames counted and dropped at the client's bridge port.
    let alone = {
        let uplink = bed
            .uplink_link
            .take()
            .expect("the uplink program on pclient");
        bed.progs.detach(progs::UPLINK, uplink);
        let sink = bed.progs.attach(progs::SINK, &bed.tb.sw, "pclient");
        let m = bed.trial(
            &paths[direct],
            Pace {
                rate: None,
                duration: s.trial,
                max_frames: None,
            },
        );
        bed.progs.detach(progs::SINK, sink);
        bed.uplink_link = Some(bed.progs.attach(progs::UPLINK, &bed.tb.sw, "pclient"));
        m.t
    };
    println!(
        "generator alone (counted at the client's bridge port): {:.2} Mpps, {:.0} ns of CPU per \
         frame",
        alone.delivered_pps() / 1e6,
        alone.ns_per_packet()
    );
    report.figure(
        "throughput: generator alone",
        alone.delivered_pps() / 1e6,
        "Mpps",
        None,
        "live-frames XDP_TX from the client's eth0, counted and dropped by XDP on its veth peer",
    );

    // 1. Offered vs delivered at several rates, and the highest loss-free rate.
    println!(
        "\n{:<46} {:>7} {:>7} {:>9} {:>7} {:>7} {:>6}  note",
        "path, then offered rates", "asked", "offered", "delivered", "loss", "CPU", "others"
    );
    println!(
        "{:<46} {:>7} {:>7} {:>9} {:>7} {:>7} {:>6}",
        "", "kpps", "kpps", "kpps", "%", "ns/pkt", "CPUs"
    );
    let mut best = Vec::new();
    let mut per_cpu_s = Vec::new();
    for path in &paths {
        let lb_before = (path.key == "lb").then(|| lb_counts(&bed.tb));
        bed.warm_up(path);
        let max = bed.trial(
            path,
            Pace {
                rate: None,
                duration: s.trial,
                max_frames: None,
            },
        );
        print_trial(path.name, &max);
        let mut trials = vec![max.t];
        for f in s.ladder {
            let m = bed.trial(
                path,
                Pace {
                    rate: Some(f * max.t.offered_pps()),
                    duration: s.trial,
                    max_frames: None,
                },
            );
            print_trial("", &m);
            trials.push(m.t);
        }
        report.others.extend(trials.iter().map(Trial::others_load));
        best.push(
            trials
                .iter()
                .filter(|t| t.loss_free())
                .map(Trial::delivered_pps)
                .fold(0.0, f64::max),
        );
        per_cpu_s.push(1e9 / max.t.ns_per_packet());
        if let Some((fwd0, per0)) = lb_before {
            let (fwd1, per1) = lb_counts(&bed.tb);
            let spread: Vec<String> = per1
                .iter()
                .map(|(ip, n)| {
                    let before = per0.iter().find(|(i, _)| i == ip).map_or(0, |(_, b)| *b);
                    format!("{ip} {}", n.saturating_sub(before))
                })
                .collect();
            println!(
                "{:<46}   the balancer's own counters: {} forwarded; per backend: {}",
                "",
                fwd1.saturating_sub(fwd0),
                spread.join(", ")
            );
        }
    }
    if let Some(n) = bed.nat.conntrack_count() {
        println!(
            "(the NAT host's conntrack table holds {n} entries, of at most {}; the balancer's \
             connection table has room for {TABLE_FLOWS})",
            bed.nat
                .conntrack_max()
                .map_or_else(|| "?".to_owned(), |m| m.to_string())
        );
    }

    println!(
        "\n{:<46} {:>14} {:>7} {:>14} {:>7}",
        "", "loss-free", "vs lb", "per CPU-second", "vs lb"
    );
    for (i, path) in paths.iter().enumerate() {
        // No ratio to a path that lost frames at every rate tried.
        let ratio = (best[lb] > 0.0).then(|| best[i] / best[lb]);
        let cpu_ratio = per_cpu_s[i] / per_cpu_s[lb].max(1.0);
        println!(
            "{:<46} {:>9} kpps {:>7} {:>9} kpps {cpu_ratio:>6.2}x",
            path.name,
            kpps(best[i]),
            ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            kpps(per_cpu_s[i])
        );
        report.figure(
            &format!("throughput: {}, highest loss-free rate", path.key),
            best[i] / 1e3,
            "kpps",
            ratio,
            &method_rate,
        );
        report.figure(
            &format!("throughput: {}, packets per CPU-second", path.key),
            per_cpu_s[i] / 1e3,
            "kpps",
            Some(cpu_ratio),
            "delivered packets per second of CPU (generator thread + ksoftirqd) in the unpaced \
             trial, generator included: what one whole CPU carries, whatever else ran",
        );
    }
    println!(
        "(loss-free: the highest delivered rate with loss <= {}%; per CPU-second: delivered \
         packets per second of CPU the unpaced trial used, generator included)",
        100.0 * LOSS_FREE
    );

    // 2. CPU per packet at one rate every path carries without loss, rounds interleaved so
    // that a change in the machine's other load touches every path alike.
    // (A path with no loss-free rate at all is measured at the floor rate, and says so.)
    let slowest = best
        .iter()
        .copied()
        .filter(|b| *b > 0.0)
        .fold(f64::INFINITY, f64::min);
    let rate = if slowest.is_finite() {
        ((0.5 * slowest / 10e3).floor() * 10e3).max(10e3)
    } else {
        10e3
    };
    for &ingress in s.cpu_ingresses {
        bed.set_ingress(ingress);
        cpu_costs(
            &mut bed,
            &paths,
            rate,
            &s,
            &mut report,
            ingress,
            &method_cpu,
        );
    }
    bed.set_ingress(Ingress::Bridge);

    let others = median(&mut report.others.clone());
    println!(
        "\nHow: the generator is BPF_PROG_TEST_RUN in live-frames mode (XDP_TX from the client's \
         eth0) on one thread pinned to CPU {cpu}, the benchmark in a session of its own at nice \
         {nice}; paced runs send what is due every ~1 ms. XDP sinks on the backends count what \
         arrives. Rates are frames over the generator's wall time; CPU time comes from the \
         scheduler's clocks of the generator thread and of ksoftirqd/{cpu}.\n\
         Caveats: the whole path (veth NAPI, bridge, balancer or conntrack/NAT, backends) runs \
         in softirq on the generator's CPU, so a rate is what one CPU does for generator and \
         path together, not the balancer's capacity (issue 5 saw 0.6-0.9 Mpps here for both a \
         minimal XDP forwarder and nft DNAT). Through the bridge, XDP on a veth pays for \
         turning the bridge's skb into an XDP frame (a copy), which a NIC driver does not: \
         the XDP forwarder's row is that floor; the raw-ingress figures redirect the client's \
         frames past it, as a NIC's driver would hand them over. Compare CPU per packet, not \
         raw rates. The machine's 2 CPUs are shared \
         with whatever else runs: other work took a median {others:.2} CPUs during the \
         trials{noisy}.",
        cpu = bed.cpu,
        nice = progs::GENERATOR_NICE,
        noisy = if others > 0.25 {
            " (figures are noisier for it: rerun on an idle machine to publish)"
        } else {
            ""
        }
    );
    report.figure(
        "throughput: other load on the machine during the trials",
        others,
        "CPUs",
        None,
        "/proc/stat busy time minus the benchmark's own, median over trials",
    );

    // 3. Requests per second of real HTTP.
    http_section(&bed, &s, &mut report);

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lb-bench");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let file = dir.join("throughput.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&report.figures).expect("figures as JSON"),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    println!(
        "\nfigures written to {} ({:.0} s)",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    drop(bed);
}

/// One way for HTTP through the test bed.
struct HttpPath {
    name: &'static str,
    key: &'static str,
    addr: SocketAddr,
}

/// What the runs of one path with one kind of connection gave.
#[derive(Default)]
struct HttpResult {
    rps: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    errors: web::Errors,
    /// CPU time per answered request: wrk, this process (the responders) and ksoftirqd.
    cpu_us: Vec<f64>,
    /// CPUs' worth of time used by wrk, and by this process (the responders), during a run.
    wrk_cpus: Vec<f64>,
    responder_cpus: Vec<f64>,
}

/// Requests per second of real HTTP: wrk from the client namespace to the backends'
/// responders, straight to b1, through the balancer and through the NAT host, over keep-alive
/// connections and with a new connection per request; runs interleaved, median of the rounds.
fn http_section(bed: &Bed, s: &Settings, report: &mut Report) {
    let paths = [
        HttpPath {
            name: "direct to backend b1 (the ceiling)",
            key: "direct",
            addr: SocketAddr::from((bed.tb.backends[0].ip, HTTP_PORT)),
        },
        HttpPath {
            name: "lb: the balancer (XDP, L2 DSR)",
            key: "lb",
            addr: SocketAddr::from((VIP, HTTP_PORT)),
        },
        HttpPath {
            name: "nftables DNAT + conntrack",
            key: "nft_dnat",
            addr: SocketAddr::from((NAT_HTTP_ADDR, HTTP_PORT)),
        },
    ];
    let started = Instant::now();
    // (request header, key, title)
    let mut kinds = vec![(
        false,
        "keep-alive",
        format!("keep-alive ({WRK_CONNECTIONS} connections held open: no new flows)"),
    )];
    if s.http_close {
        kinds.push((
            true,
            "connection-close",
            "Connection: close (a new TCP connection, so a new flow, per request)".to_owned(),
        ));
    }
    for p in &paths {
        common::http::get_in(&bed.tb.client, p.addr).unwrap_or_else(|e| {
            panic!(
                "HTTP: a GET of http://{}/ from the client ({}) failed: {e:#}",
                p.addr, p.name
            )
        });
    }
    let paths: Vec<HttpPath> = paths
        .into_iter()
        .filter(|p| s.http_paths.contains(&p.key))
        .collect();
    // No ratios to the direct path when it is not run.
    let direct = paths.iter().position(|p| p.key == "direct");
    let lb = paths
        .iter()
        .position(|p| p.key == "lb")
        .expect("wrk runs through the balancer");
    let script = web::write_script(&bed.tb.dir);
    // SAFETY: sysconf has no preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
    let ksoftirqds: Vec<i32> = (0..ncpu as usize).filter_map(threads::ksoftirqd).collect();
    // Everything the benchmark runs for HTTP: wrk (a child, counted once reaped), the
    // responders (this process) and softirq work deferred to ksoftirqd. Softirq work done in
    // those processes' context is in their time already.
    let own_cpu = || {
        [
            threads::rusage(libc::RUSAGE_CHILDREN),
            threads::rusage(libc::RUSAGE_SELF),
            ksoftirqds
                .iter()
                .filter_map(|&pid| threads::cpu_time(pid))
                .sum::<Duration>(),
        ]
    };
    let mut others = Vec::new();
    let mut results: Vec<Vec<HttpResult>> = kinds
        .iter()
        .map(|_| paths.iter().map(|_| HttpResult::default()).collect())
        .collect();
    for _round in 0..s.http_rounds {
        for (k, (close, ..)) in kinds.iter().enumerate() {
            for (i, p) in paths.iter().enumerate() {
                let load = web::Load {
                    threads: WRK_THREADS,
                    connections: WRK_CONNECTIONS,
                    seconds: s.http_seconds,
                    close: *close,
                };
                let a0 = bed.web.answered();
                let c0 = cpu::Stat::read();
                let o0 = own_cpu();
                let t0 = Instant::now();
                let run = web::run(&bed.tb.client, p.addr, load, &script);
                let o1 = own_cpu();
                let [wrk_cpu, responders_cpu, ksoftirqd_cpu] =
                    [0, 1, 2].map(|j| o1[j].saturating_sub(o0[j]));
                let own = wrk_cpu + responders_cpu + ksoftirqd_cpu;
                let machine = cpu::Stat::read().busy_since(&c0);
                let interval = t0.elapsed();
                check_stop();
                let answered = bed.web.answered() - a0;
                assert!(
                    answered >= run.requests,
                    "HTTP {}: wrk counted {} responses but the responders answered {answered}: \
                     something else answered",
                    p.key,
                    run.requests
                );
                assert!(run.requests > 0, "HTTP {}: no request was answered", p.key);
                let r = &mut results[k][i];
                r.rps.push(run.rps());
                r.p50_ms.push(run.p50_us / 1e3);
                r.p99_ms.push(run.p99_us / 1e3);
                r.errors.add(&run.errors);
                let cpus = |d: Duration| d.as_secs_f64() / interval.as_secs_f64().max(1e-9);
                r.wrk_cpus.push(cpus(wrk_cpu));
                r.responder_cpus.push(cpus(responders_cpu));
                r.cpu_us
                    .push(own.as_secs_f64() * 1e6 / answered.max(1) as f64);
                others.push(
                    (machine.as_secs_f64() - own.as_secs_f64()).max(0.0)
                        / interval.as_secs_f64().max(1e-9),
                );
            }
        }
    }

    println!(
        "\nHTTP requests per second: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} from the client, \
         {} s runs, median of {} interleaved round(s); tiny HTTP/1.1 responders on the backends \
         (one tokio runtime, {HTTP_WORKERS} thread(s), all backends); b1 alone for the ceiling, \
         b1-b3 through lb and DNAT",
        s.http_seconds, s.http_rounds
    );
    println!(
        "{:<46} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>6} {:>9}",
        "", "req/s", "vs lb", "vs", "p50", "p99", "errors", "CPU", "minus", "vs lb", "CPUs used"
    );
    println!(
        "{:<46} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>6} {:>9}",
        "", "", "", "direct", "ms", "ms", "", "us/req", "direct", "", "wrk+srv"
    );
    let method = |kind: &str| {
        format!(
            "wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{}s{} from the client namespace, \
             median of {} interleaved round(s); tiny HTTP/1.1 responders (tokio, {HTTP_WORKERS} \
             thread(s)) on the backends; wrk, responders and the path share the machine's CPUs",
            s.http_seconds,
            if kind == "keep-alive" {
                ""
            } else {
                " -H 'Connection: close'"
            },
            s.http_rounds
        )
    };
    let method_cpu = |kind: &str| {
        format!(
            "CPU time of wrk, of the benchmark's process (the responders) and of ksoftirqd per \
             answered request (scheduler clocks; softirq work runs in those contexts); {}",
            method(kind)
        )
    };
    let med = |v: &[f64]| median(&mut v.to_vec());
    for (k, (_, kind, title)) in kinds.iter().enumerate() {
        println!("{title}");
        let rps: Vec<f64> = results[k].iter().map(|r| med(&r.rps)).collect();
        let cpu: Vec<f64> = results[k].iter().map(|r| med(&r.cpu_us)).collect();
        // What each path adds over the direct one, when that ran (not itself).
        let own: Vec<Option<f64>> = (0..paths.len())
            .map(|i| match direct {
                Some(d) if d != i => Some(cpu[i] - cpu[d]),
                _ => None,
            })
            .collect();
        for (i, p) in paths.iter().enumerate() {
            let r = &results[k][i];
            let vs_lb = rps[i] / rps[lb].max(1e-9);
            let vs_direct = direct.map(|d| rps[i] / rps[d].max(1e-9));
            let cost_ratio = match (own[i], own[lb]) {
                (Some(o), Some(l)) if l > 0.0 => Some(o / l),
                _ => None,
            };
            let (p50, p99) = (med(&r.p50_ms), med(&r.p99_ms));
            println!(
                "{:<46} {:>8.0} {:>5.2}x {:>6} {:>6.2} {:>6.2} {:>6} {:>7.1} {:>7} {:>6} {:>9}{}",
                p.name,
                rps[i],
                vs_lb,
                vs_direct.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x")),
                p50,
                p99,
                r.errors.total(),
                cpu[i],
                own[i].map_or_else(|| "-".to_owned(), |o| format!("{o:.1}")),
                cost_ratio.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}x")),
                format!("{:.2}+{:.2}", med(&r.wrk_cpus), med(&r.responder_cpus)),
                if r.errors.total() > 0 {
                    format!("  ({})", r.errors.describe())
                } else {
                    String::new()
                }
            );
            let name = |what: &str| format!("http: {}, {kind}, {what}", p.key);
            report.figure(
                &name("requests per second"),
                rps[i],
                "requests/s",
                Some(vs_lb),
                &method(kind),
            );
            report.figure(&name("latency p50"), p50, "ms", None, &method(kind));
            report.figure(&name("latency p99"), p99, "ms", None, &method(kind));
            report.figure(
                &name("errors"),
                r.errors.total() as f64,
                "errors",
                None,
                &format!("{}; summed over the rounds", method(kind)),
            );
            report.figure(
                &name("CPU per request"),
                cpu[i],
                "us/request",
                None,
                &method_cpu(kind),
            );
            if let (Some(vs_direct), Some(own)) = (vs_direct, own[i]) {
                report.figure(
                    &name("share of the direct ceiling"),
                    vs_direct,
                    "ratio",
                    None,
                    &format!(
                        "requests per second over those of the direct path; {}",
                        method(kind)
                    ),
                );
                report.figure(
                    &name("CPU per request, minus direct"),
                    own,
                    "us/request",
                    cost_ratio,
                    &method_cpu(kind),
                );
            }
        }
    }
    let others = median(&mut others);
    println!(
        "(vs lb / vs direct: requests per second over the balancer's / the direct path's. CPU: \
         wrk + the responders + ksoftirqd per answered request; minus direct: what the middlebox \
         adds, and that as a multiple of what the balancer adds; CPUs used: by wrk and by the \
         responders, each with the softirq work (every hop's) that ran in its context. wrk, the responders and every \
         hop's softirq work share the machine's {ncpu:.0} CPUs, so a rate is the whole machine's, \
         not the balancer's capacity. Other work took a median {others:.2} CPUs during the \
         runs{}. The HTTP runs took {:.0} s.)",
        if others > 0.25 {
            ": figures are noisier for it"
        } else {
            ""
        },
        started.elapsed().as_secs_f64()
    );
    report.figure(
        "http: other load on the machine during the runs",
        others,
        "CPUs",
        None,
        "/proc/stat busy time minus wrk's, the benchmark process's and ksoftirqd's, median over \
         runs",
    );
}

/// How the client's frames reach a middlebox (`Bed::set_ingress`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ingress {
    /// Through the bridge, as skbs: an XDP program on a veth first copies each into a fresh
    /// page, which a NIC driver never does.
    Bridge,
    /// Redirected from the client's switch port (`uplink`): a raw frame, as from a NIC's
    /// driver; the kernel's stack builds its own skb around it.
    Raw,
}

/// CPU per delivered packet of every path at `rate`, with the client's frames reaching the
/// middleboxes by `ingress`: printed, and in the report.
fn cpu_costs(
    bed: &mut Bed,
    paths: &[Path],
    rate: f64,
    s: &Settings,
    report: &mut Report,
    ingress: Ingress,
    method_cpu: &str,
) {
    let (direct, lb) = (0, paths.iter().position(|p| p.key == "lb").expect("lb"));
    let (how, suffix) = match ingress {
        Ingress::Bridge => ("frames to the middleboxes through the bridge", ""),
        Ingress::Raw => (
            "frames to the middleboxes redirected raw, as from a NIC's driver",
            ", raw ingress",
        ),
    };
    let method = format!("{method_cpu}; {how}");
    let mut costs: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut lossy = vec![false; paths.len()];
    for round in 0..s.cpu_rounds {
        for (i, path) in paths.iter().enumerate() {
            if round == 0 && s.cpu_warm_up {
                bed.warm_up(path);
            }
            let m = bed.trial(
                path,
                Pace {
                    rate: Some(rate),
                    duration: s.cpu_trial,
                    max_frames: None,
                },
            );
            report.others.push(m.t.others_load());
            lossy[i] |= !m.t.loss_free() || !m.t.kept_up();
            costs[i].push(m.t.ns_per_packet());
        }
    }
    let med: Vec<f64> = costs.iter_mut().map(|c| median(c)).collect();
    // A path's cost over another: the median of the rounds' differences. Each round measures
    // the paths one after the other, so a drift of the machine's speed (as large as the
    // balancer's whole cost between rounds here) cancels out of a round's difference.
    let over = |a: usize, b: usize| {
        let mut d: Vec<f64> = costs[a].iter().zip(&costs[b]).map(|(x, y)| x - y).collect();
        let (lo, hi) = min_max(&d);
        (median(&mut d), lo, hi)
    };
    // (median, min, max) of each path's rounds minus direct's.
    let over_direct: Vec<(f64, f64, f64)> = (0..paths.len()).map(|i| over(i, direct)).collect();
    let own: Vec<f64> = over_direct.iter().map(|o| o.0).collect();
    println!(
        "\nCPU per delivered packet at {} kpps, {how} (median of {} round(s) of {:.1} s; \
         generator thread + ksoftirqd; minus direct: median of the rounds' differences):",
        kpps(rate),
        s.cpu_rounds,
        s.cpu_trial.as_secs_f64()
    );
    println!(
        "{:<46} {:>9} {:>13} {:>13} {:>13} {:>7}",
        "", "ns/packet", "(min..max)", "minus direct", "(min..max)", "vs lb"
    );
    for (i, path) in paths.iter().enumerate() {
        let (lo, hi) = min_max(&costs[i]);
        let ratio = (i != direct && own[lb] > 0.0).then(|| own[i] / own[lb]);
        let (_, own_lo, own_hi) = over_direct[i];
        println!(
            "{:<46} {:>9.0} {:>13} {:>13} {:>13} {:>7}{}",
            path.name,
            med[i],
            format!("({lo:.0}..{hi:.0})"),
            if i == direct {
                "-".to_owned()
            } else {
                format!("{:.0}", own[i])
            },
            if i == direct {
                String::new()
            } else {
                format!("({own_lo:.0}..{own_hi:.0})")
            },
            ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
            if lossy[i] {
                "  (loss, or the generator fell behind, in a round)"
            } else {
                ""
            }
        );
        report.figure(
            &format!("CPU per packet: {}{suffix}", path.key),
            med[i],
            "ns/packet",
            None,
            &method,
        );
        if i != direct {
            report.figure(
                &format!("CPU per packet: {}, minus direct{suffix}", path.key),
                own[i],
                "ns/packet",
                ratio,
                &method,
            );
        }
    }
    let idx = |key: &str| paths.iter().position(|p| p.key == key);
    if let (Some(nat), Some(kfwd), Some(xfwd)) = (
        idx("nft_dnat"),
        idx("kernel_forwarding"),
        idx("xdp_forwarder"),
    ) && own[lb] > 0.0
    {
        let (lb_over_floor, nat_over_floor) = (over(lb, xfwd).0, over(nat, kfwd).0);
        println!(
            "\n{how}: nftables DNAT costs {:.2}x what the balancer costs per packet (goal: at \
             least 5x).\n\
             Floors on this test bed: forwarding with XDP_TX costs {:.0} ns, kernel IP forwarding \
             {:.0} ns; on top of its floor the balancer adds {:.0} ns, DNAT + conntrack {:.0} ns.",
            own[nat] / own[lb],
            own[xfwd],
            own[kfwd],
            lb_over_floor,
            nat_over_floor,
        );
        report.figure(
            &format!("CPU per packet: lb minus the minimal XDP forwarder{suffix}"),
            lb_over_floor,
            "ns/packet",
            None,
            &method,
        );
        report.figure(
            &format!("CPU per packet: nft_dnat minus kernel IP forwarding{suffix}"),
            nat_over_floor,
            "ns/packet",
            None,
            &method,
        );
    } else {
        println!("\nthe balancer's cost did not stand out from the direct path's: no ratios");
    }
}
