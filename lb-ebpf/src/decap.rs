//! Decapsulation for backends (`lb decap`): strips the outer headers the balancer writes
//! (IP-in-IP in the four family mixes, and GUE) and hands the inner packet to the stack, where
//! the VIP on loopback accepts it. For kernels without the ipip/sit/fou modules.
//!
//! Rules, in order (each exit is a `DecapReason`):
//! - not IPv4/IPv6, or the Ethernet/VLAN/fixed IP header cut short → pass;
//! - IP but neither protocol 4/41 nor UDP to the GUE port → pass (ordinary traffic). The outer
//!   IPv6 header's next header must name the payload directly: the balancer writes no extension
//!   headers, and a packet with them passes to the kernel untouched;
//! - encapsulated, outer destination not in `DECAP_ADDRS` → pass untouched;
//! - an outer IPv4 fragment → pass (the kernel reassembles it; the balancer never fragments);
//! - outer IP or UDP lengths inconsistent or past the frame → drop;
//! - GUE: version 0 with no options and no control bit, protocol 4 or 41; or GUE "variant 1"
//!   (the inner IPv4/IPv6 header straight after UDP, as Katran sends it); anything else → drop;
//! - inner IP header cut short, of the wrong version for the declared protocol, or longer than
//!   what the outer packet carries → drop;
//! - otherwise the outer headers are removed with `bpf_xdp_adjust_head`, the Ethernet header
//!   (and VLAN tag, if any) is written again in front of the inner packet with the inner
//!   family's ethertype, and the frame passes to the stack.
//!
//! Checksums: the outer IPv4 header checksum and the UDP checksum are not verified (both are
//! removed, and the inner packet keeps its own checksums, which the stack checks).

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{DEFAULT_GUE_PORT, DecapAddr, DecapReason, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use network_types::eth::EthHdr;

use crate::{
    maps::DECAP_ADDRS,
    parse::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IP_MF, IP_OFFSET, Ipv4Wire, Ipv6Wire,
        ptr_at, ptr_at_mut,
    },
};

/// The UDP port GUE packets arrive on, network order. A read-only global the loader sets
/// (`lb decap --gue-port`): the verifier sees the constant and folds the comparison.
#[unsafe(no_mangle)]
static LB_GUE_PORT: u16 = DEFAULT_GUE_PORT.to_be();

/// GUE header (draft-ietf-intarea-gue): version (2 bits), control bit, header length in words
/// (5 bits), protocol, flags.
#[repr(C)]
struct GueWire {
    vchl: u8,
    proto: u8,
    flags: u16,
}

#[repr(C)]
struct UdpWire {
    src: u16,
    dst: u16,
    len: u16,
    check: u16,
}

/// An Ethernet header; MACs as 16-bit words so they are copied with word loads.
#[repr(C)]
struct EthWire {
    macs: [u16; 6],
    ether_type: u16,
}

/// An Ethernet header with one VLAN tag.
#[repr(C)]
struct EthVlanWire {
    macs: [u16; 6],
    tpid: u16,
    tci: u16,
    ether_type: u16,
}

const GUE_HLEN: usize = size_of::<GueWire>();
const UDP_HLEN: usize = size_of::<UdpWire>();
const IPV4_HLEN: usize = size_of::<Ipv4Wire>();
const IPV6_HLEN: usize = size_of::<Ipv6Wire>();

/// Where the inner packet lies, as offsets from the frame's start.
struct Inner {
    /// First byte of the inner IP header.
    start: usize,
    /// One past the last byte the outer headers say they carry (trailing Ethernet padding is
    /// after it).
    end: usize,
    /// The inner packet is IPv6 (else IPv4).
    v6: bool,
    /// What is decapsulated, for the counters.
    kind: DecapReason,
}

/// Strips the outer headers of an encapsulated packet for this host. `Ok` names what was
/// decapsulated; `Err` why the packet is passed untouched or dropped.
#[inline(always)]
pub fn decap(ctx: &XdpContext) -> Result<DecapReason, DecapReason> {
    let eth: *const EthWire = ptr_at(ctx, 0).ok_or(DecapReason::PassNotIp)?;
    // SAFETY (all reads below): each pointer comes from ptr_at, which checked the bounds.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3 = EthHdr::LEN;
    let tagged = ether_type == ETH_P_8021Q.to_be() || ether_type == ETH_P_8021AD.to_be();
    if tagged {
        let vlan: *const EthVlanWire = ptr_at(ctx, 0).ok_or(DecapReason::PassNotIp)?;
        ether_type = unsafe { (*vlan).ether_type };
        l3 = size_of::<EthVlanWire>();
    }
    let inner = if ether_type == ETH_P_IP.to_be() {
        outer_v4(ctx, l3)?
    } else if ether_type == ETH_P_IPV6.to_be() {
        outer_v6(ctx, l3)?
    } else {
        return Err(DecapReason::PassNotIp);
    };
    check_inner(ctx, &inner)?;
    strip(ctx, l3, tagged, &inner)?;
    Ok(inner.kind)
}

