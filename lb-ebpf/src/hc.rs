//! Health-check forwarding: a probe the daemon addresses to a VIP (`--hc-target vip`) carries a
//! socket mark naming one backend; on the way out this sends it to that backend's MAC, as the
//! balancer would send a client's packet, so the check proves that backend serves the VIP.

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use lb_common::{HC_MARK_TAG, HC_MARK_TAG_MASK};

use crate::maps::BACKENDS;

#[inline(always)]
pub fn steer(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the context the kernel passed in.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & HC_MARK_TAG_MASK != HC_MARK_TAG {
        return TC_ACT_OK;
    }
    if let Some(backend) = BACKENDS.get(mark & !HC_MARK_TAG_MASK)
        && backend.mac != [0; 6]
    {
        // A failed store leaves the packet to its fake neighbour: the probe times out, which
        // is the right answer for a backend that cannot be reached.
        let _ = ctx.store(0, &backend.mac, 0);
    }
    TC_ACT_OK
}
