//! IP-in-IP and GUE to the backend: the packet is kept whole and an outer IP header (and, for
//! GUE, a UDP header) addressed to the backend is put in front of it. The outer family is the
//! backend's, whatever the inner one: 4in4 and 6in4 (protocol 4 / 41) for IPv4 backends, 6in6
//! and 4in6 for IPv6 backends. GUE is the header-less "variant 1" (the inner IP header right
//! after UDP), as Katran sends and `lb decap` accepts.
//!
//! Outer fields: source from `CONFIG` with its low `encap_src_hash_bits` bits taken from the
//! flow hash (backends' RSS then spreads flows over their queues), TTL/hop limit 64, TOS or
//! traffic class copied from the inner header, IPv4 DF set and id 0 (never fragmented: too big
//! is answered with ICMP instead), IPv6 flow label from the flow hash. GUE: destination port
//! `CONFIG.gue_port`, source port from the flow hash (`gue_source_port`), checksum 0 (for IPv6
//! too: RFC 6935/6936 allow it for tunnels, and `lb decap` runs before the stack checks it).
//!
//! The next hop is looked up before the headers are pushed, with the length the packet will
//! have: a packet that would not fit the route's MTU is answered from its original bytes
//! (icmp.rs). A VLAN tag on the received frame is not carried over: the outer packet is routed,
//! and leaves untagged through the interface the FIB names.

use aya_ebpf::{bindings::xdp_md, helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    AF_INET6, DataplaneConfig, PROTO_IPIP, PROTO_IPV6, PROTO_UDP, Reason, hash::gue_source_port,
};

use super::{
    Inner, icmp,
    route::{self, Route, Sent},
};
use crate::{
    maps::{BACKENDS, CONFIG},
    parse::{ETH_P_IP, ETH_P_IPV6, Ipv4Wire, Ipv6Wire, ptr_at, ptr_at_mut},
};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = size_of::<Ipv4Wire>();
pub const IPV6_HLEN: usize = size_of::<Ipv6Wire>();
pub const UDP_HLEN: usize = size_of::<UdpWire>();
/// Outer TTL / hop limit.
const OUTER_TTL: u8 = 64;
/// IPv4 "don't fragment", in the host-order flags + offset field.
pub const IP_DF: u16 = 0x4000;

#[repr(C)]
pub struct UdpWire {
    pub src: u16,
    pub dst: u16,
    pub len: u16,
    pub check: u16,
}

/// An Ethernet header; MACs as 16-bit words so they are copied with word loads.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthWire {
    pub dst: [u16; 3],
    pub src: [u16; 3],
    pub ether_type: u16,
}

/// What to encapsulate, and how (the arguments of `encapsulate`, in one value: a BPF
/// function takes at most five arguments).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Encap {
    /// The packet to carry.
    pub inner: Inner,
    /// The backend.
    pub id: u32,
    /// The flow hash (outer source bits, GUE source port, IPv6 flow label).
    pub hash: u32,
    /// GUE, else IP-in-IP.
    pub gue: bool,
    /// Answer "too big" to the sender (never for a packet that is itself an ICMP error).
    pub reply: bool,
    /// The counter of a packet sent.
    pub reason: Reason,
}

