//! The connection table of the dsr, ipip and gue modes: a set-associative table of our own in
//! an array map, not the kernel's LRU hash.
//!
//! Why: a lookup in the kernel's LRU hash misses the cache twice (a 16-byte bucket in an array
//! of the table's size, then the element), and an insert takes two locks, pops a free list and
//! writes a cold element. Here a flow lives in one of `FLOW_WAYS` ways of the set its flow hash
//! names; a set is 128 bytes (IPv4) or 256 (IPv6), aligned, so a lookup reads one or two
//! adjacent cache lines and an insert writes one way of the set it just read. No locks: CPUs
//! write ways with plain stores.
//!
//! The price: a set holds `FLOW_WAYS` flows, so a flow can be pushed out by four others that
//! share its set before the table is full (`docs/PERFORMANCE.md` gives the figures). Within a
//! set, a new flow takes a free way, else the closed flow seen longest ago, else the open one
//! seen longest ago.
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

use crate::{FLOW_F_CLOSED, FlowKeyV4, FlowKeyV6, hash};

/// Ways per set.
pub const FLOW_WAYS: usize = 4;

/// A flow key as a way holds it.
pub trait SlotKey: Copy + core::fmt::Debug + Eq {
    /// Padding that rounds the way to a whole fraction of a cache line.
    type Tail: Copy + core::fmt::Debug + Eq + Default;
    /// The same 5-tuple: compared word by word without branches (a derived `==` compiles to
    /// a chain of branches in BPF).
    fn same(&self, other: &Self) -> bool;
    /// The flow hash (`hash::flow_hash_v4/v6`): the Maglev ring entry.
    fn flow_hash(&self) -> u32;
    /// The connection table's hash (`hash::table_hash_v4/v6`): the set, and the seal.
    fn table_hash(&self) -> u32;
}

/// Source and destination port as one word.
#[inline(always)]
const fn ports(sport: u16, dport: u16) -> u32 {
    sport as u32 | (dport as u32) << 16
}

impl SlotKey for FlowKeyV4 {
    /// 16 + 16 bytes: two ways per cache line.
    type Tail = [u32; 0];
    #[inline(always)]
    fn same(&self, o: &Self) -> bool {
        (self.src ^ o.src)
            | (self.dst ^ o.dst)
            | (ports(self.sport, self.dport) ^ ports(o.sport, o.dport))
            | (self.proto ^ o.proto) as u32
            == 0
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
    /// 40 + 16 + 8 bytes: one way per cache line.
    type Tail = [u32; 2];
    #[inline(always)]
    fn same(&self, o: &Self) -> bool {
        let mut diff = (ports(self.sport, self.dport) ^ ports(o.sport, o.dport))
            | (self.proto ^ o.proto) as u32;
        let mut i = 0;
        while i < 4 {
            diff |= (self.src[i] ^ o.src[i]) | (self.dst[i] ^ o.dst[i]);
            i += 1;
        }
        diff == 0
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

/// One way of a set: a flow and its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSlot<K: SlotKey> {
    /// The 5-tuple, network order, padding zero.
    pub key: K,
    /// The backend id the flow was placed on.
    pub backend: u32,
    /// Last packet, in ticks (`FLOW_TICK_SHIFT`), written at most once a tick.
    pub last_seen: u32,
    /// `FLOW_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// `flow_seal(flow hash, backend, backend's generation)`; 0: the way is free.
    pub seal: u32,
    pub _tail: K::Tail,
}

/// One set: the ways a flow hash names.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSet<K: SlotKey> {
    pub ways: [FlowSlot<K>; FLOW_WAYS],
}

pub type FlowSetV4 = FlowSet<FlowKeyV4>;
pub type FlowSetV6 = FlowSet<FlowKeyV6>;

impl<K: SlotKey> FlowSlot<K> {
    /// Makes this way `key`'s (of table hash `hash`): backend `id` of generation `generation`, seen
    /// at tick `now`, closed (FIN or RST) or not. The seal is written last.
    #[inline(always)]
    pub fn fill(&mut self, key: &K, hash: u32, id: u32, generation: u32, now: u32, closed: bool) {
        self.key = *key;
        self.backend = id;
        self.last_seen = now;
        self.flags = if closed { FLOW_F_CLOSED } else { 0 };
        self.seal = flow_seal(hash, id, generation);
    }

