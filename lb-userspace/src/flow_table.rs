//! The connection tables as userspace sees them (`lb_common::flow_table`): read through their
//! mapping for `lb status`, the flow recount and tests, and written when the flows of an older
//! build's LRU table are carried over. The set and way choices are lb-common's, the same code
//! the XDP program runs.

use lb_common::{FlowSet, FlowState, flow_seal, flow_set, flow_table::SlotKey};

use crate::mapped::MapMemory;

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

    /// `key`'s entry, if the table has a sound one for the current holder of its backend id
    /// (`generation_of` gives an id's generation, `None` for an unknown id).
    pub fn find(
        &self,
        key: &K,
        generation_of: impl FnMut(u32) -> Option<u32>,
    ) -> Option<FlowState> {
        let set = self.set(self.set_index(key));
        let way = &set.ways[set.position(key)?];
        sound(key, way, generation_of)
    }

    /// Every sound entry (`find`'s test), set by set.
    pub fn entries(
        &self,
        mut generation_of: impl FnMut(u32) -> Option<u32>,
    ) -> Vec<(K, FlowState)> {
        let mut out = Vec::new();
        for i in 0..self.store.sets() {
            let set = self.store.get(i);
            for way in &set.ways {
                if way.seal != 0
                    && let Some(state) = sound(&way.key, way, &mut generation_of)
                {
                    out.push((way.key, state));
                }
            }
        }
        out
    }

    /// Enters `key` on backend `id` of generation `generation` in the way the program would
    /// give it at tick `now`. Not atomic with the program's own writes to the set: for a data
    /// plane not yet forwarding into this table, or tests.
    pub fn insert(&mut self, key: &K, id: u32, generation: u32, now: u32, closed: bool) {
        let index = self.set_index(key);
        let mut set = self.store.get(index);
        let way = set.vacancy_for(key, now);
        set.ways[way].fill(key, key.table_hash(), id, generation, now, closed);
        self.store.put(index, set);
    }
}

/// The state of `way` (holding `key`), if its seal matches the current generation of its
/// backend.
fn sound<K: SlotKey>(
    key: &K,
    way: &lb_common::FlowSlot<K>,
    mut generation_of: impl FnMut(u32) -> Option<u32>,
) -> Option<FlowState> {
    let generation = generation_of(way.backend)?;
    (way.seal == flow_seal(key.table_hash(), way.backend, generation)).then_some(FlowState {
        backend: way.backend,
        generation,
        last_seen: way.last_seen,
        flags: way.flags,
        nat_port: 0,
    })
}

/// Of `flows` distinct flows entered one after the other (each seen once, the oldest first)
/// into a table with room for `capacity`, the share still in the table at the end: what
/// collisions in full sets cost against a table that evicts nothing before it is full
/// (`docs/PERFORMANCE.md`). Flows are spread by the real flow hash over random 5-tuples.
pub fn retention(capacity: u32, flows: u32, seed: u64) -> f64 {
    use lb_common::{FLOW_WAYS, FlowKeyV4, FlowSlot};
    let sets = lb_common::flow_sets(capacity) as usize;
    let mut table: FlowTable<FlowKeyV4, _> = FlowTable::new(vec![
        FlowSet {
            ways: [FlowSlot::default(); FLOW_WAYS]
        };
        sets
    ]);
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
                dst: 0x0100_c80a,
                sport: (r >> 32) as u16,
                dport: 80u16.to_be(),
                proto: 6,
                ..Default::default()
            }
        })
        .collect();
    for (tick, key) in keys.iter().enumerate() {
        table.insert(key, 1, 1, tick as u32, false);
    }
    let kept = keys
        .iter()
        .filter(|k| table.find(k, |_| Some(1)).is_some())
        .count();
    kept as f64 / f64::from(flows)
}

#[cfg(test)]
mod tests {
    use lb_common::{FLOW_WAYS, FlowKeyV4, FlowSetV4, FlowSlot};

    use super::*;

    fn table(sets: usize) -> FlowTable<FlowKeyV4, Vec<FlowSetV4>> {
        FlowTable::new(vec![
            FlowSet {
                ways: [FlowSlot::default(); FLOW_WAYS]
            };
            sets
        ])
    }

    fn key(n: u32) -> FlowKeyV4 {
        FlowKeyV4 {
            src: n,
            dst: 9,
            sport: 1,
            dport: 80,
            proto: 6,
            ..Default::default()
        }
    }

    #[test]
    fn an_entry_is_found_only_for_its_backends_generation() {
        let mut t = table(16);
        t.insert(&key(1), 3, 7, 100, false);
        let found = t.find(&key(1), |id| (id == 3).then_some(7));
        assert_eq!(
            found.map(|s| (s.backend, s.generation, s.last_seen)),
            Some((3, 7, 100))
        );
        assert_eq!(
            t.find(&key(1), |_| Some(8)),
            None,
            "the id went to a new backend"
        );
        assert_eq!(t.find(&key(1), |_| None), None, "the id is gone");
        assert_eq!(t.find(&key(2), |_| Some(7)), None);
    }

    #[test]
    fn a_torn_entry_is_not_found() {
        let mut t = table(16);
        t.insert(&key(1), 3, 7, 100, false);
        let i = t.set_index(&key(1));
        let mut set = t.set(i);
        let way = set.position(&key(1)).unwrap();
        // Another flow's backend written over this one's, the seal not yet.
        set.ways[way].backend = 4;
        t.put_set(i, set);
        assert_eq!(t.find(&key(1), |_| Some(7)), None);
        assert!(t.entries(|_| Some(7)).is_empty());
    }

    #[test]
    fn entries_lists_every_sound_flow_once() {
        // Room for 4096: no set of four overflows.
        let mut t = table(1024);
        for n in 0..100 {
            t.insert(&key(n), n % 5, 1, n, n % 2 == 0);
        }
        // Placed again on another backend: still one entry.
        t.insert(&key(7), 4, 1, 200, false);
        let mut entries = t.entries(|_| Some(1));
        entries.sort_by_key(|(k, _)| k.src);
        assert_eq!(entries.len(), 100);
        let seven = entries.iter().find(|(k, _)| k.src == 7).unwrap().1;
        assert_eq!((seven.backend, seven.last_seen, seven.flags), (4, 200, 0));
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
}
