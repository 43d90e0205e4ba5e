//! Katran (Meta's XDP balancer) measured in the same run and by the same method as ours, so the
//! ratio "our work / Katran's work" compares two programs on one machine (`--katran OBJECT`).
//!
//! Only Katran's compiled object is used (`scripts/katran-object.sh` builds it from a Katran
//! checkout). Its maps are filled through the layouts of `katran/lib/bpf/balancer_structs.h`,
//! written here from reading that header, as any Katran user's control plane does; the sizes
//! are checked against the object's maps when they are opened.
//!
//! Configuration (as issue 5's Katran anchor): one IPv4 TCP VIP (our VIP 0, port 80), 100 reals,
//! the VIP's consistent-hash ring filled by us, the next hop's MAC in `ctl_array`, and one LRU
//! connection table per possible CPU in `lru_mapping` (created here, as `KatranLb::initLrus`
//! does), of the size our rows use for theirs.

use std::{
    mem::size_of,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_userspace::maglev::{MaglevBackend, build_table};

use super::{
    RUNS, Side, TCP_ACK, TURN, XDP_PASS, XDP_TX, flow_frame, packet, run_once, template, vip,
};

// --- Katran's constants (katran/lib/bpf/balancer_consts.h, default build) ----------------------

/// Size of each VIP's consistent-hash ring.
const RING_SIZE: u32 = 65537;
/// `ch_rings` holds `MAX_VIPS` rings; the global counters in `stats` start at index `MAX_VIPS`.
const MAX_VIPS: u32 = 512;
/// `stats` index of the LRU counters (v1 packets, v2 misses).
const LRU_CNTRS: u32 = MAX_VIPS;
/// `stats` index of the LRU misses of TCP packets: v1 SYNs, v2 non-SYNs.
const LRU_MISS_CNTR: u32 = MAX_VIPS + 1;
/// `stats` index of the flood guard's window: v1 new flows in it, v2 its start (ktime ns).
const NEW_CONN_RATE_CNTR: u32 = MAX_VIPS + 2;
/// `stats` index counting packets that found no per-CPU LRU and used `fallback_cache`.
const FALLBACK_LRU_CNTR: u32 = MAX_VIPS + 3;
/// New flows a CPU may insert per second; past it `is_under_flood` skips LRU inserts.
const MAX_CONN_RATE: u64 = 125_000;
/// The flood guard's window.
const ONE_SEC_NS: u64 = 1_000_000_000;
/// `vip_meta.flags`: no connection-table lookup or insert for this VIP.
const F_LRU_BYPASS: u32 = 1 << 1;
/// `lru_mapping` has room for this many CPUs.
const MAX_SUPPORTED_CPUS: u32 = 128;
/// Linux's `BPF_MAP_TYPE_LRU_HASH`, the type of Katran's per-CPU connection tables.
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

const REALS: u32 = 100;
/// Katran sends every packet to this MAC (the default router: "LB on a stick").
const NEXT_HOP_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];

// --- Katran's map layouts (katran/lib/bpf/balancer_structs.h) -----------------------------------

/// `struct vip_definition`: address and port in network order (IPv4 in the first word).
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u32; 4],
    port: u16,
    proto: u8,
    _pad: u8,
}

/// `struct vip_meta`.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}

/// `struct real_definition`: the real's address in network order (IPv4 in the first word).
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    dst: [u32; 4],
    flags: u8,
    _pad: [u8; 3],
}

/// `struct ctl_value` (a union of u64, ifindex and MAC); index 0 of `ctl_array` is the MAC.
#[repr(C)]
#[derive(Clone, Copy)]
struct CtlValue {
    mac: [u8; 6],
    _pad: [u8; 2],
}

/// `struct flow_key`: addresses and ports in network order, as read from the packet.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlowKey {
    src: [u32; 4],
    dst: [u32; 4],
    ports: [u16; 2],
    proto: u8,
    _pad: [u8; 3],
}

/// `struct real_pos_lru`: the real's index, and the last-seen time of UDP flows.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealPosLru {
    pos: u32,
    _pad: u32,
    atime: u64,
}

