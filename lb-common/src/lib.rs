//! The kernel/userspace boundary of the load balancer: every value stored in a BPF map, every
//! map name and every constant both sides must agree on is defined here, once.
//!
//! Byte order: addresses and ports hold the bytes exactly as they appear on the wire (network
//! order). Userspace converts at the edge with `u32::from_ne_bytes(ip.octets())` and
//! `port.to_be()`, so the XDP program compares raw packet words without swapping.
//!
//! Every struct is `#[repr(C)]` with explicit padding so no byte of a map key or value is
//! uninitialised (the kernel hashes and compares whole keys).
#![no_std]

pub mod flow_table;
pub mod hash;

pub use flow_table::{
    FLOW_MAX_BACKENDS, FLOW_STATE_CLOSED, FLOW_WAYS, FlowSet, FlowSetV4, FlowSetV6, FlowSlot,
    flow_seal, flow_set, flow_sets, flow_state,
};

/// Entries in each service's Maglev lookup table. Prime, as the Maglev paper requires; 65537 is
/// the paper's default and keeps the share of any backend within 1% of its target for up to
/// about 650 backends (M > 100 N).
pub const RING_SIZE: u32 = 65537;

/// Ring entries per map value. The ring map is mappable so userspace can write a table with one
/// memory copy; such maps round each value up to 8 bytes, so entries are grouped 16 to a
/// 64-byte value instead of wasting half of every slot on a 4-byte value.
pub const RING_CHUNK: u32 = 16;
/// Map values per table (the last one is partly unused).
pub const RING_CHUNKS: u32 = RING_SIZE.div_ceil(RING_CHUNK);

/// One value of the ring map: `RING_CHUNK` consecutive table entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingChunk {
    pub ids: [u32; RING_CHUNK as usize],
}

/// A ring entry that names no backend (a service with no usable backend).
pub const BACKEND_NONE: u32 = u32::MAX;

/// Default number of services; the ring map holds one table per service plus one spare, so a
/// new table is written in full before the service switches to it.
pub const DEFAULT_MAX_SERVICES: u32 = 64;
/// Default size of the backend array (ids are global across services).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
/// Default connection-table size: room for 2M flows (`flow_table`: 2^19 sets of 4 ways; 32 MB
/// for IPv4, 64 MB for IPv6, a third of what the kernel's LRU hash of 1M flows took). Sets of
/// four keep nearly every flow only well below their size: 1M flows keep 96% of their entries.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 21;

/// `IPPROTO_TCP` and `IPPROTO_UDP`, as in the IPv4 header's protocol field.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps and programs in the object, used by userspace to find them.
pub mod names {
    pub const PROG_BALANCER: &str = "lb_xdp";
    pub const PROG_PASS: &str = "lb_xdp_pass";
    pub const PROG_HC_EGRESS: &str = "lb_hc_egress";
    /// The backends' decapsulation program (`lb decap`).
    pub const PROG_DECAP: &str = "lb_decap";
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// Read-only global: the UDP port GUE packets are decapsulated on, network order.
    pub const GLOBAL_GUE_PORT: &str = "LB_GUE_PORT";
    pub const SERVICES: &str = "SERVICES";
    pub const SERVICES_V6: &str = "SERVICES_V6";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    /// The connection tables (`flow_table`).
    pub const FLOWS: &str = "FLOWS";
    pub const FLOWS_V6: &str = "FLOWS_V6";
    /// Read-only global: the number of sets of each connection table (a power of two).
    pub const GLOBAL_FLOW_SETS: &str = "LB_FLOW_SETS";
    /// Each service's VIP, port and protocol by service id (`ServiceVip`). Not pinned: rebuilt
    /// from the service maps whenever a data plane is loaded.
    pub const SERVICE_VIPS: &str = "SERVICE_VIPS";
    /// The connection tables of older builds: a daemon that adopts a data plane pinned by such
    /// a build copies their flows over. The kernel's LRU hash maps first, then set-associative
    /// tables whose ways held the whole 5-tuple (32 and 64 bytes).
    pub const LEGACY_CONNTRACK: &str = "CONNTRACK";
    pub const LEGACY_CONNTRACK_V6: &str = "CONNTRACK_V6";
    pub const LEGACY_FLOW_TABLE: &str = "FLOW_TABLE";
    pub const LEGACY_FLOW_TABLE_V6: &str = "FLOW_TABLE_V6";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASON_STATS: &str = "REASON_STATS";
    pub const FLOW_COUNTS: &str = "FLOW_COUNTS";
    pub const RR_CURSORS: &str = "RR_CURSORS";
    pub const LC_LISTS: &str = "LC_LISTS";
    pub const CLOCK: &str = "CLOCK";
    pub const CONFIG: &str = "CONFIG";
    /// Not pinned: rebuilt from the service maps whenever a data plane is loaded.
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const NAT_FLOWS: &str = "NAT_FLOWS";
    pub const NAT_FLOWS_V6: &str = "NAT_FLOWS_V6";
    pub const NAT_REPLIES: &str = "NAT_REPLIES";
    pub const NAT_REPLIES_V6: &str = "NAT_REPLIES_V6";
    /// Devmap of the interfaces the balancer is attached to, keyed by ifindex (XDP_REDIRECT).
    pub const TX_PORTS: &str = "TX_PORTS";
    /// Read-only global: non-zero turns on per-packet aya-log diagnostics.
    pub const GLOBAL_DEBUG: &str = "LB_DEBUG";
}

