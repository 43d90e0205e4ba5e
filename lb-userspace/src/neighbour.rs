//! Backend MACs from the kernel's neighbour tables (ARP and NDP), asked over rtnetlink. The
//! daemon's health probes connect to each backend, which makes the kernel resolve it; we only
//! read the result. Netlink, not `/proc/net/arp`: reading that file walks the table from its
//! start for every chunk read, so with thousands of backends one read took milliseconds, and
//! IPv6 has no such file. A socket opened by a thread works in that thread's network namespace.

use std::{collections::HashMap, io, net::IpAddr};

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// `NUD_VALID`: permanent, noarp, reachable, probe, stale, delay (the entry has a MAC).
const NUD_VALID: u16 = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08;
/// `struct nlmsghdr` and `struct ndmsg`.
const NLMSG_HDR: usize = 16;
const NDMSG: usize = 12;

/// Known MACs of IPv4 and IPv6 neighbours on `iface`, in the calling thread's namespace.
pub fn table(iface: &str) -> io::Result<HashMap<IpAddr, [u8; 6]>> {
    let ifindex = ifindex(iface)?;
    let socket = Socket::open()?;
    socket.send(&request(
        NLM_F_REQUEST | NLM_F_DUMP,
        libc::AF_UNSPEC as u8,
        0,
        None,
    ))?;
    let mut table = HashMap::new();
    socket.receive(|kind, payload| {
        if kind == RTM_NEWNEIGH
            && let Some((index, ip, mac)) = parse_neighbour(payload)
            && index == ifindex
        {
            table.insert(ip, mac);
        }
        Ok(kind != NLMSG_DONE)
    })?;
    Ok(table)
}

/// The known MAC of neighbour `ip` on `iface`: one entry asked for, whatever the table's size.
pub fn lookup(iface: &str, ip: IpAddr) -> io::Result<Option<[u8; 6]>> {
    let ifindex = ifindex(iface)?;
    let socket = Socket::open()?;
    let family = match ip {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    } as u8;
    socket.send(&request(NLM_F_REQUEST, family, ifindex, Some(ip)))?;
    let mut found = None;
    socket.receive(|kind, payload| {
        if kind == RTM_NEWNEIGH {
            found = parse_neighbour(payload).map(|(_, _, mac)| mac);
        }
        Ok(false)
    })?;
    Ok(found)
}

fn ifindex(iface: &str) -> io::Result<i32> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| io::Error::other(format!("interface name {iface:?} holds a NUL")))?;
    // SAFETY: a valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::other(format!("no interface {iface}"))),
        i => Ok(i as i32),
    }
}

/// An `RTM_GETNEIGH` request: a dump of `family`'s neighbours, or with `dst` the one entry.
fn request(flags: u16, family: u8, ifindex: i32, dst: Option<IpAddr>) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    m.extend_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&[0; 4]); // state, flags, type
    if let Some(ip) = dst {
        let bytes: Vec<u8> = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        m.extend_from_slice(&(4 + bytes.len() as u16).to_ne_bytes());
        m.extend_from_slice(&NDA_DST.to_ne_bytes());
        m.extend_from_slice(&bytes);
    }
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m
}