/// Encapsulates the packet at `e.inner` to backend `e.id` and sends it along the kernel's
/// route to the backend. When the result would exceed the route's MTU: `TooBig` with the MTU
/// left for the inner packet if `e.reply`, else the packet is dropped.
///
/// Run through `lb_encapsulate`, a global BPF function.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, e: &Encap) -> Result<Encapsulated, Reason> {
    let (mut inner, id, hash, gue) = (e.inner, e.id, e.hash, e.gue);
    // A global function knows nothing of its arguments: the IP header starts after Ethernet
    // and at most one VLAN tag, and the verifier must see that bound.
    if inner.l3 > ETH_HLEN + 4 {
        return Err(Reason::DropInternal);
    }
    inner.l3 &= 0x1f;
    let backend = BACKENDS.get(id).ok_or(Reason::DropInternal)?;
    // SAFETY: `addr` is the first field of a 4-aligned `#[repr(C)]` struct.
    let dst: [u32; 4] = unsafe { *backend.addr.as_ptr().cast::<[u32; 4]>() };
    let outer_v6 = backend.family == AF_INET6;
    let cfg = CONFIG.get(0).ok_or(Reason::DropInternal)?;

    // SAFETY (reads): pointers from ptr_at, which checked the bounds.
    let (inner_len, tos) = if inner.v6 {
        let ip: *const Ipv6Wire = ptr_at(ctx, inner.l3).ok_or(Reason::DropInternal)?;
        let vtc = u32::from_be(unsafe { (*ip).vtc_flow });
        let payload = u16::from_be(unsafe { (*ip).payload_len }) as u32;
        (IPV6_HLEN as u32 + payload, (vtc >> 20) as u8)
    } else {
        let ip: *const Ipv4Wire = ptr_at(ctx, inner.l3).ok_or(Reason::DropInternal)?;
        (u16::from_be(unsafe { (*ip).tot_len }) as u32, unsafe {
            (*ip).tos
        })
    };
    let udp = if gue { UDP_HLEN } else { 0 };
    let ip_hlen = if outer_v6 { IPV6_HLEN } else { IPV4_HLEN };
    let overhead = ip_hlen + udp;
    // Longer than 64 KiB once encapsulated: fits no MTU, so the lookup answers "too big".
    let outer_len = (inner_len + overhead as u32).min(0xffff) as u16;
    let route = if outer_v6 {
        route::lookup_v6(ctx, &outer_src6(cfg, hash), &dst, outer_len)?
    } else {
        route::lookup_v4(ctx, outer_src4(cfg, hash), dst[0], outer_len)?
    };
    if let Route::TooBig { mtu } = route {
        if !e.reply {
            return Err(Reason::DropTooBig);
        }
        return Ok(Encapsulated::TooBig(mtu.saturating_sub(overhead as u16)));
    }

    push(ctx, inner.l3, overhead, outer_v6)?;
    let proto = if gue {
        PROTO_UDP
    } else if inner.v6 {
        PROTO_IPV6
    } else {
        PROTO_IPIP
    };
    if outer_v6 {
        let ip: *mut Ipv6Wire = ptr_at_mut(ctx, ETH_HLEN).ok_or(Reason::DropInternal)?;
        // SAFETY (writes): pointers from ptr_at_mut, bounds checked after the adjustment.
        // Field by field: a whole `Ipv6Wire` value is built on the stack first, and this
        // subprogram's frame is on the verifier's 512-byte budget with the balancer's.
        unsafe {
            (*ip).vtc_flow = ((6 << 28) | (u32::from(tos) << 20) | (hash & 0xf_ffff)).to_be();
            (*ip).payload_len = ((inner_len + udp as u32) as u16).to_be();
            (*ip).next_hdr = proto;
            (*ip).hop_limit = OUTER_TTL;
            (*ip).src = outer_src6(cfg, hash);
            (*ip).dst = dst;
        }
    } else {
        let mut h = Ipv4Wire {
            vihl: 0x45,
            tos,
            tot_len: outer_len.to_be(),
            id: 0,
            frags: IP_DF.to_be(),
            ttl: OUTER_TTL,
            proto,
            check: 0,
            src: outer_src4(cfg, hash),
            dst: dst[0],
        };
        h.check = ipv4_check(&h);
        let ip: *mut Ipv4Wire = ptr_at_mut(ctx, ETH_HLEN).ok_or(Reason::DropInternal)?;
        unsafe { *ip = h };
    }
    if gue {
        let u: *mut UdpWire = ptr_at_mut(ctx, ETH_HLEN + ip_hlen).ok_or(Reason::DropInternal)?;
        unsafe {
            *u = UdpWire {
                src: gue_source_port(hash).to_be(),
                dst: cfg.gue_port,
                len: ((inner_len + UDP_HLEN as u32) as u16).to_be(),
                check: 0,
            };
        }
    }
    route::send(ctx, route, e.reason).map(Encapsulated::Sent)
}

/// What `encapsulate` did.
pub enum Encapsulated {
    Sent(Sent),
    /// Too big for the route: the sender must be told this MTU (`send` does).
    TooBig(u16),
}