/// `struct lb_stats`: two counters whose meaning depends on the index.
#[repr(C)]
#[derive(Clone, Copy)]
struct LbStats {
    v1: u64,
    v2: u64,
}

// SAFETY: plain `repr(C)` integers with every padding byte a named field.
unsafe impl Pod for VipDefinition {}
unsafe impl Pod for VipMeta {}
unsafe impl Pod for RealDefinition {}
unsafe impl Pod for CtlValue {}
unsafe impl Pod for FlowKey {}
unsafe impl Pod for RealPosLru {}
unsafe impl Pod for LbStats {}

const _: () = {
    assert!(size_of::<VipDefinition>() == 20);
    assert!(size_of::<RealDefinition>() == 20);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<RealPosLru>() == 16);
};

type Lru = HashMap<MapData, FlowKey, RealPosLru>;

/// Table sizes and packet counts: the ones our rows use, so each Katran row matches one of ours.
pub struct Sizes {
    pub per_run: usize,
    pub million: u32,
    pub conntrack: u32,
    pub small: u32,
}

/// The traffic of one of Katran's rows.
#[derive(Clone, Copy)]
pub enum Traffic {
    /// SYNs to an address that is not a VIP.
    Pass,
    /// Flows `0..n` established (sent once as SYNs), then ACKs of them round robin.
    Established(u32),
    /// A SYN of a new flow every packet, flows `first..`, paced under the flood guard.
    NewFlows { first: u32 },
    /// The same to the VIP with `F_LRU_BYPASS`: the hash ring alone (no table lookup or
    /// insert). Last: the VIP keeps the flag.
    RingAlone { first: u32 },
}

impl Traffic {
    /// The name of Katran's row, from the name of our row it compares with: the same path,
    /// but for the hash ring, which each program reaches its own way.
    pub fn row_name(self, ours: &str) -> String {
        match self {
            Traffic::RingAlone { .. } => "hash ring alone (VIP with F_LRU_BYPASS)".into(),
            _ => ours.into(),
        }
    }
}

/// Katran's program and the maps the benchmark writes or reads while it runs.
pub struct Katran {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipDefinition, VipMeta>,
    lru_mapping: ArrayOfMaps<MapData, Lru>,
    /// The connection table of each possible CPU, by CPU number.
    lrus: Vec<Lru>,
    stats: PerCpuArray<MapData, LbStats>,
    /// The CPU this thread is pinned to: the one whose table and flood window Katran uses.
    cpu: u32,
    pacer: Pacer,
    /// Katran's non-SYN misses when the established row being measured started.
    misses_before: u64,
    /// The object's path and build details, for the output.
    object: String,
    sizes: (u32, u32),
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("Katran's object has no map `{name}`"))
}

