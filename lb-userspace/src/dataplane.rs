//! The only module that touches aya: loads the XDP object, attaches it, and reads and writes its
//! maps with the types of `lb-common`.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, IterableMap as _, MapData, PerCpuArray},
    programs::{
        SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId, XdpMode},
    },
};
use lb_common::{
    Backend, DataplaneConfig, DecapAddr, DecapReason, FLOW_WAYS, FORWARD_FULLNAT, FORWARD_NAT,
    FlowKeyV4, FlowKeyV6, FlowSetV4, FlowSetV6, FlowState, LcList, NatReplyV4, NatReplyV6,
    RING_CHUNK, RING_CHUNKS, RING_SIZE, Reason, RingChunk, Service, ServiceKeyV4, ServiceKeyV6,
    ServiceVip, Traffic, VIP_FILTER_NAT, VIP_FILTER_PLAIN, VIP_FILTER_WORDS, names,
    vip_filter_place,
};

/// A service's key in the kernel: the map depends on the VIP's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceKey {
    V4(ServiceKeyV4),
    V6(ServiceKeyV6),
}

impl ServiceKey {
    /// The key of `vip`:`port` (host order) for protocol `proto`, in the program's byte order.
    pub fn new(vip: std::net::IpAddr, port: u16, proto: u8) -> Self {
        let port = port.to_be();
        match vip {
            std::net::IpAddr::V4(v4) => ServiceKey::V4(ServiceKeyV4 {
                addr: u32::from_ne_bytes(v4.octets()),
                port,
                proto,
                _pad: 0,
            }),
            std::net::IpAddr::V6(v6) => ServiceKey::V6(ServiceKeyV6 {
                addr: crate::daemon::ipv6_words(&v6),
                port,
                proto,
                _pad: 0,
            }),
        }
    }

    /// The key's slot in the VIP filter.
    #[must_use]
    pub fn filter_bit(&self) -> u32 {
        match self {
            ServiceKey::V4(k) => k.filter_bit(),
            ServiceKey::V6(k) => k.filter_bit(),
        }
    }

    /// The service's own key as `SERVICE_VIPS` holds it; `None` for the port-0 key of a
    /// `--fragments` service, which only fragments are looked up by.
    #[must_use]
    pub fn vip(&self) -> Option<ServiceVip> {
        match self {
            ServiceKey::V4(k) if k.port != 0 => Some(ServiceVip::v4(k)),
            ServiceKey::V6(k) if k.port != 0 => Some(ServiceVip::v6(k)),
            _ => None,
        }
    }
}

use crate::{
    flow_table::{FlowTable, Holder, legacy},
    mapped::MapMemory,
    pins::PinDir,
};

/// The VIP filter bit a service sets: nat/fullnat services' flows are not in the connection
/// table, which the program then skips.
fn filter_kind(service: &Service) -> u64 {
    if matches!(service.forward, FORWARD_NAT | FORWARD_FULLNAT) {
        VIP_FILTER_NAT
    } else {
        VIP_FILTER_PLAIN
    }
}

/// The XDP object built by build.rs from lb-ebpf.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("{what} of {name}: {source}")]
    Io {
        what: &'static str,
        name: &'static str,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DataplaneError>;

/// Sizes of the maps, fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    pub max_services: u32,
    pub max_backends: u32,
    /// Flows each connection table has room for (a whole number of sets: `normalized`).
    pub conntrack_size: u32,
    /// Entries of each NAT map (forward flows and replies, per family).
    pub nat_size: u32,
}

impl Default for Sizing {
    fn default() -> Self {
        Sizing {
            max_services: lb_common::DEFAULT_MAX_SERVICES,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
            nat_size: lb_common::DEFAULT_NAT_SIZE,
        }
    }
}

impl Sizing {
    /// Tables in the ring map: one per service plus one spare to build the next table in.
    pub fn ring_tables(&self) -> u32 {
        self.max_services + 1
    }

    /// Sets of each connection table (a power of two).
    pub fn flow_sets(&self) -> u32 {
        lb_common::flow_sets(self.conntrack_size)
    }

    /// These sizes as the maps get them: the connection tables rounded up to a power of two
    /// of sets, and no more backends than a connection-table way can name.
    #[must_use]
    pub fn normalized(self) -> Self {
        Sizing {
            conntrack_size: self.flow_sets().saturating_mul(FLOW_WAYS as u32),
            max_backends: self.max_backends.min(lb_common::FLOW_MAX_BACKENDS),
            ..self
        }
    }
}

/// Where to attach, as asked on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Driver (native) mode; fail if the driver cannot run XDP.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
    /// Native, and generic with a warning when the driver cannot.
    Auto,
}

pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKeyV4, Service>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, RingChunk>,
    ring_memory: MapMemory<u32>,
    flow_table: FlowTable<FlowKeyV4>,
    services_v6: HashMap<MapData, ServiceKeyV6, Service>,
    flow_table_v6: FlowTable<FlowKeyV6>,
    /// The connection tables' fds, which the program's load refers to (the tables are used
    /// through their mappings).
    _flow_maps: (Array<MapData, FlowSetV4>, Array<MapData, FlowSetV6>),
    service_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
    reason_stats: PerCpuArray<MapData, u64>,
    flow_counts: Array<MapData, i64>,
    lc_lists: Array<MapData, LcList>,
    clock: Array<MapData, u32>,
    nat_flows: HashMap<MapData, FlowKeyV4, FlowState>,
    nat_flows_v6: HashMap<MapData, FlowKeyV6, FlowState>,
    nat_replies: HashMap<MapData, FlowKeyV4, NatReplyV4>,
    nat_replies_v6: HashMap<MapData, FlowKeyV6, NatReplyV6>,
    vip_filter: Array<MapData, u64>,
    service_vips: Array<MapData, ServiceVip>,
    /// What `vip_filter` holds.
    filter_words: Vec<u64>,
    /// The service keys in the maps with the filter bit each sets (`VIP_FILTER_PLAIN` or
    /// `VIP_FILTER_NAT`), and how many keys set each (slot, bit).
    filter_keys: std::collections::HashMap<ServiceKey, u64>,
    filter_users: std::collections::HashMap<(u32, u64), u32>,
    sizing: Sizing,
}

/// The nat/fullnat tables, read whole: forward entries (client 5-tuple → flow) and reply
/// entries (backend's 5-tuple → client and VIP), per family.
#[derive(Clone, Debug, Default)]
pub struct NatTables {
    pub flows_v4: Vec<(FlowKeyV4, FlowState)>,
    pub replies_v4: Vec<(FlowKeyV4, NatReplyV4)>,
    pub flows_v6: Vec<(FlowKeyV6, FlowState)>,
    pub replies_v6: Vec<(FlowKeyV6, NatReplyV6)>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DataplaneError::Map { name, source })
}

impl Dataplane {
    /// Loads the object with maps of the given sizes. `debug_packets` compiles the per-packet
    /// log statements in (the verifier drops them otherwise). Nothing is attached yet.
    pub fn load(sizing: Sizing, debug_packets: bool) -> Result<Self> {
        Self::load_with(sizing, debug_packets, None)
    }

    /// Like `load`, but every map is pinned in `pins`, reusing the maps already pinned there
    /// (their layouts must have been checked with `PinDir::check_layouts`).
    pub fn load_pinned(sizing: Sizing, debug_packets: bool, pins: &PinDir) -> Result<Self> {
        Self::load_with(sizing, debug_packets, Some(pins))
    }

