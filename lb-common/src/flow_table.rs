//! The connection table of the dsr, ipip and gue modes: a set-associative table of our own in
//! an array map, not the kernel's LRU hash.
//!
//! Why: a lookup in the kernel's LRU hash misses the cache twice (a 16-byte bucket in an array
//! of the table's size, then the element), and an insert takes two locks, pops a free list and
//! writes a cold element. Here a flow lives in one of `FLOW_WAYS` ways of the set its table
//! hash names, and an insert writes one way of the set it just read. No locks: CPUs write ways
//! with plain stores.
//!
//! A way holds the client's side of its flow (address and port), its backend, a seal and its
//! state: 16 bytes for IPv4, so a set of four is one cache line (64 bytes; 128 for IPv6), and
//! a lookup on a large table misses the cache once. The rest of the 5-tuple (VIP, port,
//! protocol) is the backend's service's: a way counts for a packet only if its backend's
//! service (`ServiceVip`, by the backend's service id) is the packet's, so two flows of one
//! client address and port to two services never share an entry, and the seal binds the whole
//! 5-tuple through its table hash.
//!
//! The price: a set holds `FLOW_WAYS` flows, so a flow can be pushed out by four others that
//! share its set before the table is full (`docs/PERFORMANCE.md` gives the figures). Within a
//! set, a new flow takes the way that already holds it, else a free way, else the closed flow
//! seen longest ago, else the open one seen longest ago.
//!
//! Torn entries: a reader on one CPU may see a way half rewritten by another. Each way holds a
//! seal (`flow_seal`) of its flow's table hash, its backend and that backend's generation,
//! which a reader recomputes from what it read and its own flow's hash: a way mixed from two
//! entries, or left by an earlier holder of the backend id, fails the check (but for a 2^-32
//! chance) and counts as absent, so the flow is placed again rather than sent to another
//! flow's backend.
//!
//! The set and the seal come from a hash of their own (`hash::table_hash_v4/v6`), cheaper
//! and quicker to compute than the flow hash that places new flows on the Maglev ring.

use crate::{AF_INET, AF_INET6, FlowKeyV4, FlowKeyV6, ServiceVip, hash};

/// Ways per set.
pub const FLOW_WAYS: usize = 4;

/// Backend ids a way can hold: 24 bits of it.
pub const FLOW_MAX_BACKENDS: u32 = 1 << 24;

/// `FlowSlot::state`, bits 22-0: the tick (`FLOW_TICK_SHIFT`) of the flow's last packet,
/// modulo 2^23 (about 104 days; ages are differences, so only a way idle that long looks
/// recent again).
pub const FLOW_STATE_TICK: u32 = (1 << 23) - 1;
/// `FlowSlot::state`, bit 23: the flow has seen a TCP FIN or RST and no longer counts as
/// active.
pub const FLOW_STATE_CLOSED: u32 = 1 << 23;
/// `FlowSlot::state`, bits 31-24: the backend id's bits 23-16.
const FLOW_STATE_ID_SHIFT: u32 = 24;

/// A flow key (5-tuple) of one address family, as a way holds part of it.
pub trait SlotKey: Copy + core::fmt::Debug + Eq {
    /// The client's address as a way holds it.
    type Client: Copy + core::fmt::Debug + Eq + Default;
    /// Padding that rounds the way to a whole fraction of a cache line.
    type Tail: Copy + core::fmt::Debug + Eq + Default;
    /// The client's address and port (the source), as in the packet.
    fn client(&self) -> (Self::Client, u16);
    /// Whether `addr` and `port` are this flow's client: compared word by word without
    /// branches (a derived `==` compiles to a chain of branches in BPF).
    fn is_client(&self, addr: &Self::Client, port: u16) -> bool;
    /// Whether `vip` is this flow's service: destination, port, protocol and family.
    fn is_service(&self, vip: &ServiceVip) -> bool;
    /// The flow of client `addr`:`port` to service `vip`, if `vip` is of this family.
    fn from_parts(addr: Self::Client, port: u16, vip: &ServiceVip) -> Option<Self>;
    /// The flow hash (`hash::flow_hash_v4/v6`): the Maglev ring entry.
    fn flow_hash(&self) -> u32;
    /// The connection table's hash (`hash::table_hash_v4/v6`): the set, and the seal.
    fn table_hash(&self) -> u32;
}