/// Encapsulates and sends (`lb_encapsulate`), or answers "too big" (icmp.rs). Two subprograms
/// called one after the other, not nested, so their stack frames never add up.
#[inline(always)]
pub fn send(ctx: &XdpContext, e: &Encap) -> Result<Sent, Reason> {
    let packed = lb_encapsulate(ctx.ctx, core::ptr::from_ref(e));
    if packed < 0 {
        // SAFETY: negative values are `-(reason + 1)` of a valid `Reason` (see pack).
        return Err(unsafe { core::mem::transmute::<u32, Reason>((-packed - 1) as u32) });
    }
    if packed & TOO_BIG != 0 {
        return icmp::too_big(ctx, e.inner, packed as u16);
    }
    // SAFETY: as above, the reason of a `Sent`.
    let reason = unsafe { core::mem::transmute::<u32, Reason>((packed >> 32) as u32 & 0xff) };
    Ok(Sent {
        reason,
        action: packed as u32,
    })
}

/// Marks a packed `TooBig` (the MTU in the low 16 bits).
const TOO_BIG: i64 = 1 << 62;

/// `encapsulate` as a global BPF function: the verifier checks it once, on its own, instead
/// of again at each of its callers in every state that reaches them (which took the balancer
/// past the verifier's budget of 1M instructions), and its frame is its own. Global functions
/// take the context and scalars or pointers to plain structs, and return a scalar: the result
/// is packed (`Sent` as reason << 32 | action, `TooBig` as TOO_BIG | mtu, an error as
/// -(reason + 1)).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_encapsulate(ctx: *mut xdp_md, e: *const Encap) -> i64 {
    let ctx = XdpContext::new(ctx);
    // SAFETY: the verifier checks that a non-null `e` points at a readable `Encap`.
    let Some(e) = (unsafe { e.as_ref() }) else {
        return -i64::from(Reason::DropInternal as u32) - 1;
    };
    match encapsulate(&ctx, e) {
        Ok(Encapsulated::Sent(sent)) => {
            (i64::from(sent.reason as u32) << 32) | i64::from(sent.action)
        }
        Ok(Encapsulated::TooBig(mtu)) => TOO_BIG | i64::from(mtu),
        Err(reason) => -i64::from(reason as u32) - 1,
    }
}

/// Makes room for `overhead` bytes of outer headers in front of the packet at `l3`, replacing
/// the L2 header (and dropping its VLAN tag, if any) by an untagged Ethernet header of the
/// outer family. The MACs stay those received: `route::send` writes the next hop's, and a
/// packet passed to the kernel must still be addressed to this host's MAC.
#[inline(always)]
fn push(ctx: &XdpContext, l3: usize, overhead: usize, outer_v6: bool) -> Result<(), Reason> {
    let eth: *const EthWire = ptr_at(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: bounds checked by ptr_at; read before adjust_head invalidates packet pointers.
    let old = unsafe { *eth };
    let delta = overhead as i32 - (l3 - ETH_HLEN) as i32;
    // SAFETY: a helper call on the context the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -delta) } != 0 {
        return Err(Reason::DropInternal);
    }
    let eth: *mut EthWire = ptr_at_mut(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: bounds checked by ptr_at_mut after the adjustment.
    unsafe {
        *eth = EthWire {
            ether_type: if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be(),
            ..old
        };
    }
    Ok(())
}

/// The low `encap_src_hash_bits` bits (at most 32) of a host-order word replaced by the hash's.
#[inline(always)]
fn with_hash_bits(word_be: u32, bits: u8, hash: u32) -> u32 {
    let mask = if bits == 0 {
        0
    } else if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) - 1
    };
    ((u32::from_be(word_be) & !mask) | (hash & mask)).to_be()
}

#[inline(always)]
fn outer_src4(cfg: &DataplaneConfig, hash: u32) -> u32 {
    with_hash_bits(cfg.encap_src4, cfg.encap_src_hash_bits, hash)
}

#[inline(always)]
fn outer_src6(cfg: &DataplaneConfig, hash: u32) -> [u32; 4] {
    let s = cfg.encap_src6;
    [
        s[0],
        s[1],
        s[2],
        with_hash_bits(s[3], cfg.encap_src_hash_bits, hash),
    ]
}

/// The header checksum of an IPv4 header without options (its `check` field zero).
#[inline(always)]
pub fn ipv4_check(h: &Ipv4Wire) -> u16 {
    // SAFETY: Ipv4Wire is 20 bytes of plain integers, 2-aligned at least.
    let words: &[u16; 10] = unsafe { &*core::ptr::from_ref(h).cast::<[u16; 10]>() };
    let mut sum = 0u32;
    for w in words {
        sum += u32::from(*w);
    }
    fold(sum as u64)
}

/// Folds a sum of native-order 16-bit (or 32-bit) words into the one's-complement checksum,
/// to be stored as a native-order u16.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