#[inline(always)]
fn gue_port() -> u16 {
    // SAFETY: a read of a plain u16 global.
    unsafe { core::ptr::read_volatile(&LB_GUE_PORT) }
}

#[inline(always)]
fn is_local(addr: DecapAddr) -> bool {
    DECAP_ADDRS.get_ptr(addr).is_some()
}

#[inline(always)]
fn outer_v4(ctx: &XdpContext, l3: usize) -> Result<Inner, DecapReason> {
    let ip: *const Ipv4Wire = ptr_at(ctx, l3).ok_or(DecapReason::PassNotIp)?;
    let vihl = unsafe { (*ip).vihl };
    // Masked so the verifier knows the header length is at most 60 bytes.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    let proto = unsafe { (*ip).proto };
    let ipip = proto == PROTO_IPIP || proto == PROTO_IPV6;
    if !ipip {
        // A UDP header is only found behind a sane IPv4 header; a broken one is the kernel's.
        if proto != PROTO_UDP || vihl >> 4 != 4 || ihl < IPV4_HLEN {
            return Err(DecapReason::PassNotEncap);
        }
        let udp: *const UdpWire = ptr_at(ctx, l3 + ihl).ok_or(DecapReason::PassNotEncap)?;
        if unsafe { (*udp).dst } != gue_port() {
            return Err(DecapReason::PassNotEncap);
        }
    }
    if !is_local(DecapAddr::v4(unsafe { (*ip).dst })) {
        return Err(DecapReason::PassNotLocal);
    }
    if u16::from_be(unsafe { (*ip).frags }) & (IP_MF | IP_OFFSET) != 0 {
        return Err(DecapReason::PassFragment);
    }
    let total = u16::from_be(unsafe { (*ip).tot_len }) as usize;
    if vihl >> 4 != 4 || ihl < IPV4_HLEN || total < ihl || ctx.data() + l3 + total > ctx.data_end()
    {
        return Err(DecapReason::DropMalformedOuter);
    }
    let payload = l3 + ihl;
    if ipip {
        return Ok(Inner {
            start: payload,
            end: l3 + total,
            v6: proto == PROTO_IPV6,
            kind: if proto == PROTO_IPV6 {
                DecapReason::Ipip6in4
            } else {
                DecapReason::Ipip4in4
            },
        });
    }
    let udp: *const UdpWire = ptr_at(ctx, payload).ok_or(DecapReason::DropMalformedOuter)?;
    let udp_len = u16::from_be(unsafe { (*udp).len }) as usize;
    if udp_len < UDP_HLEN || ihl + udp_len > total {
        return Err(DecapReason::DropMalformedOuter);
    }
    let (start, v6) = gue(ctx, payload + UDP_HLEN, payload + udp_len)?;
    Ok(Inner {
        start,
        end: payload + udp_len,
        v6,
        kind: if v6 {
            DecapReason::Gue6in4
        } else {
            DecapReason::Gue4in4
        },
    })
}

#[inline(always)]
fn outer_v6(ctx: &XdpContext, l3: usize) -> Result<Inner, DecapReason> {
    let ip: *const Ipv6Wire = ptr_at(ctx, l3).ok_or(DecapReason::PassNotIp)?;
    let next = unsafe { (*ip).next_hdr };
    let payload = l3 + IPV6_HLEN;
    let ipip = next == PROTO_IPIP || next == PROTO_IPV6;
    if !ipip {
        if next != PROTO_UDP {
            return Err(DecapReason::PassNotEncap);
        }
        let udp: *const UdpWire = ptr_at(ctx, payload).ok_or(DecapReason::PassNotEncap)?;
        if unsafe { (*udp).dst } != gue_port() {
            return Err(DecapReason::PassNotEncap);
        }
    }
    if !is_local(DecapAddr {
        words: unsafe { (*ip).dst },
    }) {
        return Err(DecapReason::PassNotLocal);
    }
    let payload_len = u16::from_be(unsafe { (*ip).payload_len }) as usize;
    let version = (u32::from_be(unsafe { (*ip).vtc_flow }) >> 28) as u8;
    if version != 6 || ctx.data() + payload + payload_len > ctx.data_end() {
        return Err(DecapReason::DropMalformedOuter);
    }
    if ipip {
        return Ok(Inner {
            start: payload,
            end: payload + payload_len,
            v6: next == PROTO_IPV6,
            kind: if next == PROTO_IPV6 {
                DecapReason::Ipip6in6
            } else {
                DecapReason::Ipip4in6
            },
        });
    }
    let udp: *const UdpWire = ptr_at(ctx, payload).ok_or(DecapReason::DropMalformedOuter)?;
    let udp_len = u16::from_be(unsafe { (*udp).len }) as usize;
    if udp_len < UDP_HLEN || udp_len > payload_len {
        return Err(DecapReason::DropMalformedOuter);
    }
    let (start, v6) = gue(ctx, payload + UDP_HLEN, payload + udp_len)?;
    Ok(Inner {
        start,
        end: payload + udp_len,
        v6,
        kind: if v6 {
            DecapReason::Gue6in6
        } else {
            DecapReason::Gue4in6
        },
    })
}