impl Katran {
    /// Loads Katran's object, configures it (tables of `sizes.conntrack` flows) and checks that
    /// it forwards. `cpu` is the CPU the calling thread is pinned to (`PinnedCpu`).
    pub fn load(object: &Path, sizes: &Sizes, cpu: u32) -> anyhow::Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load_file(object)
            .with_context(|| format!("loading Katran's object {}", object.display()))?;
        // Loaded before any map is taken out of `ebpf`: the program then holds its maps, and
        // the ones written once below may be closed here.
        let prog: &mut Xdp = ebpf
            .program_mut("balancer_ingress")
            .context("Katran's object has no program `balancer_ingress`")?
            .try_into()
            .context("balancer_ingress is not an XDP program")?;
        prog.load().context("loading balancer_ingress (verifier)")?;
        let vips = HashMap::try_from(take_map(&mut ebpf, "vip_map")?).context("vip_map")?;
        let lru_mapping =
            ArrayOfMaps::try_from(take_map(&mut ebpf, "lru_mapping")?).context("lru_mapping")?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "stats")?).context("stats")?;
        let mut katran = Self {
            ebpf,
            vips,
            lru_mapping,
            lrus: Vec::new(),
            stats,
            cpu,
            pacer: Pacer::default(),
            misses_before: 0,
            object: match build_info(object) {
                Some(info) => format!("{} ({info})", object.display()),
                None => object.display().to_string(),
            },
            sizes: (sizes.conntrack, sizes.small),
        };
        katran.fill_reals_and_ring()?;
        katran.set_vip_flags(0)?;
        katran.fresh_tables(sizes.conntrack)?;
        katran.check_forwarding()?;
        Ok(katran)
    }

    /// For the output's header, before the rows.
    pub fn notes(&self) -> Vec<String> {
        let (conntrack, small) = self.sizes;
        vec![
            format!("Katran: {}", self.object),
            format!(
                "Katran's configuration: 1 VIP (TCP {}:80), {REALS} reals, its ring filled by our \
                 Maglev; a {conntrack}-entry LRU per CPU in lru_mapping ({small} for the \
                 table-full row)",
                vip(0),
            ),
            format!(
                "Each Katran row is measured together with our row and baseline 1, pinned to CPU \
                 {}: their calls take turns of {TURN} packets, and both works are ns - the \
                 baseline 1 of those turns",
                self.cpu
            ),
            "Established rows send ACKs, ours and Katran's (both place a SYN without a look in \
             the table: a new connection); the other rows send SYNs, but for our hash-ring row: \
             first fragments to a fragments service, our one path without the connection table"
                .into(),
        ]
    }

    /// After the rows: what happened with the flood guard.
    pub fn flood_guard(&self) -> String {
        self.pacer.summary()
    }

    /// How Katran was run, for the JSON figures.
    pub fn method(&self) -> String {
        format!(
            "Katran's object {}; 1 VIP, {REALS} reals, per-CPU LRU of {} entries; calls taking \
             turns with ours and baseline 1 on one CPU, work = ns - baseline 1 of those turns; \
             established rows with ACK frames; {}",
            self.object,
            self.sizes.0,
            self.pacer.method()
        )
    }

    /// Katran's side of a row: prepares its tables for `traffic` and hands out its program
    /// and frames.
    pub fn side(&mut self, traffic: Traffic) -> anyhow::Result<Side<'_>> {
        match traffic {
            Traffic::Pass => {
                let other = template(Ipv4Addr::new(10, 99, 0, 2), false);
                Ok(Side {
                    prog: self.program()?,
                    frames: Box::new(move |_| other.clone()),
                    expect: XDP_PASS,
                })
            }
            Traffic::Established(flows) => {
                self.warm(flows)?;
                self.misses_before = self.counter(LRU_MISS_CNTR)?.v2;
                let t = packet::Frame::tcp(Ipv4Addr::new(10, 0, 0, 1), 1, vip(0), 80)
                    .tcp_flags(TCP_ACK)
                    .build();
                Ok(Side {
                    prog: self.program()?,
                    frames: Box::new(move |k| flow_frame(&t, (k as u32) % flows)),
                    expect: XDP_TX,
                })
            }
            Traffic::NewFlows { first } => self.paced_syns(first),
            Traffic::RingAlone { first } => {
                self.set_vip_flags(F_LRU_BYPASS)?;
                self.paced_syns(first)
            }
        }
    }

    /// After a row of `per_run` packets a run: checks that Katran's path was the one claimed.
    /// Established: every packet found its flow in the table (no non-SYN miss). New flows:
    /// every flow was inserted (the flood guard skipped none).
    pub fn check(&self, traffic: Traffic, per_run: usize) -> anyhow::Result<()> {
        match traffic {
            Traffic::Pass | Traffic::RingAlone { .. } => Ok(()),
            Traffic::Established(flows) => {
                let missed = self.counter(LRU_MISS_CNTR)?.v2 - self.misses_before;
                ensure!(
                    missed == 0,
                    "Katran missed its connection table {missed} times on {flows} established \
                     flows"
                );
                Ok(())
            }
            Traffic::NewFlows { first } => {
                let lru = &self.lrus[self.cpu as usize];
                let t = template(vip(0), false);
                let count = (RUNS * per_run) as u32;
                let missing = (first..first + count)
                    .filter(|&i| lru.get(&flow_key(&flow_frame(&t, i)), 0).is_err())
                    .count();
                ensure!(
                    missing == 0,
                    "{missing} of {count} new flows are not in Katran's table: its flood guard \
                     skipped their inserts"
                );
                Ok(())
            }
        }
    }

    /// Every packet found this CPU's table: none fell back to `fallback_cache`.
    pub fn check_no_fallback(&self) -> anyhow::Result<()> {
        let fallback = self.counter(FALLBACK_LRU_CNTR)?.v1;
        ensure!(
            fallback == 0,
            "{fallback} packets used Katran's fallback_cache: lru_mapping has no table for CPU {}",
            self.cpu
        );
        let lru = self.counter(LRU_CNTRS)?;
        ensure!(lru.v1 > 0, "Katran counted no packet to its VIP");
        Ok(())
    }

    /// New, empty connection tables of `entries` flows for every possible CPU, replacing the
    /// old ones in `lru_mapping` (flags 0 and sizes as `KatranLb::createLruMap`).
    pub fn fresh_tables(&mut self, entries: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))?;
        let cpus = u32::try_from(cpus)?;
        ensure!(
            cpus <= MAX_SUPPORTED_CPUS,
            "{cpus} CPUs: more than Katran's lru_mapping holds"
        );
        self.lrus.clear();
        for cpu in 0..cpus {
            let def = aya_obj::Map::new_from_params(
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<FlowKey>() as u32,
                size_of::<RealPosLru>() as u32,
                entries,
                0,
            );
            let data = MapData::create(def, &format!("katran_lru{cpu}"), None)
                .with_context(|| format!("creating a connection table of {entries} flows"))?;
            let lru = Lru::try_from(Map::LruHashMap(data))?;
            self.lru_mapping
                .set(cpu, &lru, 0)
                .context("writing lru_mapping")?;
            self.lrus.push(lru);
        }
        Ok(())
    }

    /// Sends flows `0..n` once each (SYN: a new connection, which Katran inserts).
    pub fn warm(&mut self, n: u32) -> anyhow::Result<()> {
        let t = template(vip(0), false);
        let mut out = vec![0u8; 512];
        for i in 0..n {
            self.pacer.before_new_flow(&self.stats, self.cpu);
            let frame = flow_frame(&t, i);
            run_once(self.program()?, &frame, &mut out, XDP_TX);
        }
        Ok(())
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        let prog = self
            .ebpf
            .program_mut("balancer_ingress")
            .context("balancer_ingress")?;
        Ok(prog.try_into()?)
    }

    /// SYNs of new flows `first..`, paced under the flood guard.
    fn paced_syns(&mut self, first: u32) -> anyhow::Result<Side<'_>> {
        let t = template(vip(0), false);
        let Self {
            ebpf,
            stats,
            cpu,
            pacer,
            ..
        } = self;
        let cpu = *cpu;
        let prog: &mut Xdp = ebpf
            .program_mut("balancer_ingress")
            .context("balancer_ingress")?
            .try_into()?;
        Ok(Side {
            prog,
            frames: Box::new(move |k| {
                pacer.before_new_flow(stats, cpu);
                flow_frame(&t, first + k as u32)
            }),
            expect: XDP_TX,
        })
    }

    /// Reals 1..=100 (Katran's index 0 means "no real"), VIP 0's ring filled by Maglev, and the
    /// next hop's MAC.
    fn fill_reals_and_ring(&mut self) -> anyhow::Result<()> {
        let real_ip = |r: u32| Ipv4Addr::from(0x0b00_0000 | r);
        let mut reals: Array<_, RealDefinition> =
            Array::try_from(take_map(&mut self.ebpf, "reals")?).context("reals")?;
        for r in 1..=REALS {
            let real = RealDefinition {
                dst: [u32::from_ne_bytes(real_ip(r).octets()), 0, 0, 0],
                flags: 0,
                _pad: [0; 3],
            };
            reals.set(r, real, 0).context("writing reals")?;
        }

        // The ring: our own Maglev table of the 100 reals, equal weights (each real holds 655
        // or 656 of the 65537 entries), real position p stored as Katran's index p + 1.
        let members: Vec<MaglevBackend> = (1..=REALS)
            .map(|r| MaglevBackend::new(real_ip(r).into(), 80, 1))
            .collect();
        let table = build_table(&members, RING_SIZE).context("building the Maglev table")?;
        let mut rings: Array<_, u32> =
            Array::try_from(take_map(&mut self.ebpf, "ch_rings")?).context("ch_rings")?;
        ensure!(
            rings.len() == MAX_VIPS * RING_SIZE,
            "ch_rings has {} entries, not MAX_VIPS x RING_SIZE = {}: Katran was built with \
             other constants than the ones this benchmark reads it with",
            rings.len(),
            MAX_VIPS * RING_SIZE
        );
        // VIP 0's ring starts at index 0.
        for (i, pos) in (0u32..).zip(&table) {
            rings.set(i, pos + 1, 0).context("writing ch_rings")?;
        }

        let mut ctl: Array<_, CtlValue> =
            Array::try_from(take_map(&mut self.ebpf, "ctl_array")?).context("ctl_array")?;
        let mac = CtlValue {
            mac: NEXT_HOP_MAC,
            _pad: [0; 2],
        };
        ctl.set(0, mac, 0).context("writing ctl_array")?;
        Ok(())
    }

    /// VIP 0 (TCP, port 80) as Katran's VIP number 0, with `flags`.
    fn set_vip_flags(&mut self, flags: u32) -> anyhow::Result<()> {
        let key = VipDefinition {
            addr: [u32::from_ne_bytes(vip(0).octets()), 0, 0, 0],
            port: 80u16.to_be(),
            proto: 6,
            _pad: 0,
        };
        let meta = VipMeta { flags, vip_num: 0 };
        self.vips.insert(key, meta, 0).context("writing vip_map")?;
        Ok(())
    }

    /// One SYN through the configured program: Katran must encapsulate it (IPIP) to one of
    /// the reals and send it to the next hop, or the maps were written wrong.
    fn check_forwarding(&mut self) -> anyhow::Result<()> {
        let frame = flow_frame(&template(vip(0), false), 0);
        let mut out = vec![0u8; 512];
        self.pacer.before_new_flow(&self.stats, self.cpu);
        run_once(self.program()?, &frame, &mut out, XDP_TX);
        let outer_dst = Ipv4Addr::from(<[u8; 4]>::try_from(&out[30..34])?);
        let octets = outer_dst.octets();
        ensure!(
            out[0..6] == NEXT_HOP_MAC
                && out[12..14] == [0x08, 0x00]
                && out[23] == 4
                && octets[..3] == [11, 0, 0]
                && (1..=REALS).contains(&u32::from(octets[3])),
            "Katran's first packet is not IPIP to a real via the next hop: {:02x?}",
            &out[..34]
        );
        Ok(())
    }

    /// This CPU's value of the global counter at `index` of `stats`.
    fn counter(&self, index: u32) -> anyhow::Result<LbStats> {
        let values = self.stats.get(&index, 0).context("reading stats")?;
        values
            .get(self.cpu as usize)
            .copied()
            .context("no stats for this CPU")
    }
}

