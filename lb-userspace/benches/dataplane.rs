//! Per-packet cost of the XDP balancer, measured with `BPF_PROG_TEST_RUN` (`cargo xtask bench`).
//!
//! Method: one test-run call per packet (repeat = 1) with a fresh copy of the frame, so every
//! call times the path it claims to (with repeat > 1 the kernel reruns the program on the frame
//! it already rewrote). The figure per call is the kernel-reported run time; each scenario is
//! the mean over its packets, repeated `RUNS` times, reported as median (min..max). Every call's
//! verdict is checked. Baselines built in the same build and measured in the same run give the
//! fixed cost (baseline 1, an XDP_DROP program) that is subtracted to compare work.

#[path = "throughput/cpu.rs"]
mod cpu;
#[path = "dataplane/katran.rs"]
mod katran;
#[path = "dataplane/modes.rs"]
mod modes;
#[path = "../tests/packet/mod.rs"]
mod packet;

use std::{
    net::Ipv4Addr,
    ops::Range,
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::{Ebpf, TestRun as _, TestRunOptions, maps::HashMap as BpfHashMap, programs::Xdp};
use katran::Traffic;
use lb_common::{
    AF_INET, BACKEND_F_ALIVE, Backend, FORWARD_DSR, FlowKeyV4, RING_SIZE, Service, ServiceKeyV4,
    names,
};
use lb_userspace::{
    api::{Forward, HealthCheck, Request, Response, Scheduler, ServiceAddr},
    daemon::{Control, ProbeKey, Prober},
    dataplane::ServiceKey,
    dataplane::{Dataplane, Sizing},
    maglev::{MaglevBackend, build_table},
};

const RUNS: usize = 5;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const BASELINES: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-baselines"));

/// Katran's figures on this kind of machine (issue 5), raw ns per packet, same method.
const KATRAN_FIXED: f64 = 34.0;

/// The rows that have a Katran counterpart (`--katran`), named once for both.
/// The TCP ACK flag.
const TCP_ACK: u8 = 0x10;
const PASS: &str = "pass path (not a VIP)";
const ESTABLISHED_1: &str = "established, 1 flow";
const ESTABLISHED_16K: &str = "established, 16,384 flows";
const NEW_EMPTY: &str = "new flow every packet, table nearly empty";
const RING_ALONE: &str = "hash ring alone (fragments, no flow table)";

/// Where the flows of the frames come from: flow `i` has a distinct source address and port.
fn flow_frame(template: &[u8], i: u32) -> Vec<u8> {
    let mut f = template.to_vec();
    let src = Ipv4Addr::from(0x0a00_0000 | ((i >> 14) + 1)); // 10.x.y.z, 16384 ports each
    f[26..30].copy_from_slice(&src.octets());
    f[34..36].copy_from_slice(&(1024 + (i & 0x3fff) as u16).to_be_bytes());
    f
}

fn vip(service: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0ac8_0000 | (service + 1)) // 10.200.x.y
}

/// The first packet of a flow: a UDP datagram or a TCP SYN.
fn template(dst: Ipv4Addr, udp: bool) -> Vec<u8> {
    let client = Ipv4Addr::new(10, 0, 0, 1);
    if udp {
        packet::Frame::udp(client, 1, dst, 80).build()
    } else {
        packet::Frame::tcp(client, 1, dst, 80).build()
    }
}

/// A later packet of a flow: a UDP datagram or a TCP ACK (a SYN is a new connection, which the
/// balancer places without looking for it in the connection table).
fn established_template(dst: Ipv4Addr, udp: bool) -> Vec<u8> {
    if udp {
        return template(dst, true);
    }
    packet::Frame::tcp(Ipv4Addr::new(10, 0, 0, 1), 1, dst, 80)
        .tcp_flags(TCP_ACK)
        .build()
}

/// Runs `prog` once on `frame`; returns the kernel-reported ns and checks the verdict.
fn run_once(prog: &mut Xdp, frame: &[u8], out: &mut [u8], expect: u32) -> f64 {
    run_once_from(prog, frame, out, expect, None)
}

/// `run_once` with the packet received on interface `ingress` (an `xdp_md` context), which the
/// routed modes' FIB lookups route from.
fn run_once_from(
    prog: &mut Xdp,
    frame: &[u8],
    out: &mut [u8],
    expect: u32,
    ingress: Option<u32>,
) -> f64 {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Option<Vec<u8>> = ingress.map(|ifindex| {
        [0, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|w: &u32| w.to_ne_bytes())
            .collect()
    });
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(out),
            ctx_in: ctx.as_deref(),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, expect, "unexpected verdict");
    r.duration.as_nanos() as f64
}

/// ns per packet: (median, min, max) of the means of `RUNS` runs.
type Figure = (f64, f64, f64);

/// Mean ns per packet over `frames`, `RUNS` times: (median, min, max).
fn measure(
    prog: &mut Xdp,
    frames: &mut dyn FnMut(usize) -> Vec<u8>,
    n: usize,
    expect: u32,
) -> (f64, f64, f64) {
    measure_from(prog, frames, n, expect, None)
}

