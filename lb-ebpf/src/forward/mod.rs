//! One module per forwarding mode, and the routing they share.
pub mod dsr;
pub mod encap;
pub mod fragment;
pub mod icmp;
pub mod nat;
pub mod route;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FORWARD_DSR, FORWARD_GUE, FORWARD_IPIP, Reason};
use route::Sent;

use crate::maps::BACKENDS;

/// The packet a forwarding mode carries: where its IP header starts (after the Ethernet header
/// and an optional VLAN tag) and its family.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Inner {
    pub l3: usize,
    pub v6: bool,
}

/// Sends the packet to backend `id` by the service's mode `forward` (dsr, ipip or gue; callers
/// leave other modes out), counted as `reason`. `hash` seeds the encapsulation's outer
/// source and GUE port; `reply` allows an ICMP "too big" answer to the sender (never for a
/// packet that is itself an ICMP error). For packets that were not placed by `backend_for`
/// (ICMP errors, fragments): the main path has its own DSR arm.
#[inline(always)]
pub fn to_backend(
    ctx: &XdpContext,
    forward: u8,
    id: u32,
    inner: Inner,
    hash: u32,
    reason: Reason,
    reply: bool,
) -> Result<Sent, Reason> {
    match forward {
        FORWARD_DSR => {
            let mac = BACKENDS.get(id).ok_or(Reason::DropInternal)?.mac;
            dsr::rewrite(ctx, &mac)?;
            Ok(Sent {
                reason,
                action: xdp_action::XDP_TX,
            })
        }
        FORWARD_IPIP | FORWARD_GUE => {
            let e = encap::Encap {
                inner,
                id,
                hash,
                gue: forward == FORWARD_GUE,
                reply,
                reason,
            };
            encap::send(ctx, &e)
        }
        _ => Err(Reason::DropInternal),
    }
}