    fn load_with(sizing: Sizing, debug_packets: bool, pins: Option<&PinDir>) -> Result<Self> {
        let sizing = sizing.normalized();
        let debug: u32 = debug_packets.into();
        let flow_sets = sizing.flow_sets();
        let mut loader = EbpfLoader::new();
        loader
            // Room for each service's port-0 entry too (`--fragments`).
            .map_max_entries(names::SERVICES, 2 * sizing.max_services)
            .map_max_entries(names::SERVICE_STATS, sizing.max_services)
            .map_max_entries(names::RINGS, RING_CHUNKS * sizing.ring_tables())
            .map_max_entries(names::BACKENDS, sizing.max_backends)
            .map_max_entries(names::BACKEND_STATS, sizing.max_backends)
            .map_max_entries(names::SERVICE_VIPS, sizing.max_services)
            .map_max_entries(names::FLOWS, flow_sets)
            .map_max_entries(names::SERVICES_V6, 2 * sizing.max_services)
            .map_max_entries(names::FLOWS_V6, flow_sets)
            .map_max_entries(names::FLOW_COUNTS, sizing.max_backends)
            .map_max_entries(names::RR_CURSORS, sizing.max_services)
            .map_max_entries(names::LC_LISTS, sizing.ring_tables())
            .map_max_entries(names::NAT_FLOWS, sizing.nat_size)
            .map_max_entries(names::NAT_FLOWS_V6, sizing.nat_size)
            .map_max_entries(names::NAT_REPLIES, sizing.nat_size)
            .map_max_entries(names::NAT_REPLIES_V6, sizing.nat_size)
            .override_global(names::GLOBAL_DEBUG, &debug, true)
            .override_global(names::GLOBAL_FLOW_SETS, &flow_sets, true);
        let paths: Vec<(&'static str, PathBuf)> = pins
            .map(|p| PinDir::map_names().map(|n| (n, p.map_path(n))).collect())
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(XDP_OBJECT)?;
        let rings: Array<MapData, RingChunk> = take(&mut ebpf, names::RINGS)?;
        let ring_memory = mapped(
            rings.map(),
            (RING_CHUNKS * RING_CHUNK * sizing.ring_tables()) as usize,
            names::RINGS,
        )?;
        let flows: Array<MapData, FlowSetV4> = take(&mut ebpf, names::FLOWS)?;
        let flows_v6: Array<MapData, FlowSetV6> = take(&mut ebpf, names::FLOWS_V6)?;
        let flow_table = FlowTable::new(mapped(flows.map(), flow_sets as usize, names::FLOWS)?);
        let flow_table_v6 =
            FlowTable::new(mapped(flows_v6.map(), flow_sets as usize, names::FLOWS_V6)?);
        let mut dp = Dataplane {
            services: take(&mut ebpf, names::SERVICES)?,
            backends: take(&mut ebpf, names::BACKENDS)?,
            rings,
            ring_memory,
            flow_table,
            services_v6: take(&mut ebpf, names::SERVICES_V6)?,
            flow_table_v6,
            _flow_maps: (flows, flows_v6),
            service_stats: take(&mut ebpf, names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            reason_stats: take(&mut ebpf, names::REASON_STATS)?,
            flow_counts: take(&mut ebpf, names::FLOW_COUNTS)?,
            lc_lists: take(&mut ebpf, names::LC_LISTS)?,
            clock: take(&mut ebpf, names::CLOCK)?,
            nat_flows: take(&mut ebpf, names::NAT_FLOWS)?,
            nat_flows_v6: take(&mut ebpf, names::NAT_FLOWS_V6)?,
            nat_replies: take(&mut ebpf, names::NAT_REPLIES)?,
            nat_replies_v6: take(&mut ebpf, names::NAT_REPLIES_V6)?,
            vip_filter: take(&mut ebpf, names::VIP_FILTER)?,
            service_vips: take(&mut ebpf, names::SERVICE_VIPS)?,
            filter_words: vec![0; VIP_FILTER_WORDS as usize],
            filter_keys: std::collections::HashMap::new(),
            filter_users: std::collections::HashMap::new(),
            ebpf,
            sizing,
        };
        // Pinned service maps may already hold services: the filter must pass them, and their
        // flows' ways are checked against their keys.
        for key in dp.service_keys()? {
            let service = dp.service(&key)?;
            dp.filter_add(key, filter_kind(&service))?;
            dp.set_service_vip(&key, service.id)?;
        }
        Ok(dp)
    }

    pub fn sizing(&self) -> Sizing {
        self.sizing
    }

    /// The aya object, for the logger and for tests that run programs with `BPF_PROG_TEST_RUN`.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Verifies and loads one of the object's XDP programs into the kernel.
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp> {
        loaded_xdp(&mut self.ebpf, name)
    }

    /// Attaches the balancer to `iface`. Returns the mode actually used. The link lives as long
    /// as this `Dataplane`: dropping it detaches the program.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode> {
        attach_program(self.program(names::PROG_BALANCER)?, iface, mode).map(|(mode, _)| mode)
    }

    /// Attaches through the link pinned in `pins`: if one is there (a data plane left running),
    /// this program replaces the one it runs in a single atomic update, so no packet meets an
    /// interface without a program; otherwise it attaches to `iface` and pins the new link.
    /// Returns whether an existing link was taken over.
    pub fn attach_pinned(&mut self, iface: &str, mode: AttachMode, pins: &PinDir) -> Result<bool> {
        self.attach_pinned_at(iface, mode, &pins.link_path())
    }

    /// `attach_pinned` with the link pinned at `link_path` (one per interface).
    pub fn attach_pinned_at(
        &mut self,
        iface: &str,
        mode: AttachMode,
        link_path: &std::path::Path,
    ) -> Result<bool> {
        let link_err = |source: std::io::Error| DataplaneError::Io {
            what: "pinning the XDP link",
            name: "link",
            source,
        };
        let prog = self.program(names::PROG_BALANCER)?;
        if link_path.exists() {
            let pinned = PinnedLink::from_pin(link_path)
                .map_err(|e| link_err(std::io::Error::other(e.to_string())))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| link_err(std::io::Error::other(e.to_string())))?;
            prog.attach_to_link(link)
                .map_err(|source| DataplaneError::Program {
                    name: "replacing the program on the pinned link",
                    source,
                })?;
            return Ok(true);
        }
        let (_, id) = attach_program(prog, iface, mode)?;
        let link = prog
            .take_link(id)
            .map_err(|source| DataplaneError::Program {
                name: "taking the XDP link",
                source,
            })?;
        let fd_link =
            FdLink::try_from(link).map_err(|e| link_err(std::io::Error::other(e.to_string())))?;
        fd_link
            .pin(link_path)
            .map_err(|e| link_err(std::io::Error::other(e.to_string())))?;
        Ok(false)
    }

    /// Attaches the health-check steering program to `iface`'s egress (tcx on kernels that
    /// have it, else a clsact qdisc). Not pinned: it serves the daemon's own probes and goes
    /// with the daemon.
    pub fn attach_hc_egress(&mut self, iface: &str) -> Result<()> {
        let name = names::PROG_HC_EGRESS;
        // Kernels without tcx need the clsact qdisc; it may already be there.
        let _ = aya::programs::tc::qdisc_add_clsact(iface);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        // Loaded once, attached to each interface.
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        prog.attach(iface, TcAttachType::Egress)
            .map_err(|source| DataplaneError::Program { name, source })?;
        Ok(())
    }

