//! The connection table of the dsr, ipip and gue modes: a set-associative table in an array map
//! (`lb_common::flow_table` says why, and how torn entries are caught). A flow's set is the low
//! bits of its table hash (`SlotKey::table_hash`, `slot` below); its way is the one whose key
//! matches.

use aya_ebpf::maps::Array;
use lb_common::{
    BACKEND_F_ALIVE, Backend, FLOW_WAYS, FlowKeyV4, FlowKeyV6, FlowSet, FlowSlot, flow_seal,
    flow_set, flow_table::SlotKey,
};

use crate::{
    maps::{BACKENDS, FLOW_TABLE, FLOW_TABLE_V6},
    select::FlowKey,
};

/// Sets per table (a power of two), set by the loader. A read-only global: the verifier sees
/// the value, so a set index is bounded without a check.
#[unsafe(no_mangle)]
static LB_FLOW_SETS: u32 = 1;

/// A family's connection table.
pub trait Tracked: FlowKey + SlotKey + 'static {
    fn table() -> &'static Array<FlowSet<Self>>;
}

impl Tracked for FlowKeyV4 {
    #[inline(always)]
    fn table() -> &'static Array<FlowSet<Self>> {
        &FLOW_TABLE
    }
}

impl Tracked for FlowKeyV6 {
    #[inline(always)]
    fn table() -> &'static Array<FlowSet<Self>> {
        &FLOW_TABLE_V6
    }
}

/// The set a flow of table hash `slot` lives in.
#[inline(always)]
fn set_of<K: Tracked>(slot: u32) -> Option<&'static mut FlowSet<K>> {
    // SAFETY: a read of a plain u32 global.
    let sets = unsafe { core::ptr::read_volatile(&LB_FLOW_SETS) };
    let set = K::table().get_ptr_mut(flow_set(slot, sets))?;
    // SAFETY: a pointer into the map's value, valid for this run of the program. Other CPUs
    // may write the same set: every way read is checked against its seal.
    Some(unsafe { &mut *set })
}

/// A flow's entry: its way, and the backend it names (the seal checked against that backend's
/// generation: the entry is this flow's and was made for the backend's current holder).
pub struct Entry<K: SlotKey + 'static> {
    pub way: &'static mut FlowSlot<K>,
    pub id: u32,
    pub backend: &'static Backend,
}

/// The entry of `flow` (of table hash `slot`), if the table has a sound one.
#[inline(always)]
pub fn find<K: Tracked>(flow: &K, slot: u32) -> Option<Entry<K>> {
    let set = set_of::<K>(slot)?;
    let way = &mut set.ways[set.position(flow)? % FLOW_WAYS];
    // Read once: the seal is checked against exactly the id used.
    let (id, seal) = (way.backend, way.seal);
    let backend = BACKENDS.get(id)?;
    if seal != flow_seal(slot, id, backend.generation) {
        return None;
    }
    Some(Entry { way, id, backend })
}

/// An established flow's backend: found, still alive (draining keeps it), and the entry's
/// last-seen tick and TCP state kept current.
#[inline(always)]
pub fn established<K: Tracked>(flow: &K, slot: u32, tcp_flags: u8, now: u32) -> Option<Entry<K>> {
    let entry = find(flow, slot)?;
    if entry.backend.flags & BACKEND_F_ALIVE == 0 {
        return None;
    }
    crate::select::track(
        &mut entry.way.last_seen,
        &mut entry.way.flags,
        entry.id,
        tcp_flags,
        now,
    );
    Some(entry)
}

/// Enters `flow` (of table hash `slot`) on backend `id` of generation `generation`, closed or not,
/// in the way its set gives it (`FlowSet::vacancy_for`). Always succeeds: a full set gives up
/// its stalest flow, whose next packet is placed again.
#[inline(always)]
pub fn insert<K: Tracked>(flow: &K, slot: u32, id: u32, generation: u32, now: u32, closed: bool) {
    if let Some(set) = set_of::<K>(slot) {
        let way = set.vacancy_for(flow, now) % FLOW_WAYS;
        set.ways[way].fill(flow, slot, id, generation, now, closed);
    }
}
