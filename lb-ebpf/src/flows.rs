//! The connection table of the dsr, ipip and gue modes: a set-associative table in an array map
//! (`lb_common::flow_table` says why, and how torn entries are caught). A flow's set is the low
//! bits of its table hash (`SlotKey::table_hash`, `slot` below); its way is the one that holds
//! its client and whose backend's service is its own.

use aya_ebpf::maps::Array;
use lb_common::{
    BACKEND_F_ALIVE, Backend, FLOW_STATE_CLOSED, FLOW_WAYS, FlowKeyV4, FlowKeyV6, FlowSet,
    FlowSlot, flow_set,
    flow_table::{SlotKey, flow_holds},
};

use crate::{
    maps::{BACKENDS, FLOWS, FLOWS_V6, SERVICE_VIPS},
    select::{self, FlowKey},
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
        &FLOWS
    }
}

impl Tracked for FlowKeyV6 {
    #[inline(always)]
    fn table() -> &'static Array<FlowSet<Self>> {
        &FLOWS_V6
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

/// The way of `set` that holds `flow` (of table hash `slot`): its index, backend id and
/// backend. Ways of the flow's client are candidates; one holds the flow if its seal is sound
/// for its backend's generation and that backend's service is the flow's (a client may have
/// flows to several services in one set).
#[inline(always)]
fn held<K: Tracked>(
    set: &FlowSet<K>,
    flow: &K,
    slot: u32,
) -> Option<(usize, u32, &'static Backend)> {
    let mut i = 0;
    while i < FLOW_WAYS {
        let way = &set.ways[i];
        if way.has_client(flow) {
            // Read once: the seal is checked against exactly the id used.
            let (id, seal) = (way.backend(), way.seal);
            if let Some(backend) = BACKENDS.get(id)
                && let Some(vip) = SERVICE_VIPS.get(backend.service)
                && flow_holds(flow, slot, id, seal, backend.generation, vip)
            {
                return Some((i, id, backend));
            }
        }
        i += 1;
    }
    None
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
    let (i, id, backend) = held(set, flow, slot)?;
    Some(Entry {
        way: &mut set.ways[i % FLOW_WAYS],
        id,
        backend,
    })
}

/// An established flow's backend: found, still alive (draining keeps it), and the entry's
/// last-seen tick and TCP state kept current (one write at most, once a tick or when TCP
/// closes or reopens the flow).
#[inline(always)]
pub fn established<K: Tracked>(flow: &K, slot: u32, tcp_flags: u8, now: u32) -> Option<Entry<K>> {
    let entry = find(flow, slot)?;
    if entry.backend.flags & BACKEND_F_ALIVE == 0 {
        return None;
    }
    let old = entry.way.state;
    let closed = select::closed_after(old & FLOW_STATE_CLOSED != 0, entry.id, tcp_flags);
    let state = entry.way.state_at(now, closed);
    if state != old {
        entry.way.state = state;
    }
    Some(entry)
}

/// Enters `flow` (of table hash `slot`) on backend `id` of generation `generation`, closed or not,
/// in the way its set gives it (`FlowSet::vacancy_for`: the way that already holds the flow,
/// else the most vacant). Always succeeds: a full set gives up its stalest flow, whose next
/// packet is placed again.
#[inline(always)]
pub fn insert<K: Tracked>(flow: &K, slot: u32, id: u32, generation: u32, now: u32, closed: bool) {
    if let Some(set) = set_of::<K>(slot) {
        let own = held(set, flow, slot).map(|(i, _, _)| i);
        let way = set.vacancy_for(own, now) % FLOW_WAYS;
        set.ways[way].fill(flow, slot, id, generation, now, closed);
    }
}
