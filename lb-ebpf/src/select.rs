//! Backend selection: the connection table first, so an established flow keeps its backend
//! whatever happens to the others; the service's scheduler for new flows and for flows whose
//! backend is gone.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::maps::HashMap;
use lb_common::{
    BACKEND_F_ALIVE, BACKEND_NONE, FLOW_F_CLOSED, FlowKeyV4, FlowKeyV6, FlowState, LC_MAX_BACKENDS,
    RING_CHUNK, RING_CHUNKS, RING_SIZE, Reason, SCHED_LEAST_CONN, SCHED_ROUND_ROBIN,
    SCHED_SOURCE_HASH, Service,
    flow_table::SlotKey,
    hash::{source_hash, vip_filter_bit, vip_filter_bit_v6},
};

use crate::{
    flows::{self, Tracked},
    maps::{BACKENDS, CLOCK, CONFIG, FLOW_COUNTS, LC_LISTS, RINGS, RR_CURSORS, SYN_WINDOW},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// The chosen backend: its id (for counters) and its MAC (all DSR needs). Only these are
/// copied out of the map, not the whole entry (the routed modes look the id up again; a
/// reference to the entry kept in the `Result` was split by LLVM into 32-bit halves the
/// verifier refuses).
pub struct Chosen {
    pub id: u32,
    pub mac: [u8; 6],
    /// The backend's service and its forwarding mode.
    pub service: u32,
    pub forward: u8,
    /// The flow was placed on this backend by this packet (not found in the connection table).
    pub placed: bool,
    /// A SYN the SYN-flood guard sent on without a connection-table entry.
    pub untracked: bool,
    /// fullnat: the flow's SNAT port, network order (0 otherwise).
    pub nat_port: u16,
}

/// A connection-table key: the 5-tuple of one address family (its flow hash and comparison
/// come with `SlotKey`).
pub trait FlowKey: SlotKey {
    /// The hash of the client address alone (source-hash scheduling).
    fn source_hash(&self) -> u32;
    /// The VIP filter bit of the flow's service key (destination, port, protocol).
    fn vip_filter_bit(&self) -> u32;
}

impl FlowKey for FlowKeyV4 {
    #[inline(always)]
    fn source_hash(&self) -> u32 {
        source_hash(&[self.src])
    }
    #[inline(always)]
    fn vip_filter_bit(&self) -> u32 {
        vip_filter_bit(self.dst, self.dport, self.proto)
    }
}

impl FlowKey for FlowKeyV6 {
    #[inline(always)]
    fn source_hash(&self) -> u32 {
        source_hash(&self.src)
    }
    #[inline(always)]
    fn vip_filter_bit(&self) -> u32 {
        vip_filter_bit_v6(&self.dst, self.dport, self.proto)
    }
}

/// A backend for a flow the connection table does not place (`flows::established` said
/// `None`): the service's scheduler picks it and, with `track`, the flow is entered in the
/// connection table. `slot`: the flow's table hash.
#[inline(always)]
pub fn place_new<K: Tracked>(
    service: &Service,
    pkt: &Packet<K>,
    slot: u32,
    now: u32,
    track: bool,
) -> Result<Chosen, Reason> {
    let id = schedule(service, pkt)?;
    let backend = BACKENDS.get(id).ok_or(Reason::DropInternal)?;
    if backend.flags & BACKEND_F_ALIVE == 0 {
        // The table is being replaced because this backend just went away.
        return Err(Reason::DropNoBackend);
    }
    if track {
        let closed = closes(pkt.tcp_flags);
        flows::insert(&pkt.flow, slot, id, backend.generation, now, closed);
        if !closed {
            add_flows(id, 1);
        }
    }
    Ok(Chosen {
        id,
        mac: backend.mac,
        service: service.id,
        forward: service.forward,
        placed: track,
        untracked: !track,
        nat_port: 0,
    })
}

/// A packet with FIN or RST: the flow is closed.
#[inline(always)]
fn closes(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// The SYN-flood guard (`DataplaneConfig::syn_guard`): whether this CPU may enter one more
/// SYN in the connection table in the clock tick `now`.
#[inline(always)]
pub fn syn_guard_admits(now: u32) -> bool {
    let limit = CONFIG.get(0).map_or(0, |c| c.syn_guard);
    if limit == 0 {
        return true;
    }
    let Some(window) = SYN_WINDOW.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's value; nothing else writes it while the program runs.
    let window = unsafe { &mut *window };
    if window.tick != now {
        window.tick = now;
        window.syns = 0;
    }
    if window.syns >= limit {
        return false;
    }
    window.syns += 1;
    true
}

/// The backend at `hash` in the service's table, if alive; no connection table (fragments:
/// `hash` is the client's source hash).
#[inline(always)]
pub fn by_hash(service: &Service, hash: u32) -> Result<u32, Reason> {
    let id = ring_entry(service, hash)?;
    if id == BACKEND_NONE {
        return Err(Reason::DropNoBackend);
    }
    let backend = BACKENDS.get(id).ok_or(Reason::DropInternal)?;
    if backend.flags & BACKEND_F_ALIVE == 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok(id)
}

/// The current tick (`FLOW_TICK_SHIFT`), as the daemon last wrote it.
#[inline(always)]
pub fn clock() -> u32 {
    CLOCK.get(0).copied().unwrap_or(0)
}

/// A nat/fullnat flow's backend from the NAT flow map, if it is still alive and the same
/// backend (generation) the flow was placed on; the entry's last-seen tick and TCP state are
/// updated.
#[inline(always)]
pub fn nat_established<K: FlowKey>(
    pkt: &Packet<K>,
    flows: &HashMap<K, FlowState>,
    now: u32,
) -> Option<Chosen> {
    let state = flows.get_ptr_mut(pkt.flow)?;
    // SAFETY: a pointer into the map's value, valid for this run of the program.
    let state = unsafe { &mut *state };
    let backend = BACKENDS.get(state.backend)?;
    if backend.flags & BACKEND_F_ALIVE == 0 || backend.generation != state.generation {
        return None;
    }
    // Written at most once a tick, and when TCP closes or reopens the flow.
    if state.last_seen != now {
        state.last_seen = now;
    }
    let closed = state.flags & FLOW_F_CLOSED != 0;
    if closed_after(closed, state.backend, pkt.tcp_flags) != closed {
        state.flags ^= FLOW_F_CLOSED;
    }
    Some(Chosen {
        id: state.backend,
        mac: backend.mac,
        service: backend.service,
        forward: backend.forward,
        placed: false,
        untracked: false,
        nat_port: state.nat_port,
    })
}

/// Whether the scheduler places a TCP SYN without looking for its flow first: the hashing
/// ones (Maglev, source hash), which place a retransmitted SYN where the first went.
#[inline(always)]
pub fn trusts_syn(scheduler: u8) -> bool {
    scheduler != SCHED_LEAST_CONN && scheduler != SCHED_ROUND_ROBIN
}

/// A new flow's backend id by the service's scheduler (not yet checked for being alive).
#[inline(always)]
pub fn schedule<K: FlowKey>(service: &Service, pkt: &Packet<K>) -> Result<u32, Reason> {
    let hash = match service.scheduler {
        SCHED_LEAST_CONN | SCHED_ROUND_ROBIN => 0,
        SCHED_SOURCE_HASH => pkt.flow.source_hash(),
        _ => pkt.flow.flow_hash(),
    };
    pick(service, hash)
}

/// `schedule_hashed` through the global function `lb_pick`.
#[inline(always)]
pub fn pick(service: &Service, hash: u32) -> Result<u32, Reason> {
    let picked = lb_pick(service.id, service.ring, u32::from(service.scheduler), hash);
    match u32::try_from(picked) {
        Ok(id) => Ok(id),
        _ if picked == PICK_NO_BACKEND => Err(Reason::DropNoBackend),
        _ => Err(Reason::DropInternal),
    }
}

const PICK_NO_BACKEND: i64 = -1;
const PICK_INTERNAL: i64 = -2;

/// The scheduler as a global BPF function: the verifier checks it once, on its own, instead of
/// again for every state of the balancer that reaches it (the least-connections loop, verified
/// in each such state, took the balancer past the verifier's budget of 1M instructions).
/// Arguments are plain scalars, as a global function needs. Returns the backend id, or
/// `PICK_*`. Called on new flows only.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_pick(id: u32, ring: u32, scheduler: u32, hash: u32) -> i64 {
    let service = Service {
        id,
        ring,
        forward: 0,
        scheduler: scheduler as u8,
        flags: 0,
        _pad: 0,
    };
    match schedule_hashed(&service, hash) {
        Ok(id) => i64::from(id),
        Err(Reason::DropNoBackend) => PICK_NO_BACKEND,
        Err(_) => PICK_INTERNAL,
    }
}

/// `schedule` with the flow's hash for the scheduler computed by the caller (the source hash
/// for source-hash scheduling, the 5-tuple's otherwise; unused by the others).
#[inline(always)]
pub fn schedule_hashed(service: &Service, hash: u32) -> Result<u32, Reason> {
    let id = match service.scheduler {
        SCHED_LEAST_CONN => least_loaded(service)?,
        SCHED_ROUND_ROBIN => ring_entry(service, next_turn(service.id))?,
        _ => ring_entry(service, hash)?,
    };
    if id == BACKEND_NONE {
        return Err(Reason::DropNoBackend);
    }
    Ok(id)
}

/// Records a new nat/fullnat flow on backend `id` in the NAT flow map and counts it as active
/// (unless its first packet already closes it). Fails when the map refuses the entry.
#[inline(always)]
pub fn nat_place<K: FlowKey>(
    flows: &HashMap<K, FlowState>,
    pkt: &Packet<K>,
    id: u32,
    generation: u32,
    now: u32,
    nat_port: u16,
) -> Result<(), i32> {
    let closed = closes(pkt.tcp_flags);
    let state = FlowState {
        backend: id,
        generation,
        last_seen: now,
        flags: if closed { FLOW_F_CLOSED } else { 0 },
        nat_port,
    };
    flows.insert(pkt.flow, state, 0)?;
    if !closed {
        add_flows(id, 1);
    }
    Ok(())
}

/// Whether a flow of backend `id` is closed after a packet with `tcp_flags` (`closed`: before
/// it): a FIN or RST closes it, a SYN opens the same 5-tuple again, and the backend's count of
/// active flows follows.
#[inline(always)]
pub fn closed_after(closed: bool, id: u32, tcp_flags: u8) -> bool {
    if !closed && closes(tcp_flags) {
        add_flows(id, -1);
        true
    } else if closed && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        add_flows(id, 1);
        false
    } else {
        closed
    }
}