/// Key of the service map: an IPv4 VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKeyV4 {
    /// VIP, network order.
    pub addr: u32,
    /// Port, network order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
}

/// Health checks addressed to a VIP (`--hc-target vip`) carry this socket mark with the
/// backend id in the low 24 bits; the tc egress program `lb_hc_egress` steers such packets to
/// that backend, so the check tests the VIP on that backend, not only its host.
pub const HC_MARK_TAG: u32 = 0x4c00_0000;
pub const HC_MARK_TAG_MASK: u32 = 0xff00_0000;

/// Key of the IPv6 service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKeyV6 {
    /// VIP, network order, as four words read from the packet.
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// A service's own key, by service id (`SERVICE_VIPS`): a connection-table way holds only the
/// client's side of its flow, and counts for a packet only if its backend's service is the
/// packet's destination, port and protocol (`flow_table`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceVip {
    /// VIP, network order; an IPv4 VIP in the first word, the others zero.
    pub addr: [u32; 4],
    /// Port, network order.
    pub port: u16,
    pub proto: u8,
    /// `AF_INET` or `AF_INET6`; 0: no service has this id.
    pub family: u8,
}

impl ServiceVip {
    #[must_use]
    pub const fn v4(key: &ServiceKeyV4) -> Self {
        ServiceVip {
            addr: [key.addr, 0, 0, 0],
            port: key.port,
            proto: key.proto,
            family: AF_INET,
        }
    }

    #[must_use]
    pub const fn v6(key: &ServiceKeyV6) -> Self {
        ServiceVip {
            addr: key.addr,
            port: key.port,
            proto: key.proto,
            family: AF_INET6,
        }
    }
}

/// Slots of the VIP filter (`VIP_FILTER`): each service key sets two bits in the slot its
/// (VIP, port, protocol) hashes to, `VIP_FILTER_PLAIN` for a dsr/ipip/gue service and
/// `VIP_FILTER_NAT` for a nat/fullnat one. A packet whose slot is empty is not for a service
/// and passes without a hash-map lookup; one whose slot has only the NAT bit skips the
/// connection table (nat flows are in tables of their own). A slot may be another key's (the
/// program then looks the key up), never the other way round.
pub const VIP_FILTER_BITS: u32 = 1 << 16;
/// 64-bit words of the filter: 32 slots of 2 bits each.
pub const VIP_FILTER_WORDS: u32 = VIP_FILTER_BITS / 32;
pub const VIP_FILTER_PLAIN: u64 = 1;
pub const VIP_FILTER_NAT: u64 = 2;