/// `measure` with the packets received on interface `ingress`.
fn measure_from(
    prog: &mut Xdp,
    frames: &mut dyn FnMut(usize) -> Vec<u8>,
    n: usize,
    expect: u32,
    ingress: Option<u32>,
) -> (f64, f64, f64) {
    let mut out = vec![0u8; 512];
    let means: Vec<f64> = (0..RUNS)
        .map(|run| {
            let total: f64 = (0..n)
                .map(|i| run_once_from(prog, &frames(run * n + i), &mut out, expect, ingress))
                .sum();
            total / n as f64
        })
        .collect();
    spread(means)
}

/// (median, min, max) of the runs' means.
fn spread(mut means: Vec<f64>) -> Figure {
    means.sort_by(f64::total_cmp);
    (means[RUNS / 2], means[0], means[RUNS - 1])
}

/// One program's part in a measurement: its frames and the verdict each call must give.
struct Side<'a> {
    prog: &'a mut Xdp,
    frames: Box<dyn FnMut(usize) -> Vec<u8> + 'a>,
    expect: u32,
}

impl Side<'_> {
    /// Runs frames `ks` once each; the sum of their ns.
    fn run(&mut self, ks: Range<usize>, out: &mut [u8]) -> f64 {
        ks.map(|k| run_once(self.prog, &(self.frames)(k), out, self.expect))
            .sum()
    }
}

/// Packets a program runs before the next one takes its turn in `measure_together`.
const TURN: usize = 1_000;

/// `measure` for several programs together: their calls take turns of `TURN` packets, the one
/// that opens a turn rotating, so whatever else slows the machine for a while (other virtual
/// machines on the host, a build beside the benchmark) slows them alike, and their differences
/// and ratios hold. `run(side, frames, out)` runs the frames numbered `frames` of program
/// `side` and returns the sum of their ns: each program gets the frames, verdict checks and
/// statistics it would get from `measure`.
fn measure_together(
    sides: usize,
    n: usize,
    mut run: impl FnMut(usize, Range<usize>, &mut [u8]) -> f64,
) -> Vec<Figure> {
    let mut out = vec![0u8; 512];
    let mut means = vec![Vec::with_capacity(RUNS); sides];
    for r in 0..RUNS {
        let mut totals = vec![0.0; sides];
        for (turn, start) in (0..n).step_by(TURN).enumerate() {
            let frames = r * n + start..r * n + (start + TURN).min(n);
            for k in 0..sides {
                let side = (r + turn + k) % sides;
                totals[side] += run(side, frames.clone(), &mut out);
            }
        }
        for (mean, total) in means.iter_mut().zip(totals) {
            mean.push(total / n as f64);
        }
    }
    means.into_iter().map(spread).collect()
}

/// Prints each figure as a table row and keeps it for the JSON file.
struct Report {
    baseline1: f64,
    baseline3: f64,
    figures: Vec<serde_json::Value>,
    /// Katran is measured in this run (`--katran`): the last column compares with its figures
    /// instead of issue 5's.
    katran_here: bool,
}

const METHOD: &str = "BPF_PROG_TEST_RUN, one call per packet, fresh frame, kernel-reported ns, \
                      mean per run, median of 5 runs";

impl Report {
    /// A row; `katran` is issue 5's raw figure for Katran on the same path, if any.
    fn row(&mut self, name: &str, figure: (f64, f64, f64), katran: Option<f64>) {
        self.push_row(name, figure, self.baseline1, katran, None, METHOD);
    }

    /// A row measured together with Katran's same path (`--katran`), with the figure of each
    /// and of baseline 1 (`base`, ns) from the same turns.
    fn compare(&mut self, name: &str, figure: Figure, katran: Figure, base: f64) {
        self.push_row(name, figure, base, None, Some(katran), METHOD);
    }

    /// A row of Katran's own figures (`--katran`); `base`: baseline 1 from the same turns;
    /// `how` says how Katran was run.
    fn katran_row(&mut self, name: &str, figure: Figure, base: f64, how: &str) {
        self.push_row(name, figure, base, None, None, &format!("{METHOD}; {how}"));
    }

    /// Work is ns − `base`, baseline 1 as measured with this row.
    fn push_row(
        &mut self,
        name: &str,
        (median, min, max): (f64, f64, f64),
        base: f64,
        katran: Option<f64>,
        same_run: Option<(f64, f64, f64)>,
        method: &str,
    ) {
        let work = median - base;
        let floor = self.baseline3 - self.baseline1;
        let katran_work = katran.map(|k| k - KATRAN_FIXED);
        let here_work = same_run.map(|(k, ..)| k - base);
        let katran_col = match (self.katran_here, katran_work, here_work) {
            (false, Some(k), _) => format!("{k:>4.0} -> {:.2}x", work / k),
            (true, _, Some(k)) => format!("{k:>6.1} -> {:.2}x", work / k),
            _ => "-".to_string(),
        };
        println!(
            "{name:<w$} {median:>7.1} ({min:>6.1}..{max:>6.1}) {work:>7.1} {:>8.2}x  {katran_col}",
            work / floor,
            w = self.width()
        );
        let mut figure = serde_json::json!({
            "name": name,
            "value": median,
            "unit": "ns/packet",
            "min": min,
            "max": max,
            "work_ns": work,
            "baseline_ratio": work / floor,
            "baseline": "work of baseline 3 (parse + one hash lookup + XDP_TX), same run",
            "katran_work_ns": katran_work,
            "katran_ratio": katran_work.map(|k| work / k),
            "method": method,
        });
        if self.katran_here {
            figure["baseline1_ns"] = base.into();
            figure["katran_same_run_work_ns"] = here_work.into();
            figure["katran_same_run_ratio"] = here_work.map(|k| work / k).into();
        }
        self.figures.push(figure);
    }

