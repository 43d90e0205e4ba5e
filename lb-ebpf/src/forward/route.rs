//! The next hop of a packet the balancer rewrote (encapsulated to a backend, or translated by
//! NAT), from the kernel's routing and neighbour tables (`bpf_fib_lookup`), and how it leaves:
//! XDP_TX through the interface it came in on, XDP_REDIRECT through another interface the
//! balancer is attached to (`TX_PORTS`), or XDP_PASS to the kernel when the next hop is not
//! resolved yet (the kernel forwards it and resolves the neighbour for the packets after it).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{AF_INET, AF_INET6, Reason};
use network_types::eth::EthHdr;

use crate::{
    maps::{FIB_SCRATCH, ROUTE_CACHE, TX_PORTS},
    parse::ptr_at_mut,
    select::clock,
};

/// `BPF_FIB_LKUP_RET_*` results we act on (linux/bpf.h).
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;

/// Where a rewritten packet goes.
#[derive(Clone, Copy)]
pub enum Route {
    /// Out of `ifindex`, from `smac` to `dmac` (the next hop's MAC).
    Via {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// The next hop's MAC is not known: the kernel forwards the packet.
    Kernel,
    /// Longer than the egress MTU (`mtu`, of the whole IP packet).
    TooBig {
        #[allow(dead_code, reason = "for ICMP too-big answers; nat drops such packets")]
        mtu: u16,
    },
}

/// What the program did with a packet it handled: the counter and the XDP action.
pub struct Sent {
    pub reason: Reason,
    pub action: u32,
}

/// The route to an IPv4 destination for a packet of `tot_len` bytes (IP header included).
#[inline(always)]
pub fn lookup_v4(ctx: &XdpContext, src: u32, dst: u32, tot_len: u16) -> Result<Route, Reason> {
    let key = [dst, 0, 0, 0];
    let slot = slot(AF_INET, &key);
    if let Some(route) = cached(ctx, slot, AF_INET, &key, tot_len) {
        return Ok(route);
    }
    let p = params(ctx, AF_INET, tot_len)?;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    let route = lookup(ctx, p)?;
    remember(ctx, slot, AF_INET, &key, &route, p, tot_len);
    Ok(route)
}

/// The route to an IPv6 destination for a packet of `tot_len` bytes (fixed header included).
#[inline(always)]
pub fn lookup_v6(
    ctx: &XdpContext,
    src: &[u32; 4],
    dst: &[u32; 4],
    tot_len: u16,
) -> Result<Route, Reason> {
    let slot = slot(AF_INET6, dst);
    if let Some(route) = cached(ctx, slot, AF_INET6, dst, tot_len) {
        return Ok(route);
    }
    let p = params(ctx, AF_INET6, tot_len)?;
    p.__bindgen_anon_3.ipv6_src = *src;
    p.__bindgen_anon_4.ipv6_dst = *dst;
    let route = lookup(ctx, p)?;
    remember(ctx, slot, AF_INET6, dst, &route, p, tot_len);
    Ok(route)
}

/// Slots of `ROUTE_CACHE` (a power of two).
pub const ROUTE_CACHE_SLOTS: u32 = 256;

/// A resolved next hop, remembered for the clock tick (about a second, `FLOW_TICK_SHIFT`) it
/// was looked up in. The FIB lookup was most of the routed modes' cost per packet (190 ns of
/// 520 for ipip 4in4, 310 of 670 for 4in6), and a balancer sends most packets to few
/// destinations (its backends, its router). Only complete answers are kept: a missing
/// neighbour or no route is asked again on the next packet. A change of route or neighbour
/// therefore takes effect within a tick. The source address is not part of the key: routes
/// that depend on the source (policy rules, multipath hashing over it) are followed per
/// destination, not per packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CachedRoute {
    /// Destination, IPv4 in the first word; with `family` the key.
    dst: [u32; 4],
    /// The interface the packets came in on: the lookup was an input lookup from it.
    iif: u32,
    /// The tick of the lookup + 1 (0: empty).
    tick: u32,
    ifindex: u32,
    /// The route's MTU (of the whole IP packet).
    mtu: u16,
    family: u8,
    _pad: u8,
    smac: [u8; 6],
    dmac: [u8; 6],
}

#[inline(always)]
fn slot(family: u8, dst: &[u32; 4]) -> u32 {
    let folded = dst[0] ^ dst[1] ^ dst[2] ^ dst[3] ^ u32::from(family);
    folded.wrapping_mul(0x9e37_79b1) >> (32 - ROUTE_CACHE_SLOTS.trailing_zeros())
}

/// The route from this CPU's cache, if it holds one for `dst` from this tick.
#[inline(always)]
fn cached(ctx: &XdpContext, slot: u32, family: u8, dst: &[u32; 4], tot_len: u16) -> Option<Route> {
    let c = ROUTE_CACHE.get_ptr(slot)?;
    // SAFETY: a pointer to this CPU's value, valid for this run of the program.
    let c = unsafe { &*c };
    if c.tick != clock().wrapping_add(1)
        || c.dst != *dst
        || c.family != family
        || c.iif != ingress(ctx)
    {
        return None;
    }
    if tot_len > c.mtu {
        return Some(Route::TooBig { mtu: c.mtu });
    }
    Some(Route::Via {
        ifindex: c.ifindex,
        smac: c.smac,
        dmac: c.dmac,
    })
}