impl SlotKey for FlowKeyV4 {
    type Client = u32;
    /// 16 bytes: four ways per cache line.
    type Tail = [u32; 0];
    #[inline(always)]
    fn client(&self) -> (u32, u16) {
        (self.src, self.sport)
    }
    #[inline(always)]
    fn is_client(&self, addr: &u32, port: u16) -> bool {
        (self.src ^ *addr) | u32::from(self.sport ^ port) == 0
    }
    #[inline(always)]
    fn is_service(&self, vip: &ServiceVip) -> bool {
        (vip.addr[0] ^ self.dst)
            | u32::from(vip.port ^ self.dport)
            | u32::from(vip.proto ^ self.proto)
            | u32::from(vip.family ^ AF_INET)
            == 0
    }
    fn from_parts(addr: u32, port: u16, vip: &ServiceVip) -> Option<Self> {
        (vip.family == AF_INET).then_some(FlowKeyV4 {
            src: addr,
            dst: vip.addr[0],
            sport: port,
            dport: vip.port,
            proto: vip.proto,
            _pad0: 0,
            _pad1: 0,
        })
    }
    #[inline(always)]
    fn flow_hash(&self) -> u32 {
        hash::flow_hash_v4(self.src, self.dst, self.sport, self.dport, self.proto)
    }
    #[inline(always)]
    fn table_hash(&self) -> u32 {
        hash::table_hash_v4(self.src, self.dst, self.sport, self.dport, self.proto)
    }
}

impl SlotKey for FlowKeyV6 {
    type Client = [u32; 4];
    /// 28 + 4 bytes: two ways per cache line.
    type Tail = [u32; 1];
    #[inline(always)]
    fn client(&self) -> ([u32; 4], u16) {
        (self.src, self.sport)
    }
    #[inline(always)]
    fn is_client(&self, addr: &[u32; 4], port: u16) -> bool {
        (self.src[0] ^ addr[0])
            | (self.src[1] ^ addr[1])
            | (self.src[2] ^ addr[2])
            | (self.src[3] ^ addr[3])
            | u32::from(self.sport ^ port)
            == 0
    }
    #[inline(always)]
    fn is_service(&self, vip: &ServiceVip) -> bool {
        (vip.addr[0] ^ self.dst[0])
            | (vip.addr[1] ^ self.dst[1])
            | (vip.addr[2] ^ self.dst[2])
            | (vip.addr[3] ^ self.dst[3])
            | u32::from(vip.port ^ self.dport)
            | u32::from(vip.proto ^ self.proto)
            | u32::from(vip.family ^ AF_INET6)
            == 0
    }
    fn from_parts(addr: [u32; 4], port: u16, vip: &ServiceVip) -> Option<Self> {
        (vip.family == AF_INET6).then_some(FlowKeyV6 {
            src: addr,
            dst: vip.addr,
            sport: port,
            dport: vip.port,
            proto: vip.proto,
            _pad0: 0,
            _pad1: 0,
        })
    }
    #[inline(always)]
    fn flow_hash(&self) -> u32 {
        hash::flow_hash_v6(&self.src, &self.dst, self.sport, self.dport, self.proto)
    }
    #[inline(always)]
    fn table_hash(&self) -> u32 {
        hash::table_hash_v6(&self.src, &self.dst, self.sport, self.dport, self.proto)
    }
}

/// One way of a set: a flow's client side and its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSlot<K: SlotKey> {
    /// The client's address, network order.
    pub client: K::Client,
    /// The client's port, network order.
    pub port: u16,
    /// The low 16 bits of the backend id the flow was placed on (`backend`).
    pub id_low: u16,
    /// `flow_seal(table hash, backend, backend's generation)`; 0: the way is free.
    pub seal: u32,
    /// The backend id's high bits, whether TCP closed the flow, and the tick of its last
    /// packet, written at most once a tick (`FLOW_STATE_*`).
    pub state: u32,
    pub _tail: K::Tail,
}

/// One set: the ways a table hash names.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSet<K: SlotKey> {
    pub ways: [FlowSlot<K>; FLOW_WAYS],
}

pub type FlowSetV4 = FlowSet<FlowKeyV4>;
pub type FlowSetV6 = FlowSet<FlowKeyV6>;