    /// Width of the name column: Katran's rows (`--katran`) have longer names.
    fn width(&self) -> usize {
        if self.katran_here { 54 } else { 46 }
    }

    fn figure(&mut self, name: &str, value: f64, unit: &str, method: &str) {
        println!("{name:<w$} {value:>9.2} {unit}", w = self.width());
        self.figures.push(serde_json::json!({
            "name": name, "value": value, "unit": unit, "baseline_ratio": null, "method": method,
        }));
    }
}

/// A balancer loaded with `services` VIPs of `backends` backends each, real Maglev tables.
/// Each VIP has a TCP and a UDP service on port 80, as the daemon makes them: each with an id,
/// a table and backends of its own (TCP: id `2 * vip`, UDP: `2 * vip + 1`).
fn balancer(services: u32, backends: u32, conntrack: u32) -> Dataplane {
    let mut dp = Dataplane::load(
        Sizing {
            max_services: 2 * services + 1,
            max_backends: 2 * services * backends,
            conntrack_size: conntrack,
            nat_size: 1 << 16,
        },
        false,
    )
    .expect("load the balancer");
    for s in 0..services {
        let members: Vec<MaglevBackend> = (0..backends)
            .map(|b| {
                let ip = Ipv4Addr::from(0x0b00_0000 | (s * backends + b + 1));
                MaglevBackend::new(ip.into(), 80, 1)
            })
            .collect();
        let table = build_table(&members, RING_SIZE).expect("maglev");
        for (p, proto) in [6u8, 17].into_iter().enumerate() {
            let id = 2 * s + p as u32;
            let first = id * backends;
            for b in 0..backends {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&members[b as usize].key[..4]);
                let backend = first + b;
                dp.set_backend(
                    backend,
                    Backend {
                        addr,
                        mac: [
                            2,
                            0,
                            (backend >> 16) as u8,
                            (backend >> 8) as u8,
                            backend as u8,
                            0,
                        ],
                        port: 80u16.to_be(),
                        generation: 1,
                        flags: BACKEND_F_ALIVE,
                        family: AF_INET,
                        forward: FORWARD_DSR,
                        _pad: 0,
                        service: id,
                    },
                )
                .expect("backend");
            }
            let ring: Vec<u32> = table.iter().map(|i| first + i).collect();
            dp.write_ring(id, &ring).expect("ring");
            dp.set_service(
                ServiceKey::V4(ServiceKeyV4 {
                    addr: u32::from_ne_bytes(vip(s).octets()),
                    port: 80u16.to_be(),
                    proto,
                    _pad: 0,
                }),
                Service {
                    id,
                    ring: id,
                    forward: FORWARD_DSR,
                    scheduler: lb_common::SCHED_MAGLEV,
                    flags: 0,
                    _pad: 0,
                },
            )
            .expect("service");
        }
    }
    dp.program(names::PROG_BALANCER).expect("verifier");
    dp
}

fn prog(dp: &mut Dataplane) -> &mut Xdp {
    dp.program(names::PROG_BALANCER).expect("program")
}

/// Sends flows `0..n` once each so they are in the connection table.
fn warm(dp: &mut Dataplane, services: u32, n: u32, udp: bool) {
    let templates: Vec<Vec<u8>> = (0..services).map(|s| template(vip(s), udp)).collect();
    let mut out = vec![0u8; 512];
    let p = prog(dp);
    for i in 0..n {
        run_once(
            p,
            &flow_frame(&templates[(i % services) as usize], i),
            &mut out,
            XDP_TX,
        );
    }
}

fn established(
    dp: &mut Dataplane,
    services: u32,
    flows: u32,
    udp: bool,
    per_run: usize,
) -> (f64, f64, f64) {
    warm(dp, services, flows, udp);
    let mut frames = established_frames(services, flows, udp);
    measure(prog(dp), &mut frames, per_run, XDP_TX)
}

/// Packets of the established flows `0..flows`, round robin.
fn established_frames(services: u32, flows: u32, udp: bool) -> impl FnMut(usize) -> Vec<u8> {
    let templates: Vec<Vec<u8>> = (0..services)
        .map(|s| established_template(vip(s), udp))
        .collect();
    move |k: usize| {
        let i = (k as u32) % flows;
        flow_frame(&templates[(i % services) as usize], i)
    }
}

fn new_flows(dp: &mut Dataplane, services: u32, first: u32, per_run: usize) -> (f64, f64, f64) {
    let mut frames = new_flow_frames(services, first);
    measure(prog(dp), &mut frames, per_run, XDP_TX)
}