    pub fn set_service(&mut self, key: ServiceKey, service: Service) -> Result<()> {
        // The filter's new bit first: a service the filter does not pass would not get its
        // packets. A bit of its previous mode goes after the change.
        let kind = filter_kind(&service);
        let previous = self.filter_keys.get(&key).copied();
        self.filter_add(key, kind)?;
        self.set_service_vip(&key, service.id)?;
        let (result, name) = match key {
            ServiceKey::V4(k) => (self.services.insert(k, service, 0), names::SERVICES),
            ServiceKey::V6(k) => (self.services_v6.insert(k, service, 0), names::SERVICES_V6),
        };
        result.map_err(|source| DataplaneError::Map { name, source })?;
        match previous {
            Some(old) if old != kind => self.filter_release(key, old),
            _ => Ok(()),
        }
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        let id = self.service(key).ok().map(|s| s.id);
        let (result, name) = match key {
            ServiceKey::V4(k) => (self.services.remove(k), names::SERVICES),
            ServiceKey::V6(k) => (self.services_v6.remove(k), names::SERVICES_V6),
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(DataplaneError::Map { name, source }),
        }
        // After the removal: until then the service still gets its packets.
        self.filter_remove(key)?;
        // Unless the id already names another service's key.
        match (id, key.vip()) {
            (Some(id), Some(vip)) if self.service_vips.get(&id, 0).ok() == Some(vip) => {
                self.write_service_vip(id, ServiceVip::default())
            }
            _ => Ok(()),
        }
    }

    /// Records `key` as service `id`'s own key (`SERVICE_VIPS`), unless it is a port-0 key.
    fn set_service_vip(&mut self, key: &ServiceKey, id: u32) -> Result<()> {
        match key.vip() {
            Some(vip) => self.write_service_vip(id, vip),
            None => Ok(()),
        }
    }