/// The word of the filter holding `slot`, and the shift of its two bits in it.
#[inline(always)]
#[must_use]
pub const fn vip_filter_place(slot: u32) -> (u32, u32) {
    (slot / 32, (slot % 32) * 2)
}

impl ServiceKeyV4 {
    /// This key's slot in the VIP filter.
    #[inline(always)]
    #[must_use]
    pub fn filter_bit(&self) -> u32 {
        hash::vip_filter_bit(self.addr, self.port, self.proto)
    }
}

impl ServiceKeyV6 {
    /// This key's slot in the VIP filter.
    #[inline(always)]
    #[must_use]
    pub fn filter_bit(&self) -> u32 {
        hash::vip_filter_bit_v6(&self.addr, self.port, self.proto)
    }
}

/// Forwarding modes (`Service::forward`).
/// L2 direct server return: only the Ethernet addresses change.
pub const FORWARD_DSR: u8 = 0;
/// IP-in-IP to the backend (4in4, 6in6, 4in6, 6in4); the next hop comes from the kernel's FIB.
pub const FORWARD_IPIP: u8 = 1;
/// The same inner packet in UDP (GUE, header-less variant 1) to `DataplaneConfig::gue_port`.
pub const FORWARD_GUE: u8 = 2;
/// Destination NAT to the backend's address and port; the client's address is kept, so the
/// backend's route back must go through the balancer, which reverses it (`NAT_REPLIES`).
pub const FORWARD_NAT: u8 = 3;
/// Destination and source NAT: the source becomes the balancer's SNAT address with a port from
/// the pool, so backends need no route through the balancer.
pub const FORWARD_FULLNAT: u8 = 4;

/// `Service::flags`: fragments to this VIP and protocol are forwarded, every fragment of a
/// datagram to the same backend (all packets of the service are placed by the client address,
/// so the scheduler must be source-hash). The service map then also holds the service under
/// port 0, the key a fragment without ports is looked up by.
pub const SERVICE_F_FRAGMENTS: u8 = 1;

/// Schedulers (`Service::scheduler`): how a new flow picks its backend.
/// Weighted Maglev over the 5-tuple hash.
pub const SCHED_MAGLEV: u8 = 0;
/// Weighted Maglev over the client address only: a client always reaches the same backend.
pub const SCHED_SOURCE_HASH: u8 = 1;
/// The ring holds a weighted round-robin sequence; each CPU walks it with its own cursor.
pub const SCHED_ROUND_ROBIN: u8 = 2;
/// The backend with the fewest active flows per unit of weight (`LC_LISTS`, `FLOW_COUNTS`).
pub const SCHED_LEAST_CONN: u8 = 3;

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into `SERVICE_STATS` and `RR_CURSORS`; stable for the life of the service.
    pub id: u32,
    /// Which table of `RINGS` (and list of `LC_LISTS`) is live: ring values
    /// `ring * RING_CHUNKS .. (ring + 1) * RING_CHUNKS`. Userspace fills a spare table, then
    /// flips this field with one map update.
    pub ring: u32,
    /// One of the `FORWARD_*` constants.
    pub forward: u8,
    /// One of the `SCHED_*` constants.
    pub scheduler: u8,
    /// `SERVICE_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
}

/// Most backends a least-connections service can have in its table: the program compares
/// their flow counts on every new flow, in a loop the verifier unrolls. At 32 the build with
/// --debug-packets already exceeds the verifier's budget of 1M instructions (moving the loop
/// to `bpf_loop` would lift the limit).
pub const LC_MAX_BACKENDS: u32 = 16;

/// The backends a least-connections service chooses among, by ring slot (switched with the
/// ring, so a new flow never sees half of an old list and half of a new one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LcList {
    pub len: u32,
    pub _pad: u32,
    pub ids: [u32; LC_MAX_BACKENDS as usize],
    pub weights: [u32; LC_MAX_BACKENDS as usize],
}

/// The backend may keep established flows (it exists, is healthy and, for L2 DSR, its MAC is
/// known).
/// Draining backends keep this flag; removed or failed ones lose it.
pub const BACKEND_F_ALIVE: u8 = 1;

