//! The connection tables as userspace sees them (`lb_common::flow_table`): read through their
//! mapping for `lb status`, the flow recount and tests, and written when the flows of an older
//! build's table are carried over. The set and way choices are lb-common's, the same code the
//! XDP program runs.

use lb_common::{FlowSet, FlowSlot, FlowState, ServiceVip, flow_set, flow_table::SlotKey};

use crate::mapped::MapMemory;

/// What a way is checked against for its backend id: the id's current generation and its
/// service's VIP, port and protocol (the program reads them from `BACKENDS` and
/// `SERVICE_VIPS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub generation: u32,
    pub vip: ServiceVip,
}

/// Where a table's sets are: the program's map, or plain memory (tests, the capacity figures).
pub trait SetStore<K: SlotKey> {
    fn sets(&self) -> usize;
    fn get(&self, i: usize) -> FlowSet<K>;
    fn put(&mut self, i: usize, set: FlowSet<K>);
}

impl<K: SlotKey> SetStore<K> for MapMemory<FlowSet<K>> {
    fn sets(&self) -> usize {
        self.len()
    }
    fn get(&self, i: usize) -> FlowSet<K> {
        MapMemory::get(self, i)
    }
    fn put(&mut self, i: usize, set: FlowSet<K>) {
        self.set(i, set);
    }
}

impl<K: SlotKey> SetStore<K> for Vec<FlowSet<K>> {
    fn sets(&self) -> usize {
        self.len()
    }
    fn get(&self, i: usize) -> FlowSet<K> {
        self[i]
    }
    fn put(&mut self, i: usize, set: FlowSet<K>) {
        self[i] = set;
    }
}

/// One family's connection table.
pub struct FlowTable<K: SlotKey, S = MapMemory<FlowSet<K>>> {
    store: S,
    _key: std::marker::PhantomData<K>,
}

impl<K: SlotKey, S: SetStore<K>> FlowTable<K, S> {
    /// `store` must hold a power of two of sets (as the loader sizes the maps).
    pub fn new(store: S) -> Self {
        assert!(
            store.sets().is_power_of_two(),
            "sets must be a power of two"
        );
        FlowTable {
            store,
            _key: std::marker::PhantomData,
        }
    }

    /// The set `key` lives in.
    pub fn set_index(&self, key: &K) -> usize {
        flow_set(key.table_hash(), self.store.sets() as u32) as usize
    }

    /// The whole set at `index`, as the program last wrote it.
    pub fn set(&self, index: usize) -> FlowSet<K> {
        self.store.get(index)
    }

    /// Overwrites the set at `index` (tests: entries the program would never write).
    pub fn put_set(&mut self, index: usize, set: FlowSet<K>) {
        self.store.put(index, set);
    }

    /// `key`'s entry, if the table has a sound one for the current holder of its backend id.
    pub fn find(
        &self,
        key: &K,
        mut holder: impl FnMut(u32) -> Option<Holder>,
    ) -> Option<FlowState> {
        let set = self.set(self.set_index(key));
        let way = &set.ways[way_of(&set, key, &mut holder)?];
        let generation = holder(way.backend())?.generation;
        Some(state_of(way, generation))
    }

    /// Every sound entry, set by set, with its 5-tuple (the client's side from the way, the
    /// rest from its backend's service).
    pub fn entries(&self, mut holder: impl FnMut(u32) -> Option<Holder>) -> Vec<(K, FlowState)> {
        let mut out = Vec::new();
        for i in 0..self.store.sets() {
            let set = self.store.get(i);
            for way in set.ways.iter().filter(|w| w.seal != 0) {
                let Some(h) = holder(way.backend()) else {
                    continue;
                };
                if let Some(key) = K::from_parts(way.client, way.port, &h.vip)
                    && way.holds(&key, key.table_hash(), h.generation, &h.vip)
                {
                    out.push((key, state_of(way, h.generation)));
                }
            }
        }
        out
    }