    fn write_service_vip(&mut self, id: u32, vip: ServiceVip) -> Result<()> {
        self.service_vips
            .set(id, vip, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::SERVICE_VIPS,
                source,
            })
    }

    /// Sets `key`'s bit `kind` in the VIP filter (counted: keys may share a slot) and records
    /// it as the key's bit.
    fn filter_add(&mut self, key: ServiceKey, kind: u64) -> Result<()> {
        let slot = key.filter_bit();
        if self.filter_keys.insert(key, kind) != Some(kind) {
            *self.filter_users.entry((slot, kind)).or_insert(0) += 1;
        }
        let (word, shift) = vip_filter_place(slot);
        self.write_filter_word(word, self.filter_words[word as usize] | kind << shift)
    }

    /// Clears `key`'s bit in the VIP filter unless another key still sets it.
    fn filter_remove(&mut self, key: &ServiceKey) -> Result<()> {
        match self.filter_keys.remove(key) {
            Some(kind) => self.filter_release(*key, kind),
            None => Ok(()),
        }
    }

    /// One key fewer sets bit `kind` of `key`'s slot: cleared when none is left.
    fn filter_release(&mut self, key: ServiceKey, kind: u64) -> Result<()> {
        let slot = key.filter_bit();
        let users = self.filter_users.entry((slot, kind)).or_insert(1);
        *users -= 1;
        if *users > 0 {
            return Ok(());
        }
        self.filter_users.remove(&(slot, kind));
        let (word, shift) = vip_filter_place(slot);
        self.write_filter_word(word, self.filter_words[word as usize] & !(kind << shift))
    }

    /// Writes word `index` of the VIP filter if it changes (a system call each).
    fn write_filter_word(&mut self, index: u32, word: u64) -> Result<()> {
        if self.filter_words[index as usize] == word {
            return Ok(());
        }
        self.vip_filter
            .set(index, word, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::VIP_FILTER,
                source,
            })?;
        self.filter_words[index as usize] = word;
        Ok(())
    }

    /// The value stored under a service key (tests and diagnostics).
    pub fn service(&self, key: &ServiceKey) -> Result<Service> {
        let (result, name) = match key {
            ServiceKey::V4(k) => (self.services.get(k, 0), names::SERVICES),
            ServiceKey::V6(k) => (self.services_v6.get(k, 0), names::SERVICES_V6),
        };
        result.map_err(|source| DataplaneError::Map { name, source })
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends
            .get(&id, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::BACKENDS,
                source,
            })
    }

    /// Every service key in the kernel's maps.
    pub fn service_keys(&self) -> Result<Vec<ServiceKey>> {
        let v4 = self.services.keys().map(|k| k.map(ServiceKey::V4));
        let v6 = self.services_v6.keys().map(|k| k.map(ServiceKey::V6));
        v4.chain(v6)
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| DataplaneError::Map {
                name: names::SERVICES,
                source,
            })
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::BACKENDS,
                source,
            })
    }

    /// Writes a whole Maglev table into ring table `table`: a copy into the map's memory. The
    /// table must not be live (the daemon writes only the spare and then switches to it).
    pub fn write_ring(&mut self, table: u32, entries: &[u32]) -> Result<()> {
        assert_eq!(
            entries.len(),
            RING_SIZE as usize,
            "ring tables are RING_SIZE long"
        );
        assert!(table < self.sizing.ring_tables(), "ring table out of range");
        let first = (table * RING_CHUNKS * RING_CHUNK) as usize;
        self.ring_memory.as_mut_slice()[first..first + entries.len()].copy_from_slice(entries);
        Ok(())
    }

    /// Writes the least-connections candidates of ring slot `table` (before the switch to it).
    pub fn write_lc_list(&mut self, table: u32, list: &LcList) -> Result<()> {
        self.lc_lists
            .set(table, list, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::LC_LISTS,
                source,
            })
    }

    /// Writes the current tick (`FLOW_TICK_SHIFT`) for the program to stamp flows with.
    pub fn set_clock(&mut self, tick: u32) -> Result<()> {
        self.clock
            .set(0, tick, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::CLOCK,
                source,
            })
    }

    /// Writes the routed modes' settings (the one value of `CONFIG`).
    pub fn set_config(&mut self, config: &DataplaneConfig) -> Result<()> {
        let name = names::CONFIG;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut array: Array<&mut MapData, DataplaneConfig> =
            Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        array
            .set(0, *config, 0)
            .map_err(|source| DataplaneError::Map { name, source })
    }

    /// The value of `CONFIG` (tests and diagnostics).
    pub fn config(&self) -> Result<DataplaneConfig> {
        let name = names::CONFIG;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let array: Array<&MapData, DataplaneConfig> =
            Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        array
            .get(&0, 0)
            .map_err(|source| DataplaneError::Map { name, source })
    }

    /// Makes exactly `ifindexes` the interfaces packets may be redirected to (`TX_PORTS`, each
    /// entry sending through its own interface).
    pub fn set_tx_ports(&mut self, ifindexes: &[u32]) -> Result<()> {
        let name = names::TX_PORTS;
        let err = |e: &dyn std::fmt::Display| DataplaneError::Io {
            what: "writing",
            name,
            source: std::io::Error::other(e.to_string()),
        };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        let old: Vec<u32> = ports
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| err(&e))?;
        for key in old.iter().filter(|k| !ifindexes.contains(k)) {
            match ports.remove(*key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(err(&e)),
            }
        }
        for &ifindex in ifindexes {
            ports
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| err(&e))?;
        }
        Ok(())
    }

    /// The interfaces in `TX_PORTS`, by ifindex (tests and diagnostics).
    pub fn tx_ports(&self) -> Result<Vec<u32>> {
        let name = names::TX_PORTS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        let ports: DevMapHash<&MapData> =
            DevMapHash::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        let mut keys: Vec<u32> = ports
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(|source| DataplaneError::Map { name, source })?;
        keys.sort_unstable();
        Ok(keys)
    }

    /// Active flows the kernel counts for backend `id`.
    pub fn flow_count(&self, id: u32) -> Result<i64> {
        self.flow_counts
            .get(&id, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::FLOW_COUNTS,
                source,
            })
    }

    pub fn set_flow_count(&mut self, id: u32, count: i64) -> Result<()> {
        self.flow_counts
            .set(id, count, 0)
            .map_err(|source| DataplaneError::Map {
                name: names::FLOW_COUNTS,
                source,
            })
    }

    /// Reads one entry of ring table `table` through the map (tests and diagnostics).
    pub fn ring_entry(&self, table: u32, index: u32) -> Result<u32> {
        let chunk = self
            .rings
            .get(&(table * RING_CHUNKS + index / RING_CHUNK), 0)
            .map_err(|source| DataplaneError::Map {
                name: names::RINGS,
                source,
            })?;
        Ok(chunk.ids[(index % RING_CHUNK) as usize])
    }

    pub fn service_traffic(&self, id: u32) -> Result<Traffic> {
        sum_traffic(&self.service_stats, id, names::SERVICE_STATS)
    }

    pub fn backend_traffic(&self, id: u32) -> Result<Traffic> {
        sum_traffic(&self.backend_stats, id, names::BACKEND_STATS)
    }

    /// Resets a backend's counters when its id is given to a new backend.
    pub fn reset_backend_traffic(&mut self, id: u32) -> Result<()> {
        reset_traffic(&mut self.backend_stats, id, names::BACKEND_STATS)
    }

    pub fn reset_service_traffic(&mut self, id: u32) -> Result<()> {
        reset_traffic(&mut self.service_stats, id, names::SERVICE_STATS)
    }

    /// Packets by reason, summed over CPUs, in `Reason` index order.
    pub fn reason_counts(&self) -> Result<[u64; Reason::COUNT as usize]> {
        let mut out = [0; Reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu =
                self.reason_stats
                    .get(&(i as u32), 0)
                    .map_err(|source| DataplaneError::Map {
                        name: names::REASON_STATS,
                        source,
                    })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Every entry of the connection tables (nat/fullnat flows included), as (protocol,
    /// state). The connection tables are read through their mapping, and only the entries
    /// made for the current holder of their backend id count (`flow_table`); the NAT maps in
    /// batches of 4096 (one syscall each instead of two per entry).
    pub fn flows(&self) -> Result<Vec<(u8, FlowState)>> {
        let mut holder = self.holders();
        let v4 = self.flow_table.entries(&mut holder);
        let v6 = self.flow_table_v6.entries(&mut holder);
        let nat_v4 = batch::<FlowKeyV4, FlowState>(self.nat_flows.map(), names::NAT_FLOWS)?;
        let nat_v6 = batch::<FlowKeyV6, FlowState>(self.nat_flows_v6.map(), names::NAT_FLOWS_V6)?;
        Ok(v4
            .into_iter()
            .chain(nat_v4)
            .map(|(k, s)| (k.proto, s))
            .chain(v6.into_iter().chain(nat_v6).map(|(k, s)| (k.proto, s)))
            .collect())
    }

    /// What a way naming a backend id is checked against (`holders_of`).
    fn holders(&self) -> impl FnMut(u32) -> Option<Holder> + '_ {
        holders_of(&self.backends, &self.service_vips)
    }

    /// Every entry of the nat/fullnat tables.
    pub fn nat_tables(&self) -> Result<NatTables> {
        Ok(NatTables {
            flows_v4: batch(self.nat_flows.map(), names::NAT_FLOWS)?,
            replies_v4: batch(self.nat_replies.map(), names::NAT_REPLIES)?,
            flows_v6: batch(self.nat_flows_v6.map(), names::NAT_FLOWS_V6)?,
            replies_v6: batch(self.nat_replies_v6.map(), names::NAT_REPLIES_V6)?,
        })
    }

    /// Deletes nat/fullnat entries that still hold the value given (one the program rewrote
    /// since it was read is kept; one already gone is not an error). Forward entries go first:
    /// a packet of the flow arriving between the two deletions places the flow again and
    /// rewrites its reply entry, which is then kept for holding another value.
    pub fn remove_nat(
        &mut self,
        flows_v4: &[(FlowKeyV4, FlowState)],
        replies_v4: &[(FlowKeyV4, NatReplyV4)],
        flows_v6: &[(FlowKeyV6, FlowState)],
        replies_v6: &[(FlowKeyV6, NatReplyV6)],
    ) -> Result<()> {
        fn remove_all<K: aya::Pod, V: aya::Pod + PartialEq>(
            map: &mut HashMap<MapData, K, V>,
            entries: &[(K, V)],
            name: &'static str,
        ) -> Result<()> {
            for (key, value) in entries {
                if map.get(key, 0).ok().as_ref() != Some(value) {
                    continue;
                }
                match map.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(source) => return Err(DataplaneError::Map { name, source }),
                }
            }
            Ok(())
        }
        remove_all(&mut self.nat_flows, flows_v4, names::NAT_FLOWS)?;
        remove_all(&mut self.nat_replies, replies_v4, names::NAT_REPLIES)?;
        remove_all(&mut self.nat_flows_v6, flows_v6, names::NAT_FLOWS_V6)?;
        remove_all(&mut self.nat_replies_v6, replies_v6, names::NAT_REPLIES_V6)
    }

    /// The backend a flow is pinned to in the connection table, if any.
    pub fn flow(&self, key: &FlowKeyV4) -> Option<FlowState> {
        self.flow_table.find(key, self.holders())
    }

    /// The IPv4 connection table (tests and benchmarks look inside it).
    pub fn flow_table(&mut self) -> &mut FlowTable<FlowKeyV4> {
        &mut self.flow_table
    }

    /// Copies the flows of the connection tables an older build pinned in `pins` (if any: the
    /// kernel's LRU hash maps, or set-associative tables whose ways held the whole 5-tuple)
    /// into this build's tables, for the data plane adopted from it: flows keep their
    /// backends across the upgrade. Run it before the new program replaces the old one, and
    /// again (`remove`) once it has, for the flows placed in between; a flow the old program
    /// placed again in between keeps its newer entry. Returns the flows copied.
    pub fn carry_legacy_flows(&mut self, pins: &PinDir, remove: bool) -> Result<usize> {
        let mut copied = 0;
        for name in [
            names::LEGACY_CONNTRACK,
            names::LEGACY_CONNTRACK_V6,
            names::LEGACY_FLOW_TABLE,
            names::LEGACY_FLOW_TABLE_V6,
        ] {
            let path = pins.map_path(name);
            if !path.exists() {
                continue;
            }
            let map =
                MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })?;
            copied += self.carry_flows_of(&map, name)?;
            if remove {
                std::fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                    what: "removing the pin",
                    name,
                    source,
                })?;
            }
        }
        Ok(copied)
    }

    /// Carries the flows of the older connection table `map` (pinned as `name`) over.
    fn carry_flows_of(&mut self, map: &MapData, name: &'static str) -> Result<usize> {
        type Flows<K> = Vec<(K, FlowState)>;
        let (v4, v6): (Flows<FlowKeyV4>, Flows<FlowKeyV6>) = match name {
            names::LEGACY_CONNTRACK => (batch(map, name)?, Vec::new()),
            names::LEGACY_CONNTRACK_V6 => (Vec::new(), batch(map, name)?),
            names::LEGACY_FLOW_TABLE => (legacy_flows::<_, 0>(map, name, self)?, Vec::new()),
            _ => (Vec::new(), legacy_flows::<_, 2>(map, name, self)?),
        };
        let now = self.clock.get(&0, 0).unwrap_or(0);
        let mut holder = holders_of(&self.backends, &self.service_vips);
        for (key, state) in &v4 {
            carry(&mut self.flow_table, key, state, now, &mut holder);
        }
        for (key, state) in &v6 {
            carry(&mut self.flow_table_v6, key, state, now, &mut holder);
        }
        Ok(v4.len() + v6.len())
    }
}