/// Keeps a complete answer of the FIB in this CPU's cache.
#[inline(always)]
fn remember(
    ctx: &XdpContext,
    slot: u32,
    family: u8,
    dst: &[u32; 4],
    route: &Route,
    p: &FibParams,
    tot_len: u16,
) {
    let Route::Via {
        ifindex,
        smac,
        dmac,
    } = *route
    else {
        return;
    };
    // SAFETY: after a successful lookup the kernel (5.12 and later) left the route's MTU in
    // the union that held tot_len.
    let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    if mtu < tot_len {
        return;
    }
    let Some(c) = ROUTE_CACHE.get_ptr_mut(slot) else {
        return;
    };
    // SAFETY: a pointer to this CPU's value, used by nothing else while the program runs.
    unsafe {
        *c = CachedRoute {
            dst: *dst,
            iif: ingress(ctx),
            tick: clock().wrapping_add(1),
            ifindex,
            mtu,
            family,
            _pad: 0,
            smac,
            dmac,
        };
    }
}

/// This CPU's parameter block, cleared and filled with what every lookup sets. In a per-CPU
/// map rather than on the stack: its 64 bytes in each caller's frame pushed the program's
/// call chain past the verifier's 512-byte stack.
#[inline(always)]
fn params(ctx: &XdpContext, family: u8, tot_len: u16) -> Result<&'static mut FibParams, Reason> {
    let p = FIB_SCRATCH.get_ptr_mut(0).ok_or(Reason::DropInternal)?;
    // SAFETY: this CPU's scratch value, used by nothing else while the program runs;
    // FibParams is plain old data, all-zero a valid (empty) request.
    let p = unsafe {
        core::ptr::write_bytes(p, 0, 1);
        &mut *p
    };
    p.family = family;
    p.ifindex = ingress(ctx);
    p.__bindgen_anon_1.tot_len = tot_len;
    Ok(p)
}

#[inline(always)]
fn lookup(ctx: &XdpContext, p: &mut FibParams) -> Result<Route, Reason> {
    // Flags 0: an input lookup from the ingress interface, as the kernel would route the
    // packet (policy rules included); it needs forwarding enabled on that interface.
    // SAFETY: ctx.ctx is the program's context; p is a valid parameter block of its size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            core::ptr::from_mut(p),
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        FIB_SUCCESS => Ok(Route::Via {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        FIB_NO_NEIGH => Ok(Route::Kernel),
        // SAFETY: the kernel wrote mtu_result for this result.
        FIB_FRAG_NEEDED => Ok(Route::TooBig {
            mtu: unsafe { p.__bindgen_anon_1.mtu_result },
        }),
        // Blackhole, unreachable, prohibited, not forwarded (local), forwarding disabled, or
        // a helper error.
        _ => Err(Reason::DropNoRoute),
    }
}

/// Sends the frame (Ethernet header at offset 0) along `route`, counted as `reason`. For
/// `Route::Kernel` the frame must still carry this host's MAC as its destination (callers
/// leave the received destination MAC in place), so the stack accepts it.
#[inline(always)]
pub fn send(ctx: &XdpContext, route: Route, reason: Reason) -> Result<Sent, Reason> {
    let (ifindex, smac, dmac) = match route {
        Route::Via {
            ifindex,
            smac,
            dmac,
        } => (ifindex, smac, dmac),
        Route::Kernel => return Ok(to_kernel()),
        Route::TooBig { .. } => return Err(Reason::DropTooBig),
    };
    let tx = ifindex == ingress(ctx);
    if !tx && TX_PORTS.get(ifindex).is_none() {
        // Out of an interface the balancer does not run on: the kernel forwards it (the frame
        // still carries this host's MAC as its destination).
        return Ok(to_kernel());
    }
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        (*eth).src_addr = smac;
        (*eth).dst_addr = dmac;
    }
    if tx {
        return Ok(Sent {
            reason,
            action: xdp_action::XDP_TX,
        });
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => Ok(Sent { reason, action }),
        Err(_) => Err(Reason::DropNoRoute),
    }
}

/// A result as a global BPF function returns it (a scalar): `Sent` as reason << 32 | action,
/// an error as -(reason + 1).
#[inline(always)]
pub fn pack(result: Result<Sent, Reason>) -> i64 {
    match result {
        Ok(sent) => (i64::from(sent.reason as u32) << 32) | i64::from(sent.action),
        Err(reason) => -i64::from(reason as u32) - 1,
    }
}

/// The inverse of `pack`.
#[inline(always)]
pub fn unpack(packed: i64) -> Result<Sent, Reason> {
    let reason = |n: i64| {
        let n = (n as u32).min(Reason::COUNT - 1);
        // SAFETY: `Reason` is `repr(u32)` with every value below `Reason::COUNT`.
        unsafe { core::mem::transmute::<u32, Reason>(n) }
    };
    if packed < 0 {
        return Err(reason(-packed - 1));
    }
    Ok(Sent {
        reason: reason(packed >> 32),
        action: packed as u32,
    })
}

/// Passes the packet to the kernel, counted as `PassToKernel`.
#[inline(always)]
pub fn to_kernel() -> Sent {
    Sent {
        reason: Reason::PassToKernel,
        action: xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn ingress(ctx: &XdpContext) -> u32 {
    // SAFETY: a plain u32 field of the context.
    unsafe { (*ctx.ctx).ingress_ifindex }
}