/// A new flow every packet: flows `first..`.
fn new_flow_frames(services: u32, first: u32) -> impl FnMut(usize) -> Vec<u8> {
    let templates: Vec<Vec<u8>> = (0..services).map(|s| template(vip(s), false)).collect();
    move |k: usize| {
        let i = first + k as u32;
        flow_frame(&templates[(i % services) as usize], i)
    }
}

/// The ring without the connection table: IPv4 first fragments to a `--fragments` service
/// (source hash, dsr), which go to ring[hash(client)] and are never cached; every packet from
/// another client, so the ring entries read are spread over the table. The nearest our design
/// has to Katran's LRU-bypass VIPs; it also parses the fragment and looks the service up again
/// under port 0.
fn hash_ring_alone(dp: &mut Dataplane) -> Side<'_> {
    dp.set_service(
        ServiceKey::V4(ServiceKeyV4 {
            addr: u32::from_ne_bytes(vip(0).octets()),
            port: 0,
            proto: 6,
            _pad: 0,
        }),
        Service {
            id: 0,
            ring: 0,
            forward: FORWARD_DSR,
            scheduler: lb_common::SCHED_SOURCE_HASH,
            flags: lb_common::SERVICE_F_FRAGMENTS,
            _pad: 0,
        },
    )
    .expect("fragment service");
    let first_fragment = packet::Frame::tcp(Ipv4Addr::new(10, 0, 0, 1), 1, vip(0), 80)
        .frags(0x2000)
        .build();
    let frames = move |k: usize| {
        let mut f = first_fragment.clone();
        let client = Ipv4Addr::from(0x0a00_0000 | ((k as u32 + 1) & 0x00ff_ffff));
        f[26..30].copy_from_slice(&client.octets());
        f
    };
    Side {
        prog: prog(dp),
        frames: Box::new(frames),
        expect: XDP_TX,
    }
}

fn main() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark loads BPF programs: run it as root (cargo xtask bench)"
    );
    let quick = std::env::args().any(|a| a == "--quick");
    // Only the per-packet rows (with Katran if asked): for A/B runs while profiling.
    let per_packet_only = std::env::args().any(|a| a == "--per-packet");
    // Only the control-plane costs.
    if std::env::args().any(|a| a == "--control-plane") {
        let mut report = Report {
            baseline1: 0.0,
            baseline3: 0.0,
            figures: Vec::new(),
            katran_here: false,
        };
        control_plane_costs(&mut report, quick);
        write_json(&report);
        return;
    }
    let katran_object = katran_object();
    let per_run = if quick { 2_000 } else { 50_000 };
    let sizes = katran::Sizes {
        per_run,
        million: if quick { 50_000 } else { 1_000_000 },
        // Connection table of production size (Katran's 4M).
        conntrack: if quick { 1 << 18 } else { 4 << 20 },
        // The table that is full when new flows are measured.
        small: if quick { 1 << 15 } else { 1 << 20 },
    };

    println!("# lb data-plane benchmark: BPF_PROG_TEST_RUN, one call per packet (repeat = 1),");
    println!(
        "# fresh frame each call, kernel-reported ns; mean over {per_run} packets, median of {RUNS} runs (min..max)."
    );
    println!(
        "# work = ns - baseline 1 (fixed test-run cost); vs floor = work / work of baseline 3;"
    );
    println!(
        "# our SYN-flood guard has no limit set here: every new flow is inserted (new flows below the daemon's limit);"
    );
    if katran_object.is_some() {
        println!(
            "# Katran column: Katran's work on the same path, measured in this run by the same method, and our work / its work (target <= 0.70x)."
        );
    } else {
        println!(
            "# Katran column: Katran's work on the same path (its raw figure - 34 ns) and our work / its work (target <= 0.70x)."
        );
    }
    println!();

    // Katran's connection tables are per CPU, so its rows run on one CPU; the rows compared
    // with them (and the baselines they are all measured against) run on the same one.
    let pinned = katran_object.as_ref().map(|_| {
        katran::PinnedCpu::here().unwrap_or_else(|e| fail(&format!("pinning to a CPU: {e:#}")))
    });
    let other_work = OtherWork::start();

    let mut base = aya::EbpfLoader::new()
        .load(BASELINES)
        .expect("load baselines");
    let b1 = measure_baseline(&mut base, "baseline_drop", XDP_DROP, per_run);
    let b2 = measure_baseline(&mut base, "baseline_swap_tx", XDP_TX, per_run);
    let mut flows: BpfHashMap<_, FlowKeyV4, u32> =
        BpfHashMap::try_from(base.map_mut("BASELINE_FLOWS").expect("map")).expect("map type");
    let t = template(vip(0), false);
    let key_of = |frame: &[u8]| FlowKeyV4 {
        src: u32::from_ne_bytes(frame[26..30].try_into().unwrap()),
        dst: u32::from_ne_bytes(frame[30..34].try_into().unwrap()),
        sport: u16::from_ne_bytes(frame[34..36].try_into().unwrap()),
        dport: u16::from_ne_bytes(frame[36..38].try_into().unwrap()),
        proto: 6,
        _pad0: 0,
        _pad1: 0,
    };
    flows
        .insert(key_of(&flow_frame(&t, 0)), 1, 0)
        .expect("baseline flow");
    let b3 = {
        let p: &mut Xdp = base
            .program_mut("baseline_lookup_tx")
            .unwrap()
            .try_into()
            .unwrap();
        p.load().unwrap();
        measure(p, &mut |_| flow_frame(&t, 0), per_run, XDP_TX)
    };

    let mut beside = match (&katran_object, &pinned) {
        (Some(object), Some(pinned)) => {
            let xdp_drop: &mut Xdp = base
                .program_mut("baseline_drop")
                .expect("baseline_drop")
                .try_into()
                .expect("an XDP program");
            let t = template(vip(0), false);
            Some(Beside {
                katran: katran_ok(katran::Katran::load(object, &sizes, pinned.cpu)),
                baseline: Side {
                    prog: xdp_drop,
                    frames: Box::new(move |_| t.clone()),
                    expect: XDP_DROP,
                },
                rows: Vec::new(),
            })
        }
        _ => None,
    };
    if let Some(b) = &beside {
        for note in b.katran.notes() {
            println!("# {note}");
        }
        println!();
    }

    let mut report = Report {
        baseline1: b1.0,
        baseline3: b3.0,
        figures: Vec::new(),
        katran_here: beside.is_some(),
    };
    println!(
        "{:<w$} {:>7} {:>17} {:>7} {:>9}  Katran work -> ratio",
        "path",
        "ns",
        "(min..max)",
        "work",
        "vs floor",
        w = report.width()
    );
    report.row("baseline 1: XDP_DROP", b1, Some(34.0));
    report.row("baseline 2: swap MACs + XDP_TX", b2, Some(37.0));
    report.row("baseline 3: parse + 1 hash lookup + XDP_TX", b3, Some(46.0));
    println!();

    per_packet(&mut report, &sizes, beside.as_mut());
    if let Some(b) = &beside {
        println!("# {}", b.katran.flood_guard());
        other_work.report(&mut report);
    }
    drop(beside);
    drop(pinned);
    if per_packet_only {
        write_json(&report);
        return;
    }

    println!("# shape: established (16,384 flows over all services) and new-flow cost");
    // Quick mode: the two corners, each a program load of its own (most of this part's time).
    let shapes: Vec<(u32, u32)> = if quick {
        vec![(1, 2), (64, 100)]
    } else {
        let (services, backends) = ([1, 64, 512], [2, 100, 1000]);
        services
            .iter()
            .flat_map(|&s| backends.iter().map(move |&b| (s, b)))
            .collect()
    };
    for (services, backends) in shapes {
        {
            let mut dp = balancer(services, backends, 1 << 20);
            let est = established(&mut dp, services, 16_384, false, per_run / 5);
            let new = new_flows(&mut dp, services, 1 << 24, per_run / 5);
            report.row(
                &format!("{services} services x {backends} backends: established"),
                est,
                None,
            );
            report.row(
                &format!("{services} services x {backends} backends: new flow"),
                new,
                None,
            );
        }
    }
    println!();

    modes::forwarding_modes(&mut report, per_run / 5);

    control_plane_costs(&mut report, quick);
    write_json(&report);
}