/// What a way naming a backend id is checked against, as the kernel's maps hold it: the id's
/// generation and its service's key. Each id read once.
fn holders_of<'a>(
    backends: &'a Array<MapData, Backend>,
    service_vips: &'a Array<MapData, ServiceVip>,
) -> impl FnMut(u32) -> Option<Holder> + 'a {
    let mut seen = std::collections::HashMap::new();
    move |id| {
        *seen.entry(id).or_insert_with(|| {
            let backend = backends.get(&id, 0).ok()?;
            let vip = service_vips.get(&backend.service, 0).ok()?;
            Some(Holder {
                generation: backend.generation,
                vip,
            })
        })
    }
}

/// The sound flows of an older build's set-associative table `map` (pinned as `name`; sets
/// `legacy::Set<K, TAIL>`), read through its mapping and checked against the generations `dp`
/// holds.
fn legacy_flows<K: lb_common::flow_table::SlotKey, const TAIL: usize>(
    map: &MapData,
    name: &'static str,
    dp: &Dataplane,
) -> Result<Vec<(K, FlowState)>> {
    let info = map
        .info()
        .map_err(|source| DataplaneError::Map { name, source })?;
    let sets: MapMemory<legacy::Set<K, TAIL>> = mapped(map, info.max_entries() as usize, name)?;
    let mut holder = dp.holders();
    Ok((0..sets.len())
        .flat_map(|i| sets.get(i).flows(|id| holder(id).map(|h| h.generation)))
        .collect())
}