    /// Enters `key` on backend `id` of generation `generation` in the way the program would
    /// give it at tick `now`. Not atomic with the program's own writes to the set: for a data
    /// plane not yet forwarding into this table, or tests.
    pub fn insert(
        &mut self,
        key: &K,
        id: u32,
        generation: u32,
        now: u32,
        closed: bool,
        holder: impl FnMut(u32) -> Option<Holder>,
    ) {
        let index = self.set_index(key);
        let mut set = self.store.get(index);
        let way = set.vacancy_for(way_of(&set, key, holder), now);
        set.ways[way].fill(key, key.table_hash(), id, generation, now, closed);
        self.store.put(index, set);
    }
}

/// The way of `set` that holds `key`, as the program finds it (`holder` gives what an id is
/// checked against, `None` for an unknown id).
pub fn way_of<K: SlotKey>(
    set: &FlowSet<K>,
    key: &K,
    mut holder: impl FnMut(u32) -> Option<Holder>,
) -> Option<usize> {
    let hash = key.table_hash();
    set.ways.iter().position(|way| {
        way.has_client(key)
            && holder(way.backend()).is_some_and(|h| way.holds(key, hash, h.generation, &h.vip))
    })
}

/// How `FlowState` reports a sound way of backend generation `generation`.
fn state_of<K: SlotKey>(way: &FlowSlot<K>, generation: u32) -> FlowState {
    FlowState {
        backend: way.backend(),
        generation,
        last_seen: way.last_seen(),
        flags: if way.closed() {
            lb_common::FLOW_F_CLOSED
        } else {
            0
        },
        nat_port: 0,
    }
}