#[inline(always)]
fn add_flows(id: u32, delta: i64) {
    if let Some(count) = FLOW_COUNTS.get_ptr_mut(id) {
        // SAFETY: an aligned i64 in the map's value, shared by CPUs: updated atomically (the
        // BPF target has no `AtomicI64::fetch_add`, but LLVM lowers this to BPF's atomic add).
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(count, delta) };
    }
}

/// The backend id at `hash` in the service's live table.
#[inline(always)]
fn ring_entry(service: &Service, hash: u32) -> Result<u32, Reason> {
    let entry = hash % RING_SIZE;
    let chunk = RINGS
        .get(service.ring * RING_CHUNKS + entry / RING_CHUNK)
        .ok_or(Reason::DropInternal)?;
    Ok(chunk.ids[(entry % RING_CHUNK) as usize])
}

/// This CPU's next position in the service's round-robin sequence.
#[inline(always)]
fn next_turn(service_id: u32) -> u32 {
    match RR_CURSORS.get_ptr_mut(service_id) {
        Some(cursor) => {
            // SAFETY: per-CPU slot; only this CPU writes it.
            let turn = unsafe { *cursor };
            unsafe { *cursor = if turn + 1 >= RING_SIZE { 0 } else { turn + 1 } };
            turn
        }
        None => 0,
    }
}

/// The candidate with the fewest active flows per unit of weight (first one on ties).
#[inline(always)]
fn least_loaded(service: &Service) -> Result<u32, Reason> {
    let list = LC_LISTS.get(service.ring).ok_or(Reason::DropInternal)?;
    // "Nothing chosen yet" is a ratio every candidate beats (1 / 0), not a test of `best`:
    // comparing `best` with a constant made the verifier tell apart the states of every
    // iteration where it was still unset, and this loop cost most of the program's
    // verification.
    let mut best = BACKEND_NONE;
    let (mut best_flows, mut best_weight) = (1i64, 0i64);
    for i in 0..LC_MAX_BACKENDS as usize {
        if i as u32 >= list.len {
            break;
        }
        let id = list.ids[i];
        let weight = list.weights[i] as i64;
        // Every listed id has a count (the daemon lists only its backends).
        let flows = (*FLOW_COUNTS.get(id).ok_or(Reason::DropInternal)?).max(0);
        // flows / weight < best_flows / best_weight, without division.
        if flows * best_weight < best_flows * weight {
            best = id;
            best_flows = flows;
            best_weight = weight;
        }
    }
    Ok(best)
}
