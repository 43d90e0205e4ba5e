//! IP fragments for services that ask for them (`SERVICE_F_FRAGMENTS`). A fragment after the
//! first has no ports, so such a service places every packet of a client by the client's
//! address alone (its scheduler is source-hash, checked by the daemon) and is also in the
//! service map under port 0, the key fragments are looked up by. Every fragment goes to
//! ring[source_hash(client)] without touching the connection table: the first fragment, the
//! others, and the client's unfragmented packets all reach the same backend, which reassembles.
//! Only dsr/ipip/gue services (NAT would need the ports). Other fragments pass to the kernel as
//! before (`PassFragment`).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FORWARD_DSR, FORWARD_GUE, FORWARD_IPIP, Reason, SERVICE_F_FRAGMENTS, Service, ServiceKeyV4,
    ServiceKeyV6, hash::source_hash,
};

use super::{Inner, route::Sent};
use crate::{
    maps::{BACKEND_STATS, SERVICE_STATS, SERVICES, SERVICES_V6},
    parse::{Ipv4Wire, Ipv6Wire, ipv6_fragment_proto, ptr_at},
    select, stats,
};

/// An IPv4 TCP/UDP fragment (the parser said `PassFragment`).
#[inline(always)]
pub fn v4(ctx: &XdpContext, l3: usize) -> Result<Sent, Reason> {
    let ip: *const Ipv4Wire = ptr_at(ctx, l3).ok_or(Reason::PassFragment)?;
    // SAFETY: bounds checked by ptr_at.
    let (src, dst, proto) = unsafe { ((*ip).src, (*ip).dst, (*ip).proto) };
    let key = ServiceKeyV4 {
        addr: dst,
        port: 0,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let service = *unsafe { SERVICES.get(key) }.ok_or(Reason::PassFragment)?;
    send(ctx, &service, source_hash(&[src]), Inner { l3, v6: false })
}

/// An IPv6 packet with a fragment header (the parser said `PassFragment`).
#[inline(always)]
pub fn v6(ctx: &XdpContext, l3: usize) -> Result<Sent, Reason> {
    let proto = ipv6_fragment_proto(ctx, l3).ok_or(Reason::PassFragment)?;
    let ip: *const Ipv6Wire = ptr_at(ctx, l3).ok_or(Reason::PassFragment)?;
    // SAFETY: bounds checked by ptr_at.
    let (src, dst) = unsafe { ((*ip).src, (*ip).dst) };
    let key = ServiceKeyV6 {
        addr: dst,
        port: 0,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let service = *unsafe { SERVICES_V6.get(key) }.ok_or(Reason::PassFragment)?;
    send(ctx, &service, source_hash(&src), Inner { l3, v6: true })
}

#[inline(always)]
fn send(ctx: &XdpContext, service: &Service, hash: u32, inner: Inner) -> Result<Sent, Reason> {
    let mode = service.forward;
    if service.flags & SERVICE_F_FRAGMENTS == 0
        || (mode != FORWARD_DSR && mode != FORWARD_IPIP && mode != FORWARD_GUE)
    {
        return Err(Reason::PassFragment);
    }
    let id = select::by_hash(service, hash)?;
    let sent = super::to_backend(ctx, mode, id, inner, hash, Reason::Forwarded, true)?;
    if sent.reason != Reason::IcmpTooBig {
        let len = (ctx.data_end() - ctx.data()) as u64;
        stats::count_traffic(&SERVICE_STATS, service.id, len, false);
        stats::count_traffic(&BACKEND_STATS, id, len, false);
    }
    Ok(sent)
}