fn write_json(report: &Report) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lb-bench");
    std::fs::create_dir_all(&dir).expect("create target/lb-bench");
    let path = dir.join("dataplane.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report.figures).expect("json"),
    )
    .expect("write the JSON figures");
    println!("\nfigures written to {}", path.display());
}

/// Katran measured beside our rows (`--katran`): its program, baseline 1 (measured in the same
/// turns as each pair of rows), and Katran's figures so far, each with the name of our row it
/// compares with and that row's baseline 1 (ns).
struct Beside<'b> {
    katran: katran::Katran,
    baseline: Side<'b>,
    rows: Vec<(String, Figure, f64)>,
}

/// The per-packet rows of one service of 100 backends; with Katran beside them, each row that
/// has a Katran counterpart is measured together with it, and Katran's rows follow ours.
fn per_packet(report: &mut Report, sizes: &katran::Sizes, mut beside: Option<&mut Beside<'_>>) {
    let &katran::Sizes {
        per_run,
        million,
        conntrack,
        small,
    } = sizes;
    let established_million = format!("established, {million} flows");
    let new_full = format!("new flow every packet, table full ({small})");

    let mut dp = balancer(1, 100, conntrack);
    let other = template(Ipv4Addr::new(10, 99, 0, 2), false);
    let pass = Side {
        prog: prog(&mut dp),
        frames: Box::new(move |_| other.clone()),
        expect: XDP_PASS,
    };
    let with_katran = beside.as_deref_mut().map(|b| (b, Traffic::Pass));
    compare_path(report, PASS, Some(59.0), pass, with_katran, per_run);
    for (name, flows, issue) in [
        (ESTABLISHED_1, 1, 103.0),
        (ESTABLISHED_16K, 16_384, 150.0),
        (established_million.as_str(), million, 249.0),
    ] {
        warm(&mut dp, 1, flows, false);
        let ours = Side {
            prog: prog(&mut dp),
            frames: Box::new(established_frames(1, flows, false)),
            expect: XDP_TX,
        };
        let with_katran = beside
            .as_deref_mut()
            .map(|b| (b, Traffic::Established(flows)));
        compare_path(report, name, Some(issue), ours, with_katran, per_run);
    }
    report.row(
        "established UDP, 16,384 flows",
        established(&mut dp, 1, 16_384, true, per_run),
        None,
    );
    drop(dp);
    // The same 16,384 flows in tables of other sizes: a flow's set is anywhere in the table,
    // so the cost of the set's cache miss grows with the memory it is spread over (TLB and
    // page-walk misses), not only with the number of flows.
    let sizes: &[u32] = if per_run < 10_000 {
        &[1 << 16]
    } else {
        &[1 << 18, 1 << 20, 1 << 22]
    };
    for &size in sizes {
        let mut dp = balancer(1, 100, size);
        let figure = established(&mut dp, 1, 16_384, false, per_run);
        report.row(
            &format!(
                "est. 16,384 flows, {}k-flow table ({} MB)",
                size / 1024,
                (size as usize * size_of::<lb_common::FlowSlot<FlowKeyV4>>()) >> 20
            ),
            figure,
            None,
        );
    }

    let mut dp = balancer(1, 100, conntrack);
    if let Some(b) = beside.as_deref_mut() {
        katran_ok(b.katran.fresh_tables(conntrack));
    }
    let ours = Side {
        prog: prog(&mut dp),
        frames: Box::new(new_flow_frames(1, 0)),
        expect: XDP_TX,
    };
    let with_katran = beside
        .as_deref_mut()
        .map(|b| (b, Traffic::NewFlows { first: 0 }));
    compare_path(report, NEW_EMPTY, Some(437.0), ours, with_katran, per_run);
    drop(dp);
    // A table already full: fill it past capacity, then every new flow evicts one.
    let mut dp = balancer(1, 100, small);
    warm(&mut dp, 1, small + small / 4, false);
    if let Some(b) = beside.as_deref_mut() {
        katran_ok(b.katran.fresh_tables(small));
        katran_ok(b.katran.warm(small + small / 4));
    }
    let ours = Side {
        prog: prog(&mut dp),
        frames: Box::new(new_flow_frames(1, 2 * small)),
        expect: XDP_TX,
    };
    let first = 2 * small;
    let with_katran = beside
        .as_deref_mut()
        .map(|b| (b, Traffic::NewFlows { first }));
    compare_path(report, &new_full, Some(653.0), ours, with_katran, per_run);
    drop(dp);
    let mut dp = balancer(1, 100, conntrack);
    let ours = hash_ring_alone(&mut dp);
    let first = 4 * small;
    let with_katran = beside
        .as_deref_mut()
        .map(|b| (b, Traffic::RingAlone { first }));
    compare_path(report, RING_ALONE, Some(111.0), ours, with_katran, per_run);
    drop(dp);
    if let Some(b) = beside {
        katran_ok(b.katran.check_no_fallback());
        let method = b.katran.method();
        for (name, figure, base) in &b.rows {
            report.katran_row(&format!("Katran: {name}"), *figure, *base, &method);
        }
    }
    println!();
}

