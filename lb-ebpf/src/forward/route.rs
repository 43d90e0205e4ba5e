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
    maps::{FIB_SCRATCH, TX_PORTS},
    parse::ptr_at_mut,
};

/// `BPF_FIB_LKUP_RET_*` results we act on (linux/bpf.h).
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;

/// Where a rewritten packet goes.
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
    let p = params(ctx, AF_INET, tot_len)?;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    lookup(ctx, p)
}

/// The route to an IPv6 destination for a packet of `tot_len` bytes (fixed header included).
#[inline(always)]
pub fn lookup_v6(
    ctx: &XdpContext,
    src: &[u32; 4],
    dst: &[u32; 4],
    tot_len: u16,
) -> Result<Route, Reason> {
    let p = params(ctx, AF_INET6, tot_len)?;
    p.__bindgen_anon_3.ipv6_src = *src;
    p.__bindgen_anon_4.ipv6_dst = *dst;
    lookup(ctx, p)
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