/// Address families (`Backend::family`), as Linux numbers them.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// Value of the backend array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Address, network order; IPv4 uses the first 4 bytes.
    pub addr: [u8; 16],
    /// Next-hop MAC for L2 direct server return (unused by the routed modes).
    pub mac: [u8; 6],
    /// Port, network order: where NAT modes send the flow (the service port unless mapped).
    pub port: u16,
    /// Bumped each time the id is given to a new backend, so a connection-table entry made for
    /// an earlier holder of the id is recognised as stale.
    pub generation: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// The forwarding mode (`FORWARD_*`) of the backend's service: an established flow is
    /// forwarded from its connection-table entry and this, without looking the service up.
    pub forward: u8,
    pub _pad: u8,
    /// The id of the backend's service (each service has backends of its own), for its counters.
    pub service: u32,
}

/// An IPv4 5-tuple, network order: a flow of the connection table (`FlowSlot` holds its client
/// side) and the key of the NAT maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Scalars, not a byte array: LLVM zeroes a `[u8; 3]` with a call to memset in BPF.
    pub _pad0: u8,
    pub _pad1: u16,
}

/// `FlowState::last_seen` and `FlowSlot::state` count `CLOCK_MONOTONIC` nanoseconds shifted
/// right by this much (ticks of about 1.07 s). The daemon writes the current tick into the
/// `CLOCK` map twice a second; the program reads it there, because a clock helper call cost
/// ~35 ns per packet.
pub const FLOW_TICK_SHIFT: u32 = 30;

/// An IPv6 5-tuple, network order, as `FlowKeyV4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// `FlowState::flags`: the flow has seen a TCP FIN or RST, it no longer counts as active.
pub const FLOW_F_CLOSED: u16 = 1;

/// A flow's backend and state: the value of the NAT flow maps (`NAT_FLOWS`), and how userspace
/// reports a connection-table entry (`FlowSlot` with its generation checked).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    pub backend: u32,
    /// `Backend::generation` when the flow was placed.
    pub generation: u32,
    /// Last packet, in ticks of `CLOCK_MONOTONIC` (`FLOW_TICK_SHIFT`), written at most once a
    /// tick.
    pub last_seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u16,
    /// fullnat: the SNAT source port the flow was given, network order (0 otherwise).
    pub nat_port: u16,
}

/// Value of `NAT_REPLIES`, keyed by the 5-tuple of the backend's replies (source = backend
/// address and port; destination = the client, or the SNAT address and port for fullnat):
/// what to write back so the client sees the VIP. Addresses and ports in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatReplyV4 {
    pub client: u32,
    pub vip: u32,
    pub client_port: u16,
    pub vip_port: u16,
    /// Backend id and generation of the forward entry this one pairs with (the sweep removes
    /// a reply entry whose forward entry has moved to another backend).
    pub backend: u32,
    pub generation: u32,
    /// As `FlowState::last_seen`, for replies.
    pub last_seen: u32,
    /// `FLOW_F_CLOSED` once a reply carried FIN or RST.
    pub flags: u16,
    pub _pad: u16,
}

/// `NatReplyV4` for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatReplyV6 {
    pub client: [u32; 4],
    pub vip: [u32; 4],
    pub client_port: u16,
    pub vip_port: u16,
    pub backend: u32,
    pub generation: u32,
    pub last_seen: u32,
    pub flags: u16,
    pub _pad: u16,
}

/// Default size of each NAT map (forward flows and replies, per family). Plain hash maps, not
/// LRU: an entry still in use must never be evicted, or a connection would silently get a new
/// port; the daemon expires idle and closed entries instead.
pub const DEFAULT_NAT_SIZE: u32 = 1 << 18;

/// `DataplaneConfig::flags`: some service uses nat or fullnat, so packets to no VIP are looked
/// up in `NAT_REPLIES` (skipped otherwise: one hash lookup per passed packet saved).
pub const CONFIG_F_NAT: u32 = 1;

