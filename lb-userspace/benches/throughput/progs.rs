//! The benchmark's own XDP programs (lb-ebpf/src/trafficgen.rs) and the live-frames generator
//! loop.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aya::{
    Ebpf, TestRun as _, TestRunAttrs, TestRunOptions,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray},
    programs::{Xdp, xdp::XdpLinkId, xdp::XdpMode},
};

use crate::common::netns;
use crate::threads;

const OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-trafficgen"));

/// Program names in the object.
pub const GENERATOR: &str = "trafficgen";
pub const SINK: &str = "sink";
pub const FWD: &str = "fwd";
pub const WIRE: &str = "wire";
pub const UPLINK: &str = "uplink";

/// Length of the generator's frames (`FRAME_LEN` in trafficgen.rs): 64 bytes on a wire.
pub const FRAME_LEN: usize = 60;
/// Most hosts the generator and the forwarder spread frames over (`MAX_HOPS` there).
pub const MAX_HOPS: usize = 4;
/// Frames per batch in live-frames mode: the kernel's default (NAPI_POLL_WEIGHT). The kernel
/// flushes the transmit queue after each batch.
const BATCH: u32 = 64;
/// Frames per test-run call when the generator is not paced (and the most a paced call sends).
const MAX_CHUNK: u64 = 1 << 14;
/// Mean pause between paced calls; each pause is drawn from 0.5..1.5 of it, so the bursts do
/// not phase-lock with anything periodic (the scheduler tick, timers).
const PACE_TICK: Duration = Duration::from_millis(1);
/// Nice value of the generator thread: nothing else must take its CPU, which also runs
/// everything downstream (see `generate`). Between sessions the autogroup's nice value counts
/// (see `threads::own_autogroup`). Not a real-time class: a real-time generator starves
/// ksoftirqd, where the kernel defers softirq work under load, and the veth rings overflow.
pub const GENERATOR_NICE: i32 = -20;

/// The flows the generator cycles through: `flows` distinct source (address, port) pairs,
/// `ports_per_addr` ports on each address from `base`.
#[derive(Clone, Copy, Debug)]
pub struct Flows {
    pub flows: u32,
    pub ports_per_addr: u32,
    pub base_addr: Ipv4Addr,
    pub base_port: u16,
}

impl Flows {
    /// The source of the frame with sequence number `seq`, as the generator program makes it.
    pub fn source(&self, seq: u64) -> (Ipv4Addr, u16) {
        let flow = (seq % u64::from(self.flows.max(1))) as u32;
        let per = self.ports_per_addr.max(1);
        let addr = Ipv4Addr::from(u32::from(self.base_addr).wrapping_add(flow / per));
        let port = u32::from(self.base_port).wrapping_add(flow % per) as u16;
        (addr, port)
    }
}

/// How long and how fast the generator runs.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Frames per second; `None`: as fast as it goes.
    pub rate: Option<f64>,
    pub duration: Duration,
    /// Stop after this many frames even if `duration` has not passed.
    pub max_frames: Option<u64>,
}

/// What one generator run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenRun {
    /// Frames asked for (repeat summed over calls).
    pub frames: u64,
    pub calls: u64,
    /// Wall time from the first call to the end of the last.
    pub wall: Duration,
    /// CPU time of the generator's thread: the program runs and whatever softirq work the
    /// transmits set off in that thread's context.
    pub cpu: Duration,
    /// Whether the thread got the nice value it asked for.
    pub niced: bool,
}

pub struct Progs {
    ebpf: Ebpf,
}