/// Measures one of our paths and prints its row. With Katran, measures Katran's same path and
/// baseline 1 together with it (`measure_together`), checks what Katran did, and keeps
/// Katran's figure.
fn compare_path(
    report: &mut Report,
    name: &str,
    issue: Option<f64>,
    mut ours: Side,
    katran: Option<(&mut Beside, Traffic)>,
    n: usize,
) {
    let Some((beside, traffic)) = katran else {
        let figure = measure(ours.prog, &mut *ours.frames, n, ours.expect);
        report.row(name, figure, issue);
        return;
    };
    let figures = {
        let mut theirs = katran_ok(beside.katran.side(traffic));
        let baseline = &mut beside.baseline;
        measure_together(3, n, |side, frames, out| match side {
            0 => baseline.run(frames, out),
            1 => ours.run(frames, out),
            _ => theirs.run(frames, out),
        })
    };
    katran_ok(beside.katran.check(traffic, n));
    let base = figures[0].0;
    report.compare(name, figures[1], figures[2], base);
    beside.rows.push((traffic.row_name(name), figures[2], base));
}

/// The value, or the benchmark stops with what went wrong with Katran.
fn katran_ok<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| fail(&format!("measuring Katran: {e:#}")))
}

/// How much else ran on the machine over a stretch of the benchmark: the busy time of all CPUs
/// (/proc/stat) minus this process's own, per second. Ours and Katran's rows are measured one
/// after the other, so a build beside the benchmark (two CPUs, shared caches) can shift some
/// rows and not their counterparts.
struct OtherWork {
    machine: cpu::Stat,
    own: Duration,
    since: Instant,
}

impl OtherWork {
    fn start() -> Self {
        Self {
            machine: cpu::Stat::read(),
            own: own_cpu_time(),
            since: Instant::now(),
        }
    }

    fn report(&self, report: &mut Report) {
        let busy = cpu::Stat::read().busy_since(&self.machine);
        let own = own_cpu_time().saturating_sub(self.own);
        let others = busy.saturating_sub(own).as_secs_f64() / self.since.elapsed().as_secs_f64();
        report.figure(
            "other work during the rows compared with Katran",
            others,
            "CPUs",
            "busy CPU time of the machine (/proc/stat) minus the benchmark's own, per second",
        );
        if others > 0.25 {
            println!("(other work shifts rows unevenly: rerun on an idle machine to publish)");
        }
        println!();
    }
}