impl<K: SlotKey> FlowSlot<K> {
    /// Makes this way `key`'s (of table hash `hash`): backend `id` of generation `generation`,
    /// seen at tick `now`, closed (FIN or RST) or not. The seal is written last.
    #[inline(always)]
    pub fn fill(&mut self, key: &K, hash: u32, id: u32, generation: u32, now: u32, closed: bool) {
        (self.client, self.port) = key.client();
        self.id_low = id as u16;
        self.state = (id >> 16) << FLOW_STATE_ID_SHIFT | flow_state(now, closed);
        self.seal = flow_seal(hash, id, generation);
    }

    /// The backend id the flow was placed on (below `FLOW_MAX_BACKENDS`).
    #[inline(always)]
    pub fn backend(&self) -> u32 {
        u32::from(self.id_low) | (self.state >> FLOW_STATE_ID_SHIFT) << 16
    }

    /// `state` after a packet at tick `now` that leaves the flow closed or not.
    #[inline(always)]
    pub fn state_at(&self, now: u32, closed: bool) -> u32 {
        self.state & !(FLOW_STATE_TICK | FLOW_STATE_CLOSED) | flow_state(now, closed)
    }

    /// Whether the way is taken by a flow of client `key` (its seal and service still to be
    /// checked: the client may have flows to several services).
    #[inline(always)]
    pub fn has_client(&self, key: &K) -> bool {
        self.seal != 0 && key.is_client(&self.client, self.port)
    }

    /// Whether this way, taken by `key`'s client, holds `key` (of table hash `hash`): sealed
    /// for its backend's current `generation`, whose service is the flow's (`vip`).
    #[inline(always)]
    pub fn holds(&self, key: &K, hash: u32, generation: u32, vip: &ServiceVip) -> bool {
        flow_holds(key, hash, self.backend(), self.seal, generation, vip)
    }

    /// The tick of the flow's last packet.
    #[inline(always)]
    pub fn last_seen(&self) -> u32 {
        self.state & FLOW_STATE_TICK
    }

    /// Whether TCP closed the flow (FIN or RST).
    #[inline(always)]
    pub fn closed(&self) -> bool {
        self.state & FLOW_STATE_CLOSED != 0
    }

    /// How willing this way is to take a new flow at tick `now` (its own way aside): a free
    /// one, then a closed flow before an open one, the one seen longest ago first.
    #[inline(always)]
    fn vacancy(&self, now: u32) -> u32 {
        const FREE: u32 = u32::MAX;
        const CLOSED: u32 = 1 << 30;
        if self.seal == 0 {
            return FREE;
        }
        let idle = now.wrapping_sub(self.last_seen()) & FLOW_STATE_TICK;
        if self.closed() { CLOSED | idle } else { idle }
    }
}

impl<K: SlotKey> FlowSet<K> {
    /// The way a new flow takes at tick `now`: `own`, the way that already holds it (the
    /// caller checked its seal and service; a flow has one way), else the most vacant
    /// (`FlowSlot::vacancy`; the first on ties). A full set gives up its stalest flow, whose
    /// next packet is placed again.
    #[inline(always)]
    pub fn vacancy_for(&self, own: Option<usize>, now: u32) -> usize {
        if let Some(own) = own {
            return own;
        }
        let (mut pick, mut best) = (0, 0);
        let mut i = 0;
        while i < FLOW_WAYS {
            let v = self.ways[i].vacancy(now);
            if v > best {
                (pick, best) = (i, v);
            }
            i += 1;
        }
        pick
    }
}

impl<K: SlotKey> Default for FlowSlot<K> {
    fn default() -> Self {
        FlowSlot {
            client: K::Client::default(),
            port: 0,
            id_low: 0,
            seal: 0,
            state: 0,
            _tail: K::Tail::default(),
        }
    }
}

impl<K: SlotKey> Default for FlowSet<K> {
    fn default() -> Self {
        FlowSet {
            ways: [FlowSlot::default(); FLOW_WAYS],
        }
    }
}

/// A way's tick and closed bits (`FLOW_STATE_*`) at tick `now`, closed or not.
#[inline(always)]
#[must_use]
pub const fn flow_state(now: u32, closed: bool) -> u32 {
    let tick = now & FLOW_STATE_TICK;
    if closed {
        tick | FLOW_STATE_CLOSED
    } else {
        tick
    }
}

