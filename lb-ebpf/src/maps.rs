//! Every map of the program. The sizes here are defaults; the loader resizes each to the
//! daemon's configuration before loading (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
};
use lb_common::{
    Backend, DECAP_MAX_ADDRS, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
    DEFAULT_NAT_SIZE, DataplaneConfig, DecapAddr, DecapReason, FlowKeyV4, FlowKeyV6, FlowSetV4,
    FlowSetV6, FlowState, LcList, NatReplyV4, NatReplyV6, RING_CHUNKS, Reason, RingChunk, Service,
    ServiceKeyV4, ServiceKeyV6, ServiceVip, Traffic, VIP_FILTER_WORDS, flow_sets,
};

use crate::forward::{
    nat::NatScratch,
    route::{CachedRoute, ROUTE_CACHE_SLOTS},
};

/// The VIP filter (`VIP_FILTER_BITS`): a packet whose key's bit is clear is not for a service.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// VIP:port/proto → service: looked up for new flows (an established one finds its service
/// through its backend).
#[map]
pub static SERVICES: HashMap<ServiceKeyV4, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// The same for IPv6 VIPs.
#[map]
pub static SERVICES_V6: HashMap<ServiceKeyV6, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend id → backend. An array: ids are small integers allocated by the daemon.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Maglev tables, `RING_SIZE` backend ids each (in `RING_CHUNKS` values of 16): one per service
/// plus a spare, so a new table is written in full before its service switches to it
/// (4 bytes × 65552 × 65 ≈ 17 MB by default). Mappable: userspace writes a table with one
/// memory copy instead of 65537 map updates.
#[map]
pub static RINGS: Array<RingChunk> =
    Array::with_max_entries(RING_CHUNKS * (DEFAULT_MAX_SERVICES + 1), BPF_F_MMAPABLE);

/// The connection table: every dsr/ipip/gue flow seen and its backend, in sets of
/// `FLOW_WAYS` ways (`flow_table`; the loader sizes it in sets, `LB_FLOW_SETS`). Shared by all
/// CPUs without locks. Mappable: a mappable array's values start on a page, so every set is
/// one aligned cache line (userspace also reads it through the mapping).
#[map]
pub static FLOWS: Array<FlowSetV4> =
    Array::with_max_entries(flow_sets(DEFAULT_CONNTRACK_SIZE), BPF_F_MMAPABLE);

/// The IPv6 connection table (its own map: IPv4 sets stay one cache line).
#[map]
pub static FLOWS_V6: Array<FlowSetV6> =
    Array::with_max_entries(flow_sets(DEFAULT_CONNTRACK_SIZE), BPF_F_MMAPABLE);

/// Each service's VIP, port and protocol by service id, which a connection-table way (holding
/// only the client's address and port) is checked against through its backend's service.
#[map]
pub static SERVICE_VIPS: Array<ServiceVip> = Array::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Active flows per backend id: +1 when a flow is placed, -1 at its first FIN or RST. Flows
/// that just go idle or are evicted are not seen here; the daemon recounts from the
/// connection table every few seconds and writes the exact figures back.
#[map]
pub static FLOW_COUNTS: Array<i64> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Round-robin position of each service, per CPU (no shared cache line on the new-flow path).
#[map]
pub static RR_CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Least-connections candidates by ring slot (one per service plus the spare).
#[map]
pub static LC_LISTS: Array<LcList> = Array::with_max_entries(DEFAULT_MAX_SERVICES + 1, 0);

/// The current tick of `CLOCK_MONOTONIC` (`FLOW_TICK_SHIFT`), written by the daemon twice a
/// second: an inlined array read instead of a clock helper call on every packet.
#[map]
pub static CLOCK: Array<u32> = Array::with_max_entries(1, 0);

/// Settings of the routed modes (encapsulation sources, GUE port, SNAT addresses and pool),
/// one value written by the daemon.
#[map]
pub static CONFIG: Array<DataplaneConfig> = Array::with_max_entries(1, 0);

/// nat/fullnat flows: client 5-tuple → backend and SNAT port. Not LRU (see `DEFAULT_NAT_SIZE`):
/// the daemon removes closed and idle entries.
#[map]
pub static NAT_FLOWS: HashMap<FlowKeyV4, FlowState> =
    HashMap::with_max_entries(DEFAULT_NAT_SIZE, 0);
#[map]
pub static NAT_FLOWS_V6: HashMap<FlowKeyV6, FlowState> =
    HashMap::with_max_entries(DEFAULT_NAT_SIZE, 0);

/// nat/fullnat replies: the backend's 5-tuple → the client and VIP to write back.
#[map]
pub static NAT_REPLIES: HashMap<FlowKeyV4, NatReplyV4> =
    HashMap::with_max_entries(DEFAULT_NAT_SIZE, 0);
#[map]
pub static NAT_REPLIES_V6: HashMap<FlowKeyV6, NatReplyV6> =
    HashMap::with_max_entries(DEFAULT_NAT_SIZE, 0);

/// Scratch space for placing a nat/fullnat flow (see `NatScratch`).
#[map]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// The SYN-flood guard's count of SYNs this CPU entered in the connection table in `tick`
/// (`select::syn_guard_admits`). Not pinned: a restart only starts a new count.
#[map]
pub static SYN_WINDOW: PerCpuArray<SynWindow> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct SynWindow {
    pub tick: u32,
    pub syns: u32,
}

/// This CPU's `bpf_fib_lookup` parameter block (see `forward::route`).
#[map]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// This CPU's cache of `bpf_fib_lookup` results, direct-mapped by destination (see
/// `forward::route`). Per CPU: written on misses without locks or shared cache lines.
#[map]
pub static ROUTE_CACHE: PerCpuArray<CachedRoute> =
    PerCpuArray::with_max_entries(ROUTE_CACHE_SLOTS, 0);

/// The interfaces the balancer is attached to, by ifindex: a packet whose next hop is through
/// another of them leaves with XDP_REDIRECT (one through the ingress interface uses XDP_TX).
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Per-CPU counters (written on every packet, so never shared between CPUs).
#[map]
pub static SERVICE_STATS: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
#[map]
pub static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// This host's addresses (`lb decap` fills it from the interface): an encapsulated packet is
/// stripped only when its outer destination is one of them. A hash map of `DECAP_MAX_ADDRS`
/// entries: a host has a handful of addresses, and only encapsulated packets are looked up.
#[map]
pub static DECAP_ADDRS: HashMap<DecapAddr, u32> = HashMap::with_max_entries(DECAP_MAX_ADDRS, 0);

/// Per-CPU counters of the decapsulation program, by `DecapReason`.
#[map]
pub static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapReason::COUNT, 0);