/// The single value of the `CONFIG` array: settings of the routed modes, written by the daemon.
/// Addresses and ports network order unless said otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Outer IPv4 source of ipip/gue packets.
    pub encap_src4: u32,
    /// Outer IPv6 source of ipip/gue packets.
    pub encap_src6: [u32; 4],
    /// How many low bits of the outer source address come from the flow hash (0: the source
    /// is fixed), so backends' RSS spreads flows over queues, as Katran does.
    pub encap_src_hash_bits: u8,
    pub _pad0: u8,
    /// UDP destination port of GUE packets.
    pub gue_port: u16,
    /// fullnat's source addresses.
    pub snat4: u32,
    pub snat6: [u32; 4],
    /// fullnat's source port pool, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// The SYN-flood guard: TCP SYNs of Maglev and source-hash services a CPU enters in the
    /// connection table per clock tick (`FLOW_TICK_SHIFT`, about a second); further SYNs in
    /// that tick are looked up but never entered: without an entry they go to the backend the
    /// table gives them (counted as `ForwardedUntracked`), and the connection's first packet
    /// after the SYN makes it. So a flood of spoofed SYNs cannot churn the table. 0: no limit.
    pub syn_guard: u32,
}

/// The daemon's SYN-flood guard (`DataplaneConfig::syn_guard`): Katran's limit of new
/// connections per CPU and second.
pub const DEFAULT_SYN_GUARD: u32 = 125_000;

/// Per-CPU packet and byte counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows placed (new flows, and flows moved here from a backend that went away).
    pub flows: u64,
}

/// Why the program passed or dropped a packet, or that it forwarded it; the index into
/// `REASON_STATS`. Every exit of the program is counted under exactly one of these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Forwarded to a backend.
    Forwarded = 0,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...): passed to the kernel.
    PassNotIp = 1,
    /// IPv4 but neither TCP nor UDP (ICMP, ...): passed.
    PassNotTcpUdp = 2,
    /// TCP/UDP to no configured service: passed.
    PassNotVip = 3,
    /// An IPv4 fragment: passed (the balancer never forwards fragments, so none can reach a
    /// wrong backend; the kernel reassembles or drops them).
    PassFragment = 4,
    /// Ethernet or VLAN header cut short: passed (not ours to judge).
    PassShortL2 = 5,
    /// IPv4 header cut short or inconsistent (version, IHL, total length): dropped.
    DropMalformedIp = 6,
    /// TCP/UDP header cut short: dropped.
    DropMalformedL4 = 7,
    /// To a service that has no usable backend: dropped.
    DropNoBackend = 8,
    /// A map lookup that cannot fail did (inconsistent maps), or a helper failed: dropped.
    DropInternal = 9,
    /// Encapsulated or translated, but the next hop's MAC is not known yet or it is through an
    /// interface the balancer is not attached to: passed to the kernel, which forwards it (and
    /// resolves the neighbour for the next packets).
    PassToKernel = 10,
    /// The kernel's FIB has no route to the backend (or the client), or forwarding is off on
    /// the interface: dropped.
    DropNoRoute = 11,
    /// Too big for the egress MTU once encapsulated: an ICMP "fragmentation needed" or ICMPv6
    /// "packet too big" went back to the client instead.
    IcmpTooBig = 12,
    /// Too big once encapsulated and the IPv4 "don't fragment" bit is clear: dropped (the
    /// balancer never fragments).
    DropTooBig = 13,
    /// An ICMP error about a packet sent from a VIP, forwarded to the backend owning the flow.
    IcmpForwarded = 14,
    /// An ICMP error about a VIP's packet whose flow the balancer does not know: passed.
    PassIcmpNoFlow = 15,
    /// A backend's reply in a nat/fullnat flow, translated back and sent to the client.
    NatReply = 16,
    /// No SNAT port free in the pool (or a nat flow's reply 5-tuple is held by another flow):
    /// dropped, never sent with a wrong translation.
    DropNatNoPort = 17,
    /// A SYN forwarded without a connection-table entry: the SYN-flood guard's limit for this
    /// CPU and tick was reached (`DataplaneConfig::syn_guard`).
    ForwardedUntracked = 18,
}

