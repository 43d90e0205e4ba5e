//! L2 direct server return: only the Ethernet addresses change. The backend holds the VIP on a
//! loopback and answers the client itself, so IP/L4 headers and checksums stay untouched.

use aya_ebpf::programs::XdpContext;
use lb_common::Reason;
use network_types::eth::EthHdr;

use crate::parse::ptr_at_mut;

#[inline(always)]
pub fn rewrite(ctx: &XdpContext, backend_mac: &[u8; 6]) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).ok_or(Reason::PassShortL2)?;
    // SAFETY: bounds checked by ptr_at_mut. The frame was addressed to this interface, so its
    // destination MAC is ours and becomes the source.
    unsafe {
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = *backend_mac;
    }
    Ok(())
}