/// The seal of a way holding a flow of table hash `hash` on backend `backend` of generation
/// `generation`; never 0 (a free way). For fixed backend and generation it tells apart any
/// two hashes but those differing in bit 0 only (odd multiplications are one-to-one), likewise
/// generations for a fixed hash and backend; fields mixed from two ways match with a chance of
/// about 2^-32.
#[inline(always)]
#[must_use]
pub const fn flow_seal(hash: u32, backend: u32, generation: u32) -> u32 {
    let h = (hash ^ backend.wrapping_mul(0x9e37_79b1)).wrapping_mul(0x85eb_ca6b);
    (h ^ (h >> 15) ^ generation.wrapping_mul(0xc2b2_ae35)) | 1
}

/// Whether a way of `key`'s client, read as backend `id` and `seal`, holds `key` (of table hash
/// `hash`): sealed for the backend's current `generation`, whose service is the flow's
/// (`vip`). A reader that shares the table with writers passes the id and seal it read once,
/// so a way rewritten meanwhile is not checked half old, half new.
#[inline(always)]
#[must_use]
pub fn flow_holds<K: SlotKey>(
    key: &K,
    hash: u32,
    id: u32,
    seal: u32,
    generation: u32,
    vip: &ServiceVip,
) -> bool {
    seal == flow_seal(hash, id, generation) && key.is_service(vip)
}

/// Sets of a table with room for `flows` flows: a power of two (the set is the table hash's low
/// bits), at least one.
#[must_use]
pub const fn flow_sets(flows: u32) -> u32 {
    // At most 2^30: `u32::MAX` flows in sets of four.
    let sets = flows.div_ceil(FLOW_WAYS as u32);
    if sets <= 1 {
        1
    } else {
        sets.next_power_of_two()
    }
}