/// An `RTM_NEWNEIGH` payload (`ndmsg` and attributes): the interface index, address and MAC of
/// an entry that has a valid Ethernet MAC.
fn parse_neighbour(payload: &[u8]) -> Option<(i32, IpAddr, [u8; 6])> {
    let ndm = payload.get(..NDMSG)?;
    let family = i32::from(ndm[0]);
    let ifindex = i32::from_ne_bytes(ndm[4..8].try_into().ok()?);
    let state = u16::from_ne_bytes(ndm[8..10].try_into().ok()?);
    if state & NUD_VALID == 0 {
        return None;
    }
    let (mut ip, mut mac) = (None, None);
    let mut attrs = &payload[NDMSG..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        let value = attrs.get(4..len)?;
        match (kind, family, value.len()) {
            (NDA_DST, libc::AF_INET, 4) => {
                ip = Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?));
            }
            (NDA_DST, libc::AF_INET6, 16) => {
                ip = Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?));
            }
            (NDA_LLADDR, _, 6) => mac = Some(<[u8; 6]>::try_from(value).ok()?),
            _ => {}
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    Some((ifindex, ip?, mac?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A NETLINK_ROUTE socket, closed on drop.
struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket creation; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns.
        Ok(Socket(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: a valid buffer of that length; the kernel is the destination (no address).
        let sent = unsafe { libc::send(self.fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads the kernel's answer, handing each message's type and payload to `each`, until it
    /// returns `false` (or the kernel reports an error: `ENOENT` ends a lookup of nothing).
    fn receive(&self, mut each: impl FnMut(u16, &[u8]) -> io::Result<bool>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: a valid buffer of that length.
            let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            if rest.is_empty() {
                return Err(io::Error::other("netlink: the kernel closed the socket"));
            }
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let Some(payload) = rest.get(NLMSG_HDR..len) else {
                    return Err(io::Error::other("netlink: a truncated message"));
                };
                if kind == NLMSG_ERROR {
                    let code = payload
                        .get(..4)
                        .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap_or_default()));
                    return match -code {
                        0 | libc::ENOENT => Ok(()),
                        errno => Err(io::Error::from_raw_os_error(errno)),
                    };
                }
                if !each(kind, payload)? {
                    return Ok(());
                }
                rest = rest.get(align4(len)..).unwrap_or(&[]);
            }
        }
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `RTM_NEWNEIGH` payload as the kernel sends it.
    fn entry(family: u8, ifindex: i32, state: u16, dst: &[u8], mac: Option<[u8; 6]>) -> Vec<u8> {
        let mut p = vec![family, 0, 0, 0];
        p.extend_from_slice(&ifindex.to_ne_bytes());
        p.extend_from_slice(&state.to_ne_bytes());
        p.extend_from_slice(&[0, 1]);
        let mut attr = |kind: u16, value: &[u8]| {
            p.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
            p.extend_from_slice(&kind.to_ne_bytes());
            p.extend_from_slice(value);
            p.resize(align4(p.len()), 0);
        };
        attr(NDA_DST, dst);
        if let Some(mac) = mac {
            attr(NDA_LLADDR, &mac);
        }
        p
    }

    #[test]
    fn entries_with_a_valid_mac_are_read_in_both_families() {
        let mac = [2, 0, 0, 0, 0, 0x11];
        let v4 = entry(2, 7, 0x02, &[10, 99, 0, 11], Some(mac));
        assert_eq!(
            parse_neighbour(&v4),
            Some((7, "10.99.0.11".parse().unwrap(), mac))
        );
        let v6_addr: std::net::Ipv6Addr = "fd00:99::11".parse().unwrap();
        let v6 = entry(10, 3, 0x80, &v6_addr.octets(), Some(mac));
        assert_eq!(parse_neighbour(&v6), Some((3, v6_addr.into(), mac)));
    }

    #[test]
    fn incomplete_and_failed_entries_and_short_payloads_are_skipped() {
        let mac = Some([2, 0, 0, 0, 0, 0x11]);
        assert_eq!(
            parse_neighbour(&entry(2, 7, 0x01, &[10, 0, 0, 1], mac)),
            None
        );
        assert_eq!(
            parse_neighbour(&entry(2, 7, 0x20, &[10, 0, 0, 1], None)),
            None
        );
        assert_eq!(
            parse_neighbour(&entry(2, 7, 0x02, &[10, 0, 0, 1], None)),
            None
        );
        let whole = entry(2, 7, 0x02, &[10, 0, 0, 1], mac);
        for cut in 0..whole.len() {
            let _ = parse_neighbour(&whole[..cut]);
        }
    }

    #[test]
    fn the_loopback_table_reads_and_an_unknown_neighbour_is_none() {
        // Every namespace has lo; its table is empty, and asking for an entry finds nothing.
        assert!(table("lo").is_ok());
        assert_eq!(lookup("lo", "192.0.2.1".parse().unwrap()).unwrap(), None);
        assert!(table("no-such-interface").is_err());
    }

    #[test]
    fn macs_round_trip_and_bad_ones_are_rejected() {
        let mac = parse_mac("0a:1b:2c:3d:4e:5f").unwrap();
        assert_eq!(format_mac(&mac), "0a:1b:2c:3d:4e:5f");
        assert!(parse_mac("0a:1b:2c:3d:4e").is_none());
        assert!(parse_mac("0a:1b:2c:3d:4e:5f:60").is_none());
        assert!(parse_mac("zz:1b:2c:3d:4e:5f").is_none());
    }
}