impl Progs {
    pub fn load(flows: Flows, sink_port: u16) -> Progs {
        let mut ebpf = Ebpf::load(OBJECT).unwrap_or_else(|e| panic!("loading lb-trafficgen: {e}"));
        for name in [GENERATOR, SINK, FWD, WIRE, UPLINK] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("program {name} missing from lb-trafficgen"))
                .try_into()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        let mut progs = Progs { ebpf };
        progs.array_set(
            "GEN_CONFIG",
            [
                flows.flows,
                flows.ports_per_addr,
                u32::from(flows.base_addr),
                u32::from(flows.base_port),
            ],
        );
        progs.array_set("SINK_CONFIG", u32::from(sink_port));
        progs
    }

    fn array_set<V: aya::Pod>(&mut self, name: &str, value: V) {
        self.array_write(name, &[value]);
    }

    /// Writes `values` to the first entries of the array `name`.
    fn array_write<V: aya::Pod>(&mut self, name: &str, values: &[V]) {
        let mut map: Array<_, V> = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name} missing from lb-trafficgen"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (i, v) in values.iter().enumerate() {
            map.set(i as u32, v, 0)
                .unwrap_or_else(|e| panic!("writing {name}: {e}"));
        }
    }

    /// Makes `frame` the frame the generator restores on every run.
    pub fn set_template(&mut self, frame: &[u8]) {
        assert_eq!(
            frame.len(),
            FRAME_LEN,
            "the generator's frames are {FRAME_LEN} bytes"
        );
        self.array_set("GEN_TEMPLATE", words::<{ FRAME_LEN / 4 }>(frame));
    }

    /// The minimal forwarder's own Ethernet address and the next hops it spreads frames over
    /// by their source port.
    pub fn set_fwd_macs(&mut self, own: [u8; 6], hops: &[[u8; 6]]) {
        self.array_write("FWD_MACS", &hop_table(&[mac_word(own)], hops));
    }

    /// The hosts the generator spreads its frames over, flow `f` to `hops[f % len]` (empty:
    /// every frame keeps the template's destination).
    pub fn set_generator_hops(&mut self, hops: &[[u8; 6]]) {
        self.array_write("GEN_HOPS", &hop_table(&[], hops));
    }

    /// Makes `uplink` hand frames for `mac` straight to `port` of the switch namespace `sw`
    /// (a devmap's entries name interfaces of the namespace that writes them).
    pub fn set_uplink(&mut self, sw: &str, mac: [u8; 6], port: &str) {
        let mut ports: DevMapHash<_> = self
            .ebpf
            .map_mut("UPLINK_PORTS")
            .expect("map UPLINK_PORTS")
            .try_into()
            .expect("a devmap");
        let ifindex = netns::run_in(sw, || {
            let name = std::ffi::CString::new(port).expect("an interface name");
            // SAFETY: a valid C string; reads this thread's network namespace.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "no interface {port} in {sw}");
            ports
                .insert(ifindex, ifindex, None, 0)
                .unwrap_or_else(|e| panic!("UPLINK_PORTS: {e}"));
            ifindex
        })
        .unwrap_or_else(|e| panic!("entering {sw}: {e}"));
        self.uplink_macs()
            .insert(mac_word(mac), ifindex, 0)
            .unwrap_or_else(|e| panic!("UPLINK_MACS: {e}"));
    }

    /// Frames for `mac` go through the bridge again.
    pub fn clear_uplink(&mut self, mac: [u8; 6]) {
        self.uplink_macs()
            .remove(&mac_word(mac))
            .unwrap_or_else(|e| panic!("UPLINK_MACS: {e}"));
    }

    fn uplink_macs(&mut self) -> HashMap<&mut MapData, u64, u32> {
        self.ebpf
            .map_mut("UPLINK_MACS")
            .expect("map UPLINK_MACS")
            .try_into()
            .expect("a hash map")
    }

    fn prog_mut(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("program {name}"))
    }

    fn generator(&self) -> &Xdp {
        self.ebpf
            .program(GENERATOR)
            .and_then(|p| p.try_into().ok())
            .expect("the generator program")
    }

    /// Attaches program `name` in native mode to `iface` in namespace `ns` (the interface is
    /// looked up, and the link made, from a thread inside it).
    pub fn attach(&mut self, name: &str, ns: &str, iface: &str) -> XdpLinkId {
        let prog = self.prog_mut(name);
        netns::run_in(ns, || prog.attach(iface, XdpMode::Driver))
            .unwrap_or_else(|e| panic!("entering {ns}: {e}"))
            .unwrap_or_else(|e| panic!("attaching {name} to {iface} in {ns}: {e}"))
    }

    pub fn detach(&mut self, name: &str, link: XdpLinkId) {
        self.prog_mut(name)
            .detach(link)
            .unwrap_or_else(|e| panic!("detaching {name}: {e}"));
    }

    fn per_cpu_sum(&self, map: &str, index: u32) -> u64 {
        let m: PerCpuArray<_, u64> = self
            .ebpf
            .map(map)
            .unwrap_or_else(|| panic!("map {map}"))
            .try_into()
            .unwrap_or_else(|e| panic!("{map}: {e}"));
        m.get(&index, 0)
            .unwrap_or_else(|e| panic!("reading {map}: {e}"))
            .iter()
            .sum()
    }

    /// Frames the generator program has produced, and frames it refused (not the template).
    pub fn generated(&self) -> (u64, u64) {
        (
            self.per_cpu_sum("GEN_STATS", 0),
            self.per_cpu_sum("GEN_STATS", 1),
        )
    }

    /// Datagrams counted (and dropped) by the sinks.
    pub fn sunk(&self) -> u64 {
        self.per_cpu_sum("SINK_STATS", 0)
    }

    /// Runs the generator once in the ordinary (not live) test mode and returns the frame it
    /// produced, for checking the rewrite and the checksums.
    pub fn generate_one(&self, frame: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; frame.len() + 64];
        let r = self
            .generator()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("test run of the generator: {e}"));
        assert_eq!(r.return_value, 3, "the generator must return XDP_TX");
        out.truncate(r.data_size_out as usize);
        out
    }

    /// Transmits the template from `eth0` of namespace `ns` as `pace` says, from a thread
    /// pinned to `cpu`. Stops early when `stop` is set.
    ///
    /// Live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`): the kernel runs the program on
    /// `repeat` copies of the frame in batches and really transmits what it returns with
    /// `XDP_TX`, on the interface named by the context's `ingress_ifindex`, which is looked up
    /// in the calling thread's namespace; output buffers must not be given.
    ///
    /// The kernel flushes each batch's transmits when it re-enables bottom halves, so the
    /// receive side (the veth peer's NAPI, the bridge, the balancer or NAT, the backends'
    /// sinks) runs right there, in softirq context on this thread and CPU: the generator
    /// cannot get ahead of what follows by more than the veth rings, and its thread's CPU time
    /// holds the whole path's.
    pub fn generate(
        &self,
        ns: &str,
        cpu: usize,
        frame: &[u8],
        pace: Pace,
        stop: &AtomicBool,
    ) -> GenRun {
        let prog = self.generator();
        std::thread::scope(|s| {
            s.spawn(|| {
                netns::enter(ns).unwrap_or_else(|e| panic!("entering {ns}: {e}"));
                threads::pin(0, cpu)
                    .unwrap_or_else(|e| panic!("pinning the generator to CPU {cpu}: {e}"));
                let niced = threads::renice_self(GENERATOR_NICE).is_ok();
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
                assert_ne!(ifindex, 0, "no eth0 in {ns}");
                let len = u32::try_from(frame.len()).expect("frame length");
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex.
                let ctx: Vec<u8> = [0, len, 0, ifindex, 0, 0]
                    .iter()
                    .flat_map(|v: &u32| v.to_ne_bytes())
                    .collect();
                let mut jitter = Jitter::new();
                let mut run = GenRun {
                    niced,
                    ..GenRun::default()
                };
                let budget = pace.max_frames.unwrap_or(u64::MAX);
                let cpu0 = threads::own_cpu_time();
                let start = Instant::now();
                loop {
                    let elapsed = start.elapsed();
                    if elapsed >= pace.duration
                        || run.frames >= budget
                        || stop.load(Ordering::Relaxed)
                    {
                        break;
                    }
                    let due = match pace.rate {
                        None => MAX_CHUNK,
                        Some(r) => ((r * elapsed.as_secs_f64()) as u64).saturating_sub(run.frames),
                    };
                    let chunk = due.min(MAX_CHUNK).min(budget - run.frames);
                    if chunk > 0 {
                        prog.test_run(TestRunOptions {
                            data_in: Some(frame),
                            ctx_in: Some(&ctx),
                            repeat: u32::try_from(chunk).expect("chunk fits u32"),
                            attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                            ..TestRunOptions::default()
                        })
                        .unwrap_or_else(|e| {
                            panic!("BPF_PROG_TEST_RUN in live-frames mode from eth0 of {ns}: {e}")
                        });
                        run.frames += chunk;
                        run.calls += 1;
                    }
                    if pace.rate.is_some() {
                        std::thread::sleep(PACE_TICK.mul_f64(jitter.next_between(0.5, 1.5)));
                    }
                }
                run.wall = start.elapsed();
                run.cpu = threads::own_cpu_time().saturating_sub(cpu0);
                run
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

/// Bytes as the native-order 32-bit words the programs copy them with.
fn words<const N: usize>(bytes: &[u8]) -> [u32; N] {
    let mut w = [0u32; N];
    for (w, c) in w.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    w
}

/// xorshift64: enough randomness for pause lengths.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Jitter(seed | 1)
    }

    fn next_between(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (hi - lo) * ((self.0 >> 11) as f64 / (1u64 << 53) as f64)
    }
}

/// A table of next hops as the programs read it: `head`, how many hops, their MACs.
fn hop_table(head: &[u64], hops: &[[u8; 6]]) -> Vec<u64> {
    assert!(hops.len() <= MAX_HOPS, "at most {MAX_HOPS} hops");
    let mut table = head.to_vec();
    table.push(hops.len() as u64);
    table.extend(hops.iter().map(|m| mac_word(*m)));
    table
}

/// A MAC as the programs' maps hold it (and `UPLINK_MACS`'s key): in the low six bytes, in
/// wire order.
fn mac_word(mac: [u8; 6]) -> u64 {
    let mut word = [0u8; 8];
    word[..6].copy_from_slice(&mac);
    u64::from_le_bytes(word)
}