/// The set of a flow of table hash `hash` in a table of `sets` sets (a power of two).
#[inline(always)]
#[must_use]
pub const fn flow_set(hash: u32, sets: u32) -> u32 {
    hash & (sets - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_whole_cache_lines() {
        assert_eq!(size_of::<FlowSlot<FlowKeyV4>>(), 16);
        assert_eq!(size_of::<FlowSlot<FlowKeyV6>>(), 32);
        assert_eq!(size_of::<FlowSetV4>(), 64);
        assert_eq!(size_of::<FlowSetV6>(), 128);
    }

    #[test]
    fn table_sizes_round_up_to_a_power_of_two_of_sets() {
        assert_eq!(flow_sets(0), 1);
        assert_eq!(flow_sets(4), 1);
        assert_eq!(flow_sets(5), 2);
        assert_eq!(flow_sets(1 << 20), 1 << 18);
        assert_eq!(flow_sets(1_000_000), 1 << 18);
        assert_eq!(flow_sets(u32::MAX), 1 << 30);
    }

    const VIP: ServiceVip = ServiceVip {
        addr: [7, 0, 0, 0],
        port: 80,
        proto: 6,
        family: AF_INET,
    };

    fn key(n: u32) -> FlowKeyV4 {
        FlowKeyV4 {
            src: n,
            dst: 7,
            sport: 1000,
            dport: 80,
            proto: 6,
            ..Default::default()
        }
    }

    /// A set with flows 1..=4 (flow 1 seen at tick 10, 2 at 11, ...).
    fn full_set() -> FlowSetV4 {
        let mut set = FlowSetV4::default();
        for (i, way) in set.ways.iter_mut().enumerate() {
            let n = i as u32 + 1;
            way.fill(&key(n), n, n, 1, 9 + n, false);
        }
        set
    }

    #[test]
    fn a_way_holds_its_client_and_the_service_checks_the_rest() {
        let k = key(1);
        let mut way = FlowSlot::default();
        assert!(
            !way.has_client(&FlowKeyV4::default()),
            "a free way has no client"
        );
        way.fill(&k, k.table_hash(), 3, 5, 10, false);
        assert!(way.has_client(&k));
        assert!(way.holds(&k, k.table_hash(), 5, &VIP));
        assert!(!way.has_client(&key(2)));
        assert!(!way.has_client(&FlowKeyV4 { sport: 2, ..k }));
        // Same client, another service: a candidate, never a match.
        for other in [
            FlowKeyV4 { dst: 8, ..k },
            FlowKeyV4 { dport: 81, ..k },
            FlowKeyV4 { proto: 17, ..k },
        ] {
            assert!(way.has_client(&other));
            assert!(!way.holds(&other, k.table_hash(), 5, &VIP), "{other:?}");
        }
        assert!(!way.holds(
            &k,
            k.table_hash(),
            5,
            &ServiceVip {
                family: AF_INET6,
                ..VIP
            }
        ));
        assert!(
            !way.holds(&k, k.table_hash(), 6, &VIP),
            "another generation"
        );
        assert!(!way.holds(&k, k.table_hash() ^ 2, 5, &VIP), "another hash");
        assert_eq!(FlowKeyV4::from_parts(1, 1000, &VIP), Some(k));
        assert_eq!(FlowKeyV6::from_parts([1; 4], 1000, &VIP), None);

        let k6 = FlowKeyV6 {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 1,
            dport: 2,
            proto: 6,
            ..Default::default()
        };
        let vip6 = ServiceVip {
            addr: k6.dst,
            port: 2,
            proto: 6,
            family: AF_INET6,
        };
        let mut way6 = FlowSlot::default();
        way6.fill(&k6, k6.table_hash(), 1, 1, 1, false);
        assert!(way6.holds(&k6, k6.table_hash(), 1, &vip6));
        for i in 0..4 {
            let mut src = k6.src;
            src[i] ^= 1;
            assert!(!way6.has_client(&FlowKeyV6 { src, ..k6 }));
            let mut dst = k6.dst;
            dst[i] ^= 1;
            assert!(!way6.holds(&FlowKeyV6 { dst, ..k6 }, k6.table_hash(), 1, &vip6));
        }
        assert!(!way6.has_client(&FlowKeyV6 { sport: 9, ..k6 }));
        assert_eq!(FlowKeyV6::from_parts(k6.src, 1, &vip6), Some(k6));
    }

    #[test]
    fn a_new_flow_takes_its_own_way_then_a_free_one() {
        let mut set = full_set();
        set.ways[2].seal = 0;
        assert_eq!(set.vacancy_for(None, 20), 2);
        // A flow placed again keeps its own way: a free way must not give it a second one.
        assert_eq!(set.vacancy_for(Some(3), 20), 3);
    }

    #[test]
    fn a_full_set_gives_up_a_closed_flow_then_the_stalest() {
        let mut set = full_set();
        assert_eq!(set.vacancy_for(None, 20), 0, "flow 1 was seen longest ago");
        set.ways[3].state |= FLOW_STATE_CLOSED;
        assert_eq!(set.vacancy_for(None, 20), 3, "closed before open");
        // Ages are differences, so a wrapped clock still finds the stalest.
        let mut set = full_set();
        for (way, seen) in set.ways.iter_mut().zip([2, 0, 1, FLOW_STATE_TICK - 1]) {
            way.state = flow_state(seen, false);
        }
        assert_eq!(set.vacancy_for(None, 3), 3);
    }

    #[test]
    fn a_way_keeps_its_backend_tick_and_closed_bit_apart() {
        let k = key(1);
        let mut way = FlowSlot::default();
        for id in [0, 1, 0xffff, 0x1_0000, 0xab_cdef, FLOW_MAX_BACKENDS - 1] {
            way.fill(&k, 7, id, 1, 12345, true);
            assert_eq!(
                (way.backend(), way.last_seen(), way.closed()),
                (id, 12345, true)
            );
            way.state = way.state_at(FLOW_STATE_TICK + 3, false);
            assert_eq!(
                (way.backend(), way.last_seen(), way.closed()),
                (id, 2, false)
            );
            assert_eq!(way.seal, flow_seal(7, id, 1));
        }
    }

    #[test]
    fn a_seal_binds_hash_backend_and_generation() {
        let s = flow_seal(0x1234_5678, 7, 3);
        assert_ne!(s, 0);
        assert_ne!(s, flow_seal(0x1234_5679, 7, 3));
        assert_ne!(s, flow_seal(0x1234_5678, 8, 3));
        assert_ne!(s, flow_seal(0x1234_5678, 7, 4));
        assert_eq!(flow_seal(0, 0, 0) & 1, 1);
    }
}