/// The decapsulation program of a backend (`lb decap`) with its two maps. It lives in the
/// balancer's object; the balancer's own maps are created with one entry each, since a backend
/// never uses them (the defaults would cost it ~60 MB of kernel memory).
pub struct Decap {
    ebpf: Ebpf,
    addrs: HashMap<MapData, DecapAddr, u32>,
    stats: PerCpuArray<MapData, u64>,
}

impl Decap {
    /// Loads the object for decapsulating GUE on UDP port `gue_port` (host order). Nothing is
    /// attached and no address is local yet.
    pub fn load(gue_port: u16) -> Result<Self> {
        let port = gue_port.to_be();
        let mut loader = EbpfLoader::new();
        for name in [
            names::SERVICES,
            names::SERVICE_STATS,
            names::RINGS,
            names::BACKENDS,
            names::BACKEND_STATS,
            names::FLOWS,
            names::FLOWS_V6,
            names::SERVICE_VIPS,
            names::FLOW_COUNTS,
            names::RR_CURSORS,
            names::LC_LISTS,
            names::NAT_FLOWS,
            names::NAT_FLOWS_V6,
            names::NAT_REPLIES,
            names::NAT_REPLIES_V6,
        ] {
            loader.map_max_entries(name, 1);
        }
        loader.override_global(names::GLOBAL_GUE_PORT, &port, true);
        let mut ebpf = loader.load(XDP_OBJECT)?;
        Ok(Decap {
            addrs: take(&mut ebpf, names::DECAP_ADDRS)?,
            stats: take(&mut ebpf, names::DECAP_STATS)?,
            ebpf,
        })
    }

    /// The verified and loaded `lb_decap` program (for attaching, and for tests).
    pub fn program(&mut self) -> Result<&mut Xdp> {
        loaded_xdp(&mut self.ebpf, names::PROG_DECAP)
    }

    /// Attaches to `iface` until this value is dropped. Returns the mode used.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode> {
        attach_program(self.program()?, iface, mode).map(|(mode, _)| mode)
    }

    /// Makes exactly `addrs` the local addresses: adds the new ones, removes the others.
    pub fn set_addrs(&mut self, addrs: &[std::net::IpAddr]) -> Result<()> {
        let err = |source| DataplaneError::Map {
            name: names::DECAP_ADDRS,
            source,
        };
        let want: Vec<DecapAddr> = addrs.iter().map(|a| DecapAddr::from_ip(*a)).collect();
        let have: Vec<DecapAddr> = self
            .addrs
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(err)?;
        for old in have.iter().filter(|a| !want.contains(a)) {
            match self.addrs.remove(old) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(err(e)),
            }
        }
        for new in want.iter().filter(|a| !have.contains(a)) {
            self.addrs.insert(new, 1, 0).map_err(err)?;
        }
        Ok(())
    }

    /// Packets by `DecapReason`, summed over CPUs, in index order.
    pub fn counts(&self) -> Result<[u64; DecapReason::COUNT as usize]> {
        let mut out = [0; DecapReason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|source| DataplaneError::Map {
                    name: names::DECAP_STATS,
                    source,
                })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

/// The object's XDP program `name`, verified and loaded into the kernel (once).
fn loaded_xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram(name))?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })?;
    if prog.fd().is_err() {
        // The verifier gives up with EAGAIN when a signal reaches the loading thread during its
        // seconds of work (as libbpf does, try again a few times).
        let mut attempts = 0;
        loop {
            match prog.load() {
                Ok(()) => break,
                Err(aya::programs::ProgramError::LoadError { io_error, .. })
                    if io_error.kind() == std::io::ErrorKind::WouldBlock && attempts < 4 =>
                {
                    attempts += 1;
                }
                Err(source) => return Err(DataplaneError::Program { name, source }),
            }
        }
    }
    Ok(prog)
}