/// The GUE header at `off` (the UDP payload, which ends at `end`): where the inner packet
/// starts and whether it is IPv6.
#[inline(always)]
fn gue(ctx: &XdpContext, off: usize, end: usize) -> Result<(usize, bool), DecapReason> {
    let hdr: *const GueWire = ptr_at(ctx, off).ok_or(DecapReason::DropMalformedGue)?;
    if off + GUE_HLEN > end {
        return Err(DecapReason::DropMalformedGue);
    }
    let vchl = unsafe { (*hdr).vchl };
    // Version 0, C = 0, hlen = 0 (no options), no flags: a data message, the header only.
    if vchl == 0 {
        if unsafe { (*hdr).flags } != 0 {
            return Err(DecapReason::DropMalformedGue);
        }
        return match unsafe { (*hdr).proto } {
            PROTO_IPIP => Ok((off + GUE_HLEN, false)),
            PROTO_IPV6 => Ok((off + GUE_HLEN, true)),
            _ => Err(DecapReason::DropMalformedGue),
        };
    }
    // Variant 1: no GUE header, the first nibble is the inner IP version.
    match vchl >> 4 {
        4 => Ok((off, false)),
        6 => Ok((off, true)),
        _ => Err(DecapReason::DropMalformedGue),
    }
}

/// The inner IP header must be whole, of the declared version, and inside the outer packet.
#[inline(always)]
fn check_inner(ctx: &XdpContext, inner: &Inner) -> Result<(), DecapReason> {
    let (version, len) = if inner.v6 {
        let ip: *const Ipv6Wire =
            ptr_at(ctx, inner.start).ok_or(DecapReason::DropMalformedInner)?;
        let version = (u32::from_be(unsafe { (*ip).vtc_flow }) >> 28) as u8;
        let len = IPV6_HLEN + u16::from_be(unsafe { (*ip).payload_len }) as usize;
        (version, len)
    } else {
        let ip: *const Ipv4Wire =
            ptr_at(ctx, inner.start).ok_or(DecapReason::DropMalformedInner)?;
        let vihl = unsafe { (*ip).vihl };
        let total = u16::from_be(unsafe { (*ip).tot_len }) as usize;
        if ((vihl & 0x0f) as usize) * 4 < IPV4_HLEN || total < IPV4_HLEN {
            return Err(DecapReason::DropMalformedInner);
        }
        (vihl >> 4, total)
    };
    let want = if inner.v6 { 6 } else { 4 };
    if version != want || inner.start + len > inner.end {
        return Err(DecapReason::DropMalformedInner);
    }
    Ok(())
}

/// Removes everything between the L2 header (which ends at `l3`) and the inner packet, then
/// writes the L2 header again in front of the inner packet with the inner family's ethertype.
#[inline(always)]
fn strip(ctx: &XdpContext, l3: usize, tagged: bool, inner: &Inner) -> Result<(), DecapReason> {
    let ether_type = if inner.v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be();
    // The old header, read before adjust_head invalidates every packet pointer.
    let eth: *const EthWire = ptr_at(ctx, 0).ok_or(DecapReason::DropInternal)?;
    let macs = unsafe { (*eth).macs };
    let (tpid, tci) = if tagged {
        let vlan: *const EthVlanWire = ptr_at(ctx, 0).ok_or(DecapReason::DropInternal)?;
        unsafe { ((*vlan).tpid, (*vlan).tci) }
    } else {
        (0, 0)
    };
    let delta = (inner.start - l3) as i32;
    // SAFETY: a helper call on the context the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return Err(DecapReason::DropInternal);
    }
    if tagged {
        let eth: *mut EthVlanWire = ptr_at_mut(ctx, 0).ok_or(DecapReason::DropInternal)?;
        // SAFETY: bounds checked by ptr_at_mut after the adjustment.
        unsafe {
            (*eth).macs = macs;
            (*eth).tpid = tpid;
            (*eth).tci = tci;
            (*eth).ether_type = ether_type;
        }
    } else {
        let eth: *mut EthWire = ptr_at_mut(ctx, 0).ok_or(DecapReason::DropInternal)?;
        // SAFETY: as above.
        unsafe {
            (*eth).macs = macs;
            (*eth).ether_type = ether_type;
        }
    }
    Ok(())
}