impl Reason {
    pub const COUNT: u32 = 19;
    /// Every reason in index order, with its name in metrics and `lb status`.
    pub const ALL: [(Reason, &'static str); Self::COUNT as usize] = [
        (Reason::Forwarded, "forwarded"),
        (Reason::PassNotIp, "pass_not_ip"),
        (Reason::PassNotTcpUdp, "pass_not_tcp_udp"),
        (Reason::PassNotVip, "pass_not_vip"),
        (Reason::PassFragment, "pass_fragment"),
        (Reason::PassShortL2, "pass_short_l2"),
        (Reason::DropMalformedIp, "drop_malformed_ip"),
        (Reason::DropMalformedL4, "drop_malformed_l4"),
        (Reason::DropNoBackend, "drop_no_backend"),
        (Reason::DropInternal, "drop_internal"),
        (Reason::PassToKernel, "pass_to_kernel"),
        (Reason::DropNoRoute, "drop_no_route"),
        (Reason::IcmpTooBig, "icmp_too_big"),
        (Reason::DropTooBig, "drop_too_big"),
        (Reason::IcmpForwarded, "icmp_forwarded"),
        (Reason::PassIcmpNoFlow, "pass_icmp_no_flow"),
        (Reason::NatReply, "nat_reply"),
        (Reason::DropNatNoPort, "drop_nat_no_port"),
        (Reason::ForwardedUntracked, "forwarded_untracked"),
    ];
}

/// The UDP destination port of GUE-encapsulated packets unless configured otherwise: Katran's.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// `IPPROTO_IPIP` and `IPPROTO_IPV6`: an IPv4 or IPv6 packet carried directly in an IP header
/// (and, in GUE, the protocol field naming the inner packet).
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

/// Most local addresses the decapsulation program matches outer destinations against.
pub const DECAP_MAX_ADDRS: u32 = 64;

/// Key of `DECAP_ADDRS`: one of this host's addresses, as four words in network order. IPv4
/// addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so one map holds both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecapAddr {
    pub words: [u32; 4],
}

impl DecapAddr {
    /// The third word of an IPv4-mapped address, network order.
    pub const V4_MAPPED: u32 = 0xffffu32.to_be();

    /// An IPv4 address as read from a packet (network order).
    pub const fn v4(addr: u32) -> Self {
        DecapAddr {
            words: [0, 0, Self::V4_MAPPED, addr],
        }
    }

    pub fn from_ip(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(v4) => Self::v4(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                DecapAddr {
                    words: [word(0), word(4), word(8), word(12)],
                }
            }
        }
    }
}

/// What the decapsulation program did with a packet; the index into `DECAP_STATS`. Every exit
/// of `lb_decap` is counted under exactly one of these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// IPv4 in IPv4 (protocol 4), outer header removed.
    Ipip4in4 = 0,
    /// IPv6 in IPv4 (protocol 41).
    Ipip6in4 = 1,
    /// IPv4 in IPv6 (next header 4).
    Ipip4in6 = 2,
    /// IPv6 in IPv6 (next header 41).
    Ipip6in6 = 3,
    /// GUE over IPv4 carrying IPv4.
    Gue4in4 = 4,
    /// GUE over IPv4 carrying IPv6.
    Gue6in4 = 5,
    /// GUE over IPv6 carrying IPv4.
    Gue4in6 = 6,
    /// GUE over IPv6 carrying IPv6.
    Gue6in6 = 7,
    /// Not IPv4/IPv6, or an L2/L3 header too short to tell: passed untouched.
    PassNotIp = 8,
    /// IP but not IP-in-IP nor UDP to the GUE port (ordinary traffic): passed untouched.
    PassNotEncap = 9,
    /// Encapsulated, but the outer destination is not one of this host's addresses (it is
    /// routed through, or meant for another program): passed untouched.
    PassNotLocal = 10,
    /// An outer IPv4 fragment: passed (the kernel reassembles; the balancer never fragments).
    PassFragment = 11,
    /// Outer header inconsistent or longer than the frame: dropped.
    DropMalformedOuter = 12,
    /// GUE header cut short, with options, a control message or an unknown inner protocol:
    /// dropped.
    DropMalformedGue = 13,
    /// Inner IP header cut short, of the wrong version, or longer than the outer packet:
    /// dropped.
    DropMalformedInner = 14,
    /// `bpf_xdp_adjust_head` failed, or the frame was too short afterwards: dropped.
    DropInternal = 15,
}