/// Attaches an already loaded XDP program in the requested mode; returns the mode used and the
/// link's id in the program.
pub fn attach_program(
    prog: &mut Xdp,
    iface: &str,
    mode: AttachMode,
) -> Result<(AttachMode, XdpLinkId)> {
    let err = |source| DataplaneError::Program {
        name: "attach",
        source,
    };
    match mode {
        AttachMode::Native => Ok((
            AttachMode::Native,
            prog.attach(iface, XdpMode::Driver).map_err(err)?,
        )),
        AttachMode::Generic => Ok((
            AttachMode::Generic,
            prog.attach(iface, XdpMode::Skb).map_err(err)?,
        )),
        AttachMode::Auto => match prog.attach(iface, XdpMode::Driver) {
            Ok(link) => Ok((AttachMode::Native, link)),
            Err(e) => {
                tracing::warn!(
                    "native XDP attach to {iface} failed ({e}); falling back to generic mode, \
                     which is much slower"
                );
                Ok((
                    AttachMode::Generic,
                    prog.attach(iface, XdpMode::Skb).map_err(err)?,
                ))
            }
        },
    }
}

fn sum_traffic(
    map: &PerCpuArray<MapData, Traffic>,
    id: u32,
    name: &'static str,
) -> Result<Traffic> {
    let per_cpu = map
        .get(&id, 0)
        .map_err(|source| DataplaneError::Map { name, source })?;
    Ok(per_cpu.iter().fold(Traffic::default(), |acc, t| Traffic {
        packets: acc.packets + t.packets,
        flows: acc.flows + t.flows,
        bytes: acc.bytes + t.bytes,
    }))
}

fn reset_traffic(
    map: &mut PerCpuArray<MapData, Traffic>,
    id: u32,
    name: &'static str,
) -> Result<()> {
    let io = |source| DataplaneError::Io {
        what: "resetting counters",
        name,
        source,
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| io(e))?;
    let zeros = aya::maps::PerCpuValues::try_from(vec![Traffic::default(); cpus]).map_err(io)?;
    map.set(id, zeros, 0)
        .map_err(|source| DataplaneError::Map { name, source })
}

/// Every entry of a hash map, by `lookup_batch`.
fn batch<K: aya::Pod, V: aya::Pod>(map: &MapData, name: &'static str) -> Result<Vec<(K, V)>> {
    lookup_batch(map.fd().as_fd().as_raw_fd()).map_err(|source| DataplaneError::Io {
        what: "reading",
        name,
        source,
    })
}

/// `BPF_MAP_LOOKUP_BATCH` over a hash map (aya 0.14 has no wrapper).
fn lookup_batch<K: aya::Pod, V: aya::Pod>(map_fd: i32) -> std::io::Result<Vec<(K, V)>> {
    // The kernel's `union bpf_attr` layout for the batch commands.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: usize = 4096;
    let mut out = Vec::new();
    // SAFETY: K and V are Pod: every bit pattern, zeros included, is a valid value.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; CHUNK];
    // Hash maps use a bucket index as the batch cursor.
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &raw const cursor_in as u64
            },
            out_batch: &raw mut cursor_out as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map_fd as u32,
            ..Default::default()
        };
        // SAFETY: attr is a correctly laid out bpf_attr; keys and values hold CHUNK entries of
        // the map's key and value types; the cursors outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (ret < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(CHUNK);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match err {
            // ENOENT: the walk reached the end (this call's entries were still returned).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
            None => {}
        }
        cursor_in = cursor_out;
        first = false;
    }
}

/// The values of the mappable array `map` (`len` of them), mapped into this process.
fn mapped<T: Copy>(map: &MapData, len: usize, name: &'static str) -> Result<MapMemory<T>> {
    MapMemory::map(map.fd().as_fd().as_raw_fd(), len).map_err(|source| DataplaneError::Io {
        what: "mapping",
        name,
        source,
    })
}

/// Enters an older build's connection-table entry (`carry_legacy_flows`) unless the table
/// already has one for the flow, which is newer. The entry keeps its generation: the seal
/// then holds only while its backend id has the same holder.
fn carry<K: lb_common::flow_table::SlotKey>(
    table: &mut FlowTable<K>,
    key: &K,
    state: &FlowState,
    now: u32,
    mut holder: impl FnMut(u32) -> Option<Holder>,
) {
    if table.find(key, &mut holder).is_some() {
        return;
    }
    let closed = state.flags & lb_common::FLOW_F_CLOSED != 0;
    let seen = if now == 0 {
        state.last_seen
    } else {
        now.min(state.last_seen)
    };
    table.insert(key, state.backend, state.generation, seen, closed, holder);
}