/// CPU time of this process, all threads (the test runs count as its system time).
fn own_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into; on failure it stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// `--katran PATH` (or `--katran=PATH`): Katran's balancer.bpf.o, measured beside ours.
fn katran_object() -> Option<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--katran" {
            let path = args.next().unwrap_or_else(|| {
                fail(
                    "--katran needs the path of Katran's balancer.bpf.o (scripts/katran-object.sh)",
                )
            });
            return Some(path.into());
        }
        if let Some(path) = arg.strip_prefix("--katran=") {
            return Some(path.into());
        }
    }
    None
}

fn fail(message: &str) -> ! {
    eprintln!("dataplane benchmark: {message}");
    std::process::exit(1)
}

/// Maglev build time, failure-to-removal time, and time to configure many services, through
/// the daemon's own control logic (`Control`) on the loaded program.
fn control_plane_costs(report: &mut Report, quick: bool) {
    println!("# control plane");
    for n in [10u32, 100, 1000] {
        let backends: Vec<MaglevBackend> = (0..n)
            .map(|i| {
                MaglevBackend::new(Ipv4Addr::from(0x0b00_0000 | (i + 1)).into(), 80, 1 + i % 3)
            })
            .collect();
        let reps = if quick { 5 } else { 50 };
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(build_table(&backends, RING_SIZE).expect("maglev"));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        report.figure(
            &format!("Maglev table, 65537 entries, {n} weighted backends"),
            times[times.len() / 2],
            "ms",
            "median build time of build_table (weights 1..3)",
        );
    }

    // What the connection table's sets of four cost in capacity: the share of flows still in a
    // table as it fills (the kernel's LRU hash kept every flow until full).
    let capacity = if quick { 1 << 16 } else { 1 << 20 };
    for percent in [25u32, 50, 75, 100] {
        let flows = (u64::from(capacity) * u64::from(percent) / 100) as u32;
        report.figure(
            &format!("connection table {percent}% full: flows keeping their entry"),
            100.0 * lb_userspace::flow_table::retention(capacity, flows, 1),
            "%",
            &format!(
                "flow_table::retention: {flows} random IPv4 flows entered one after the other \
                 into a table with room for {capacity} (the program's way choice, in userspace)"
            ),
        );
    }

    for n in [10u32, 100, 1000] {
        report.figure(
            &format!("failed backend out of the kernel table, {n} backends"),
            failure_to_removal(n),
            "ms",
            "median time of the fall-th failed probe's handling: Maglev rebuild, ring write, switch",
        );
    }

    let services = if quick { 10 } else { 500 };
    let (one_by_one, by_reload) = add_services(services);
    report.figure(
        &format!("add {services} services x 10 backends, one API call each"),
        one_by_one,
        "s",
        "Control::handle for every service and backend add, backends healthy at once (check \
         none) with known MACs: every add rebuilds its service's table",
    );
    report.figure(
        &format!("add {services} services x 10 backends, one configuration reload"),
        by_reload,
        "s",
        "Control::apply_config of a file declaring them (as lb reload or the daemon's start): \
         one table build per service",
    );
}

/// `backend(s, b)`: backend `b` (0..10) of service `s` of `add_services`.
fn bench_backend(s: u32, b: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0b00_0000 | (s * 10 + b + 1))
}

/// Seconds to add `services` services of 10 healthy backends each (none checks, MACs known):
/// one API call at a time, then (after removing them all) in one configuration reload.
fn add_services(services: u32) -> (f64, f64) {
    std::thread::spawn(move || {
        let backends: Vec<Ipv4Addr> = (0..services)
            .flat_map(|s| (0..10).map(move |b| bench_backend(s, b)))
            .collect();
        netns_with_neighbours(&backends);
        let dp = Dataplane::load(
            Sizing {
                max_services: services,
                max_backends: services * 10,
                conntrack_size: 1 << 16,
                nat_size: 1 << 16,
            },
            false,
        )
        .expect("load");
        let mut control = Control::new(dp, "lbb0".into(), NoProbes::default());
        let health = HealthCheck {
            kind: lb_userspace::api::CheckKind::None,
            ..HealthCheck::default()
        };
        let t = Instant::now();
        for s in 0..services {
            let service: ServiceAddr = format!("{}:80/tcp", vip(s)).parse().expect("service");
            let ok = control.handle(Request::ServiceAdd {
                service,
                scheduler: Scheduler::Maglev,
                forward: Forward::Dsr,
                health: health.clone(),
                fragments: false,
            });
            assert_eq!(ok, Response::Ok);
            for b in 0..10 {
                let ok = control.handle(Request::BackendAdd {
                    service,
                    ip: bench_backend(s, b).into(),
                    weight: 1,
                    port: None,
                });
                assert_eq!(ok, Response::Ok);
            }
        }
        let one_by_one = t.elapsed().as_secs_f64();
        assert_all_in_tables(&mut control, services);

        let empty = lb_userspace::daemon::config::Config::parse("", "empty").expect("config");
        control.apply_config(&empty, "empty").expect("remove all");
        let mut text = String::new();
        for s in 0..services {
            text.push_str(&format!(
                "[[service]]\naddress = \"{}:80/tcp\"\nhealth_check = {{ check = {{ type = \"none\" }} }}\n",
                vip(s)
            ));
            for b in 0..10 {
                text.push_str(&format!(
                    "[[service.backend]]\naddress = \"{}\"\n",
                    bench_backend(s, b)
                ));
            }
        }
        let config =
            lb_userspace::daemon::config::Config::parse(&text, "bench").expect("config");
        let t = Instant::now();
        control.apply_config(&config, "bench").expect("apply");
        let by_reload = t.elapsed().as_secs_f64();
        assert_all_in_tables(&mut control, services);
        (one_by_one, by_reload)
    })
    .join()
    .expect("add_services thread")
}