/// Of `flows` distinct flows entered one after the other (each seen once, the oldest first)
/// into a table with room for `capacity`, the share still in the table at the end: what
/// collisions in full sets cost against a table that evicts nothing before it is full
/// (`docs/PERFORMANCE.md`). Flows are spread by the real table hash over random 5-tuples.
pub fn retention(capacity: u32, flows: u32, seed: u64) -> f64 {
    use lb_common::{FlowKeyV4, ServiceKeyV4};
    let sets = lb_common::flow_sets(capacity) as usize;
    let mut table: FlowTable<FlowKeyV4, _> = FlowTable::new(vec![FlowSet::default(); sets]);
    let service = ServiceKeyV4 {
        addr: 0x0100_c80a,
        port: 80u16.to_be(),
        proto: 6,
        _pad: 0,
    };
    let holder = |_| {
        Some(Holder {
            generation: 1,
            vip: ServiceVip::v4(&service),
        })
    };
    let mut rng = seed | 1;
    let mut next = move || {
        // xorshift64*: reproducible, no dependency.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let keys: Vec<FlowKeyV4> = (0..flows)
        .map(|_| {
            let r = next();
            FlowKeyV4 {
                src: r as u32,
                dst: service.addr,
                sport: (r >> 32) as u16,
                dport: service.port,
                proto: service.proto,
                ..Default::default()
            }
        })
        .collect();
    for (tick, key) in keys.iter().enumerate() {
        table.insert(key, 1, 1, tick as u32, false, holder);
    }
    let kept = keys
        .iter()
        .filter(|k| table.find(k, holder).is_some())
        .count();
    kept as f64 / f64::from(flows)
}

/// The sets of the connection tables of builds before ways were compact (`FLOW_TABLE`,
/// `FLOW_TABLE_V6`): each way held the whole 5-tuple, in 32 (IPv4) or 64 bytes. Read once,
/// when a daemon adopts a data plane such a build pinned, to carry its flows over.
pub mod legacy {
    use lb_common::{FLOW_F_CLOSED, FLOW_WAYS, FlowKeyV4, FlowKeyV6, FlowState, flow_seal};

    use super::SlotKey;

    /// A way as those builds wrote it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Way<K: Copy, const TAIL: usize> {
        pub key: K,
        pub backend: u32,
        pub last_seen: u32,
        /// `FLOW_F_CLOSED`.
        pub flags: u16,
        pub _pad: u16,
        /// `flow_seal(table hash, backend, generation)`; 0: free.
        pub seal: u32,
        pub _tail: [u32; TAIL],
    }

    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Set<K: Copy, const TAIL: usize> {
        pub ways: [Way<K, TAIL>; FLOW_WAYS],
    }

    pub type SetV4 = Set<FlowKeyV4, 0>;
    pub type SetV6 = Set<FlowKeyV6, 2>;

    impl<K: SlotKey, const TAIL: usize> Set<K, TAIL> {
        /// The flows of this set whose seals are sound for the current generation of their
        /// backend id (`generation_of`; `None` for an unknown id).
        pub fn flows(
            &self,
            mut generation_of: impl FnMut(u32) -> Option<u32>,
        ) -> Vec<(K, FlowState)> {
            let mut out = Vec::new();
            for way in self.ways.iter().filter(|w| w.seal != 0) {
                if let Some(generation) = generation_of(way.backend)
                    && way.seal == flow_seal(way.key.table_hash(), way.backend, generation)
                {
                    out.push((
                        way.key,
                        FlowState {
                            backend: way.backend,
                            generation,
                            last_seen: way.last_seen,
                            flags: way.flags & FLOW_F_CLOSED,
                            nat_port: 0,
                        },
                    ));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{AF_INET, FlowKeyV4, FlowSetV4, flow_seal};

    use super::*;

    fn table(sets: usize) -> FlowTable<FlowKeyV4, Vec<FlowSetV4>> {
        FlowTable::new(vec![FlowSet::default(); sets])
    }

    /// The service of `key(n)`, and of `key_to(n, 81)`.
    fn vip(port: u16) -> ServiceVip {
        ServiceVip {
            addr: [9, 0, 0, 0],
            port,
            proto: 6,
            family: AF_INET,
        }
    }

    fn key_to(n: u32, dport: u16) -> FlowKeyV4 {
        FlowKeyV4 {
            src: n,
            dst: 9,
            sport: 1,
            dport,
            proto: 6,
            ..Default::default()
        }
    }

    fn key(n: u32) -> FlowKeyV4 {
        key_to(n, 80)
    }

    /// Every id of generation `generation`, its service that of `key(n)`.
    fn holder(generation: u32) -> impl Fn(u32) -> Option<Holder> + Copy {
        move |_| {
            Some(Holder {
                generation,
                vip: vip(80),
            })
        }
    }

    #[test]
    fn an_entry_is_found_only_for_its_backends_generation_and_service() {
        let mut t = table(16);
        t.insert(&key(1), 3, 7, 100, false, holder(7));
        let found = t.find(&key(1), |id| {
            (id == 3).then_some(Holder {
                generation: 7,
                vip: vip(80),
            })
        });
        assert_eq!(
            found.map(|s| (s.backend, s.generation, s.last_seen)),
            Some((3, 7, 100))
        );
        assert_eq!(
            t.find(&key(1), holder(8)),
            None,
            "the id went to a new backend"
        );
        assert_eq!(t.find(&key(1), |_| None), None, "the id is gone");
        assert_eq!(t.find(&key(2), holder(7)), None);
        let other_service = |_| {
            Some(Holder {
                generation: 7,
                vip: vip(81),
            })
        };
        assert_eq!(
            t.find(&key(1), other_service),
            None,
            "another service's backend"
        );
    }

    #[test]
    fn one_client_port_keeps_a_flow_to_each_service() {
        // Flows of one client address and port to two services (two ports of one VIP), in
        // the same set when the table has one: two ways, each found for its own service.
        let mut t = table(1);
        let services = |id: u32| {
            Some(Holder {
                generation: 1,
                vip: vip(if id == 0 { 80 } else { 81 }),
            })
        };
        t.insert(&key_to(5, 80), 0, 1, 10, false, services);
        t.insert(&key_to(5, 81), 1, 1, 11, false, services);
        assert_eq!(t.find(&key_to(5, 80), services).map(|s| s.backend), Some(0));
        assert_eq!(t.find(&key_to(5, 81), services).map(|s| s.backend), Some(1));
        // Placed again, each keeps its own way.
        t.insert(&key_to(5, 81), 1, 1, 12, true, services);
        let mut flows = t.entries(services);
        flows.sort_by_key(|(k, _)| k.dport);
        let seen: Vec<_> = flows.iter().map(|(k, s)| (k.dport, s.last_seen)).collect();
        assert_eq!(seen, [(80, 10), (81, 12)]);
    }

    #[test]
    fn a_torn_entry_is_not_found() {
        let mut t = table(16);
        t.insert(&key(1), 3, 7, 100, false, holder(7));
        let i = t.set_index(&key(1));
        let mut set = t.set(i);
        let way = way_of(&set, &key(1), holder(7)).unwrap();
        // Another flow's backend written over this one's, the seal not yet.
        set.ways[way].id_low = 4;
        t.put_set(i, set);
        assert_eq!(t.find(&key(1), holder(7)), None);
        assert!(t.entries(holder(7)).is_empty());
    }

    #[test]
    fn entries_lists_every_sound_flow_once_with_its_5_tuple() {
        // Room for 4096: no set of four overflows.
        let mut t = table(1024);
        for n in 0..100 {
            t.insert(&key(n), n % 5, 1, n, n % 2 == 0, holder(1));
        }
        // Placed again on another backend: still one entry.
        t.insert(&key(7), 4, 1, 200, false, holder(1));
        let mut entries = t.entries(holder(1));
        entries.sort_by_key(|(k, _)| k.src);
        assert_eq!(entries.len(), 100);
        assert!(
            entries
                .iter()
                .enumerate()
                .all(|(n, (k, _))| *k == key(n as u32))
        );
        let seven = entries[7].1;
        assert_eq!((seven.backend, seven.last_seen, seven.flags), (4, 200, 0));
        assert_eq!(entries[8].1.flags, lb_common::FLOW_F_CLOSED);
    }

    #[test]
    fn a_lightly_loaded_table_keeps_nearly_every_flow() {
        // A quarter full (the default table with 256k flows): sets of four rarely overflow.
        let kept = retention(1 << 16, 1 << 14, 1);
        assert!(kept > 0.995, "kept {kept}");
        // Full: collisions cost a share, but most flows stay.
        let kept = retention(1 << 16, 1 << 16, 1);
        assert!((0.6..0.95).contains(&kept), "kept {kept}");
    }

    #[test]
    fn an_older_builds_set_gives_its_sound_flows() {
        assert_eq!(size_of::<legacy::SetV4>(), 128);
        assert_eq!(size_of::<legacy::SetV6>(), 256);
        let way = |n: u32, backend: u32, generation: u32| legacy::Way::<FlowKeyV4, 0> {
            key: key(n),
            backend,
            last_seen: 40 + n,
            flags: 0,
            _pad: 0,
            seal: flow_seal(key(n).table_hash(), backend, generation),
            _tail: [],
        };
        let mut set = legacy::SetV4 {
            ways: [way(1, 2, 5), way(2, 3, 6), way(3, 2, 5), way(4, 2, 5)],
        };
        set.ways[3].seal = 0;
        let flows: Vec<_> = set
            .flows(|id| Some(if id == 2 { 5 } else { 7 }))
            .into_iter()
            .map(|(k, s)| (k.src, s.backend, s.last_seen))
            .collect();
        assert_eq!(
            flows,
            [(1, 2, 41), (3, 2, 43)],
            "stale and free ways left out"
        );
    }
}