    /// How willing this way is to take `key`'s flow at tick `now`: its own (placed again: a
    /// flow has one way), then a free one, then a closed flow before an open one, the one seen
    /// longest ago first.
    #[inline(always)]
    fn vacancy(&self, key: &K, now: u32) -> u32 {
        const OWN: u32 = u32::MAX;
        const FREE: u32 = u32::MAX - 1;
        const CLOSED: u32 = 1 << 30;
        if self.seal == 0 {
            return FREE;
        }
        if key.same(&self.key) {
            return OWN;
        }
        let idle = now.wrapping_sub(self.last_seen);
        let idle = if idle < CLOSED { idle } else { CLOSED - 1 };
        if self.flags & FLOW_F_CLOSED != 0 {
            CLOSED | idle
        } else {
            idle
        }
    }
}

impl<K: SlotKey> FlowSet<K> {
    /// The way `key` holds, if any (its seal still to be checked).
    #[inline(always)]
    pub fn position(&self, key: &K) -> Option<usize> {
        let mut i = 0;
        while i < FLOW_WAYS {
            let way = &self.ways[i];
            if way.seal != 0 && key.same(&way.key) {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// The way a new flow `key` takes at tick `now` (`FlowSlot::vacancy`; the first on ties).
    /// A full set gives up its stalest flow, whose next packet is placed again.
    #[inline(always)]
    pub fn vacancy_for(&self, key: &K, now: u32) -> usize {
        let (mut pick, mut best) = (0, 0);
        let mut i = 0;
        while i < FLOW_WAYS {
            let v = self.ways[i].vacancy(key, now);
            if v > best {
                (pick, best) = (i, v);
            }
            i += 1;
        }
        pick
    }
}

impl<K: SlotKey> Default for FlowSlot<K>
where
    K: Default,
{
    fn default() -> Self {
        FlowSlot {
            key: K::default(),
            backend: 0,
            last_seen: 0,
            flags: 0,
            _pad: 0,
            seal: 0,
            _tail: K::Tail::default(),
        }
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

/// Sets of a table with room for `flows` flows: a power of two (the set is the flow hash's low
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
        assert_eq!(size_of::<FlowSlot<FlowKeyV4>>(), 32);
        assert_eq!(size_of::<FlowSlot<FlowKeyV6>>(), 64);
        assert_eq!(size_of::<FlowSetV4>(), 128);
        assert_eq!(size_of::<FlowSetV6>(), 256);
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
        let mut set = FlowSetV4 {
            ways: [FlowSlot::default(); FLOW_WAYS],
        };
        for (i, way) in set.ways.iter_mut().enumerate() {
            let n = i as u32 + 1;
            way.fill(&key(n), n, n, 1, 9 + n, false);
        }
        set
    }

    #[test]
    fn keys_compare_every_field() {
        let k = key(1);
        assert!(k.same(&k));
        for other in [
            FlowKeyV4 { src: 2, ..k },
            FlowKeyV4 { dst: 2, ..k },
            FlowKeyV4 { sport: 2, ..k },
            FlowKeyV4 { dport: 2, ..k },
            FlowKeyV4 { proto: 17, ..k },
        ] {
            assert!(!k.same(&other), "{other:?}");
        }
        let k6 = FlowKeyV6 {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 1,
            dport: 2,
            proto: 6,
            ..Default::default()
        };
        assert!(k6.same(&k6));
        for i in 0..4 {
            let mut src = k6.src;
            src[i] ^= 1;
            assert!(!k6.same(&FlowKeyV6 { src, ..k6 }));
            let mut dst = k6.dst;
            dst[i] ^= 1;
            assert!(!k6.same(&FlowKeyV6 { dst, ..k6 }));
        }
        assert!(!k6.same(&FlowKeyV6 { sport: 9, ..k6 }));
        assert!(!k6.same(&FlowKeyV6 { proto: 17, ..k6 }));
    }

    #[test]
    fn a_new_flow_takes_a_free_way_first() {
        let mut set = full_set();
        set.ways[2].seal = 0;
        assert_eq!(set.vacancy_for(&key(9), 20), 2);
        assert_eq!(set.position(&key(3)), None, "a free way holds no flow");
    }

    #[test]
    fn a_flow_placed_again_keeps_its_own_way() {
        let mut set = full_set();
        set.ways[0].seal = 0;
        // Flow 3 has way 2; a free way 0 must not give it a second one.
        assert_eq!(set.vacancy_for(&key(3), 20), 2);
        assert_eq!(set.position(&key(3)), Some(2));
    }

    #[test]
    fn a_full_set_gives_up_a_closed_flow_then_the_stalest() {
        let mut set = full_set();
        assert_eq!(
            set.vacancy_for(&key(9), 20),
            0,
            "flow 1 was seen longest ago"
        );
        set.ways[3].flags = FLOW_F_CLOSED;
        assert_eq!(set.vacancy_for(&key(9), 20), 3, "closed before open");
        // Ages are differences, so a wrapped clock still finds the stalest.
        let mut set = full_set();
        for (way, seen) in set.ways.iter_mut().zip([2, 0, 1, u32::MAX - 1]) {
            way.last_seen = seen;
        }
        assert_eq!(set.vacancy_for(&key(9), 3), 3);
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