/// The build details `scripts/katran-object.sh` writes beside the object, if there.
fn build_info(object: &Path) -> Option<String> {
    let mut path = object.as_os_str().to_owned();
    path.push(".info");
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().collect::<Vec<_>>().join("; "))
}

/// Katran's table key of an IPv4 TCP frame (the VIP has a port, so the destination port stays).
fn flow_key(frame: &[u8]) -> FlowKey {
    let word =
        |at: usize| u32::from_ne_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    let port = |at: usize| u16::from_ne_bytes([frame[at], frame[at + 1]]);
    FlowKey {
        src: [word(26), 0, 0, 0],
        dst: [word(30), 0, 0, 0],
        ports: [port(34), port(36)],
        proto: frame[23],
        _pad: [0; 3],
    }
}

/// Keeps the new flows offered to Katran under its SYN-flood guard. `is_under_flood` counts a
/// CPU's new flows in one-second windows and, past `MAX_CONN_RATE` in a window, Katran stops
/// inserting them into its table. A loop of test runs offers several times that rate, so
/// without pacing most "new flow" packets would time a path that inserts nothing. The pacer
/// reads the guard's own counter every `CHECK_EVERY` new flows and, when the next ones could
/// pass the limit, sleeps until the window closes: between two calls, outside the timed runs.
#[derive(Default)]
struct Pacer {
    /// New flows sent since the guard's counter was last read.
    counted: u32,
    /// Whether the counter was read at least once.
    started: bool,
    pauses: u32,
    paused: Duration,
    /// The highest rate of new flows seen in a window that had to be paused.
    offered: f64,
}