impl DecapReason {
    pub const COUNT: u32 = 16;
    /// Every reason in index order, with its name in `lb decap`'s counters.
    pub const ALL: [(DecapReason, &'static str); Self::COUNT as usize] = [
        (DecapReason::Ipip4in4, "decap_ipip_4in4"),
        (DecapReason::Ipip6in4, "decap_ipip_6in4"),
        (DecapReason::Ipip4in6, "decap_ipip_4in6"),
        (DecapReason::Ipip6in6, "decap_ipip_6in6"),
        (DecapReason::Gue4in4, "decap_gue_4in4"),
        (DecapReason::Gue6in4, "decap_gue_6in4"),
        (DecapReason::Gue4in6, "decap_gue_4in6"),
        (DecapReason::Gue6in6, "decap_gue_6in6"),
        (DecapReason::PassNotIp, "pass_not_ip"),
        (DecapReason::PassNotEncap, "pass_not_encap"),
        (DecapReason::PassNotLocal, "pass_not_local"),
        (DecapReason::PassFragment, "pass_fragment"),
        (DecapReason::DropMalformedOuter, "drop_malformed_outer"),
        (DecapReason::DropMalformedGue, "drop_malformed_gue"),
        (DecapReason::DropMalformedInner, "drop_malformed_inner"),
        (DecapReason::DropInternal, "drop_internal"),
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::ServiceKeyV4 {}
    unsafe impl aya::Pod for super::ServiceKeyV6 {}
    unsafe impl aya::Pod for super::ServiceVip {}
    unsafe impl aya::Pod for super::FlowKeyV6 {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKeyV4 {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::RingChunk {}
    unsafe impl aya::Pod for super::LcList {}
    unsafe impl aya::Pod for super::DecapAddr {}
    unsafe impl aya::Pod for super::NatReplyV4 {}
    unsafe impl aya::Pod for super::NatReplyV6 {}
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::FlowSetV4 {}
    unsafe impl aya::Pod for super::FlowSetV6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKeyV4>(), 8);
        assert_eq!(size_of::<ServiceKeyV6>(), 20);
        assert_eq!(size_of::<ServiceVip>(), 20);
        assert_eq!(size_of::<FlowKeyV6>(), 40);
        assert_eq!(size_of::<Service>(), 12);
        assert_eq!(size_of::<Backend>(), 36);
        assert_eq!(size_of::<FlowKeyV4>(), 16);
        assert_eq!(size_of::<FlowState>(), 16);
        assert_eq!(size_of::<LcList>(), 8 + 8 * LC_MAX_BACKENDS as usize);
        assert_eq!(size_of::<Traffic>(), 24);
        assert_eq!(size_of::<RingChunk>(), 64);
        assert_eq!(size_of::<DecapAddr>(), 16);
        assert_eq!(size_of::<NatReplyV4>(), 28);
        assert_eq!(size_of::<NatReplyV6>(), 52);
        assert_eq!(size_of::<DataplaneConfig>(), 56);
    }

    #[test]
    fn reasons_are_listed_in_index_order() {
        for (i, (reason, _)) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        for (i, (reason, _)) in DecapReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[test]
    fn decap_addresses_keep_wire_order_and_map_ipv4() {
        let v4 = DecapAddr::from_ip("10.1.2.3".parse().unwrap());
        let bytes: [u8; 16] = unsafe { core::mem::transmute(v4.words) };
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        let v6 = DecapAddr::from_ip("2001:db8::7".parse().unwrap());
        let bytes: [u8; 16] = unsafe { core::mem::transmute(v6.words) };
        assert_eq!(bytes[..4], [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(bytes[15], 7);
    }
}
