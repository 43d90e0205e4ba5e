//! Backend selection: the connection table first, so an established flow keeps its backend
//! whatever happens to the others; Maglev for new flows and for flows whose backend is gone.

use lb_common::{
    BACKEND_F_ALIVE, BACKEND_NONE, FlowKeyV4, FlowState, RING_CHUNK, RING_CHUNKS, RING_SIZE,
    Reason, Service, hash::flow_hash_v4,
};

use crate::maps::{BACKENDS, CONNTRACK, RINGS};

/// The chosen backend: its id (for counters) and its MAC (all DSR needs). Only these are
/// copied out of the map, not the whole entry.
pub struct Chosen {
    pub id: u32,
    pub mac: [u8; 6],
}

#[inline(always)]
pub fn backend_for(service: &Service, flow: &FlowKeyV4) -> Result<Chosen, Reason> {
    // SAFETY: FlowState is copied out at once.
    if let Some(state) = unsafe { CONNTRACK.get(flow) }.copied()
        && let Some(backend) = BACKENDS.get(state.backend)
        && backend.flags & BACKEND_F_ALIVE != 0
        && backend.generation == state.generation
    {
        return Ok(Chosen {
            id: state.backend,
            mac: backend.mac,
        });
    }

    let hash = flow_hash_v4(flow.src, flow.dst, flow.sport, flow.dport, flow.proto);
    let entry = hash % RING_SIZE;
    let chunk = RINGS
        .get(service.ring * RING_CHUNKS + entry / RING_CHUNK)
        .ok_or(Reason::DropInternal)?;
    let id = chunk.ids[(entry % RING_CHUNK) as usize];
    if id == BACKEND_NONE {
        return Err(Reason::DropNoBackend);
    }
    let backend = BACKENDS.get(id).ok_or(Reason::DropInternal)?;
    if backend.flags & BACKEND_F_ALIVE == 0 {
        // The table is being replaced because this backend just went away.
        return Err(Reason::DropNoBackend);
    }
    let state = FlowState {
        backend: id,
        generation: backend.generation,
    };
    // A failed insert only costs a Maglev lookup on the next packet, so it is not an error.
    let _ = CONNTRACK.insert(flow, state, 0);
    Ok(Chosen {
        id,
        mac: backend.mac,
    })
}