const CHECK_EVERY: u32 = 1_000;

impl Pacer {
    /// Called before each new flow is sent. Panics if the guard's counter cannot be read, as the
    /// benchmark does on any failed BPF call while timing.
    fn before_new_flow(&mut self, stats: &PerCpuArray<MapData, LbStats>, cpu: u32) {
        if self.started && self.counted < CHECK_EVERY {
            self.counted += 1;
            return;
        }
        self.started = true;
        self.counted = 1;
        let values = stats
            .get(&NEW_CONN_RATE_CNTR, 0)
            .expect("reading Katran's flood-guard counter");
        let window = values[cpu as usize];
        let now = monotonic_ns();
        let ends = window.v2 + ONE_SEC_NS;
        if window.v1 + u64::from(CHECK_EVERY) > MAX_CONN_RATE && now <= ends {
            let elapsed = now.saturating_sub(window.v2).max(1);
            self.offered = self
                .offered
                .max(window.v1 as f64 * ONE_SEC_NS as f64 / elapsed as f64);
            // Past the window's end, the next new flow opens a new window.
            let wait = Duration::from_nanos(ends - now) + Duration::from_millis(1);
            let t = Instant::now();
            std::thread::sleep(wait);
            self.pauses += 1;
            self.paused += t.elapsed();
        }
    }