/// Checks that every backend of the `services` services is in its service's table.
fn assert_all_in_tables(control: &mut Control<NoProbes>, services: u32) {
    let Response::Status(status) = control.handle(Request::Status) else {
        panic!("no status");
    };
    assert_eq!(status.services.len(), services as usize);
    for s in &status.services {
        assert!(
            s.backends.len() == 10 && s.backends.iter().all(|b| b.in_table),
            "{}: not every backend in the table",
            s.service
        );
    }
}

/// Moves this thread into a network namespace of its own with an interface `lbb0` and a
/// permanent neighbour entry for each of `backends` (the daemon puts only backends with a
/// known MAC in a table).
fn netns_with_neighbours(backends: &[Ipv4Addr]) {
    // SAFETY: affects only this thread.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    let mut batch = String::from(
        "link add lbb0 type veth peer name lbb1\nlink set lbb0 up\nlink set lbb1 up\n",
    );
    for (i, ip) in (0u32..).zip(backends) {
        let mac = format!(
            "02:00:00:{:02x}:{:02x}:{:02x}",
            i >> 16 & 0xff,
            i >> 8 & 0xff,
            i & 0xff
        );
        batch.push_str(&format!(
            "neigh replace {ip} lladdr {mac} dev lbb0 nud permanent\n"
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "lb-bench-neigh-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, batch).expect("write ip batch");
    let status = std::process::Command::new("ip")
        .arg("-batch")
        .arg(&path)
        .status()
        .expect("run ip");
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "ip -batch failed");
}

/// Health probes are played by hand here; nothing runs in the background. The keys of the
/// probes started are kept so the benchmark can report their results.
#[derive(Clone, Default)]
struct NoProbes(std::sync::Arc<std::sync::Mutex<Vec<ProbeKey>>>);

impl Prober for NoProbes {
    type Handle = ();
    fn start(&mut self, key: ProbeKey, _: lb_userspace::daemon::ProbeTarget, _: HealthCheck) {
        self.0.lock().expect("lock").push(key);
    }
    fn stop(&mut self, (): ()) {}
}

/// Time from the health check that declares a backend failed (the `fall`-th failure reaching
/// the control loop) to the kernel using a table without it: the whole synchronous work of
/// `Control::probe_result` (table rebuild, write, switch, backend entry update).
fn failure_to_removal(backends: u32) -> f64 {
    std::thread::spawn(move || {
        let addrs: Vec<Ipv4Addr> = (0..backends)
            .map(|i| Ipv4Addr::from(0x0b00_0000 | (i + 1)))
            .collect();
        netns_with_neighbours(&addrs);

        let dp = Dataplane::load(
            Sizing {
                max_services: 1,
                max_backends: backends,
                conntrack_size: 1 << 16,
                nat_size: 1 << 16,
            },
            false,
        )
        .expect("load");
        let probes = NoProbes::default();
        let mut control = Control::new(dp, "lbb0".into(), probes.clone());
        let service: ServiceAddr = format!("{}:80/tcp", vip(0)).parse().expect("service");
        assert_eq!(
            control.handle(Request::ServiceAdd {
                service,
                scheduler: Scheduler::Maglev,
                forward: Forward::Dsr,
                health: HealthCheck::default(),
                fragments: false,
            }),
            Response::Ok
        );
        // One batch, as a configuration file adds them: the table is built once.
        control.batch(|control| {
            for ip in &addrs {
                let ok = control.handle(Request::BackendAdd {
                    service,
                    ip: (*ip).into(),
                    weight: 1,
                    port: None,
                });
                assert_eq!(ok, Response::Ok);
            }
        });
        // All up together, as the daemon's loop takes probe results queued at once.
        let keys = probes.0.lock().expect("lock").clone();
        control.batch(|control| {
            for key in &keys {
                control.probe_result(*key, Ok(()));
                control.probe_result(*key, Ok(()));
            }
        });
        let mut times: Vec<f64> = keys
            .iter()
            .take(9)
            .map(|key| {
                control.probe_result(*key, Err("refused".into()));
                let t = Instant::now();
                control.probe_result(*key, Err("refused".into()));
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    })
    .join()
    .expect("failure_to_removal thread")
}

fn measure_baseline(base: &mut Ebpf, name: &str, expect: u32, n: usize) -> (f64, f64, f64) {
    let p: &mut Xdp = base.program_mut(name).unwrap().try_into().unwrap();
    p.load().unwrap();
    let t = template(vip(0), false);
    measure(p, &mut |_| t.clone(), n, expect)
}
