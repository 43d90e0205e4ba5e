//! XDP entry points. Read top-down: parse → select → forward; every exit is counted by reason.
#![no_std]
#![no_main]
// The atomic add on shared flow counters (see select.rs).
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core::intrinsics::atomic_xadd for BPF's atomic add"
)]

mod decap;
mod forward;
mod hc;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use forward::route::Sent;
use lb_common::{
    DecapReason, FORWARD_DSR, FORWARD_FULLNAT, FORWARD_NAT, Reason, Service, ServiceKeyV4,
    ServiceKeyV6,
};
use parse::L3;
use select::Chosen;

/// Set to non-zero by the loader (`lb daemon --debug-packets`) to log each forwarding decision.
/// A read-only global: the verifier sees its value at load time and removes the logging code
/// from the hot path when it is zero.
#[unsafe(no_mangle)]
static LB_DEBUG: u32 = 0;

/// The balancer: TCP/UDP services on IPv4 and IPv6 VIPs, forwarded by each service's mode.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Sent { reason, action } = balance(&ctx).unwrap_or_else(|reason| Sent {
        reason,
        action: verdict(reason),
    });
    stats::count_reason(reason);
    action
}

/// Stands in for the wire on the far end of a veth: frames sent into a veth with XDP_TX are only
/// received when the peer runs an XDP program (test beds attach this to the bridge port).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// On backends (`lb decap`): strips the outer IP-in-IP or GUE headers of packets the balancer
/// encapsulated to this host and passes the inner packet to the stack (see decap.rs).
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let reason = match decap::decap(&ctx) {
        Ok(kind) => kind,
        Err(reason) => reason,
    };
    stats::count_decap(reason);
    decap_verdict(reason)
}

/// tc egress on the balancer's interface: steers VIP-addressed health checks (see hc.rs).
#[classifier]
pub fn lb_hc_egress(ctx: TcContext) -> i32 {
    hc::steer(&ctx)
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<Sent, Reason> {
    // SAFETY (service lookups): the value is copied out at once; userspace replaces entries
    // whole.
    let (service, backend) = match parse::l2(ctx)? {
        L3::V4(l3) => {
            let pkt = parse::ipv4(ctx, l3)?;
            let key = ServiceKeyV4 {
                addr: pkt.flow.dst,
                port: pkt.flow.dport,
                proto: pkt.flow.proto,
                _pad: 0,
            };
            let Some(service) = unsafe { maps::SERVICES.get(key) }.copied() else {
                return forward::nat::reply(ctx, l3, &pkt);
            };
            if is_nat(service.forward) {
                let (sent, backend) = forward::nat::forward(ctx, l3, &pkt, &service)?;
                return Ok(account(ctx, &service, &backend, sent));
            }
            (
                service,
                select::backend_for(&service, &pkt, &maps::CONNTRACK)?,
            )
        }
        L3::V6(l3) => {
            let pkt = parse::ipv6(ctx, l3)?;
            let key = ServiceKeyV6 {
                addr: pkt.flow.dst,
                port: pkt.flow.dport,
                proto: pkt.flow.proto,
                _pad: 0,
            };
            let Some(service) = unsafe { maps::SERVICES_V6.get(key) }.copied() else {
                return forward::nat::reply(ctx, l3, &pkt);
            };
            if is_nat(service.forward) {
                let (sent, backend) = forward::nat::forward(ctx, l3, &pkt, &service)?;
                return Ok(account(ctx, &service, &backend, sent));
            }
            (
                service,
                select::backend_for(&service, &pkt, &maps::CONNTRACK_V6)?,
            )
        }
    };
    let sent = match service.forward {
        FORWARD_DSR => {
            forward::dsr::rewrite(ctx, &backend.mac)?;
            Sent {
                reason: Reason::Forwarded,
                action: xdp_action::XDP_TX,
            }
        }
        _ => return Err(Reason::DropInternal),
    };
    Ok(account(ctx, &service, &backend, sent))
}

#[inline(always)]
fn is_nat(forward: u8) -> bool {
    forward == FORWARD_NAT || forward == FORWARD_FULLNAT
}

/// Counts a packet sent to a backend in its service's and backend's traffic.
#[inline(always)]
fn account(ctx: &XdpContext, service: &Service, backend: &Chosen, sent: Sent) -> Sent {
    let len = (ctx.data_end() - ctx.data()) as u64;
    stats::count_traffic(&maps::SERVICE_STATS, service.id, len, backend.placed);
    stats::count_traffic(&maps::BACKEND_STATS, backend.id, len, backend.placed);
    // SAFETY: a read of a plain u32 global.
    if unsafe { core::ptr::read_volatile(&LB_DEBUG) } != 0 {
        debug!(
            ctx,
            "service {} -> backend {} (new flow: {})",
            service.id,
            backend.id,
            u8::from(backend.placed)
        );
    }
    sent
}

#[inline(always)]
fn verdict(reason: Reason) -> u32 {
    match reason {
        // Sent packets carry their own action (`Sent`); these arms are for completeness.
        Reason::Forwarded | Reason::IcmpTooBig | Reason::IcmpForwarded | Reason::NatReply => {
            xdp_action::XDP_TX
        }
        Reason::PassToKernel | Reason::PassIcmpNoFlow => xdp_action::XDP_PASS,
        Reason::DropNoRoute | Reason::DropTooBig | Reason::DropNatNoPort => xdp_action::XDP_DROP,
        Reason::PassNotIp
        | Reason::PassNotTcpUdp
        | Reason::PassNotVip
        | Reason::PassFragment
        | Reason::PassShortL2 => xdp_action::XDP_PASS,
        Reason::DropMalformedIp
        | Reason::DropMalformedL4
        | Reason::DropNoBackend
        | Reason::DropInternal => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn decap_verdict(reason: DecapReason) -> u32 {
    match reason {
        DecapReason::DropMalformedOuter
        | DecapReason::DropMalformedGue
        | DecapReason::DropMalformedInner
        | DecapReason::DropInternal => xdp_action::XDP_DROP,
        DecapReason::Ipip4in4
        | DecapReason::Ipip6in4
        | DecapReason::Ipip4in6
        | DecapReason::Ipip6in6
        | DecapReason::Gue4in4
        | DecapReason::Gue6in4
        | DecapReason::Gue4in6
        | DecapReason::Gue6in6
        | DecapReason::PassNotIp
        | DecapReason::PassNotEncap
        | DecapReason::PassNotLocal
        | DecapReason::PassFragment => xdp_action::XDP_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