    /// For the JSON figures.
    fn method(&self) -> String {
        if self.pauses == 0 {
            "new flows under Katran's flood guard (MAX_CONN_RATE) without pacing".into()
        } else {
            format!(
                "new flows paced under Katran's flood guard (MAX_CONN_RATE {MAX_CONN_RATE}/s per \
                 CPU): {} pauses outside the timed runs",
                self.pauses
            )
        }
    }

    /// For the output's header.
    fn summary(&self) -> String {
        if self.pauses == 0 {
            return format!(
                "Katran's flood guard (MAX_CONN_RATE = {MAX_CONN_RATE} new flows/s per CPU) was \
                 never reached: every new flow was inserted"
            );
        }
        format!(
            "Katran's flood guard: this loop offers {:.0} new flows/s per CPU, above its \
             MAX_CONN_RATE of {MAX_CONN_RATE}, past which it skips table inserts; paced: \
             {} pause(s), {:.1} s in all, between calls (outside the timed runs); every flow of \
             the new-flow rows was found in Katran's table afterwards",
            self.offered,
            self.pauses,
            self.paused.as_secs_f64()
        )
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`, which stamps the guard's window.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * ONE_SEC_NS + ts.tv_nsec as u64
}

fn current_cpu() -> anyhow::Result<u32> {
    // SAFETY: no arguments; returns -1 on error.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu)
        .map_err(|_| anyhow::anyhow!("sched_getcpu: {}", std::io::Error::last_os_error()))
}

/// Pins the calling thread to the CPU it runs on and restores its former CPU set on drop.
/// Katran's connection tables are per CPU: the flows a row warms must be in the table of the
/// CPU its timed packets run on. Our rows compared with Katran's run pinned the same way.
pub struct PinnedCpu {
    former: libc::cpu_set_t,
    pub cpu: u32,
}

impl PinnedCpu {
    pub fn here() -> anyhow::Result<Self> {
        // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
        let mut former: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is this thread; the size is the set's.
        if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut former) } != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let cpu = current_cpu()?;
        // SAFETY: as above.
        let mut only: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: cpu is a CPU number the kernel gave us, within the set's size.
        unsafe { libc::CPU_SET(cpu as usize, &mut only) };
        // SAFETY: as above.
        if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &only) } != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        Ok(Self { former, cpu })
    }
}

impl Drop for PinnedCpu {
    fn drop(&mut self) {
        // SAFETY: restores the set read in `here`. A failure leaves the thread pinned, which
        // only makes later rows run on one CPU.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &self.former) };
    }
}
