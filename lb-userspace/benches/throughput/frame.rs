//! The generator's template frame: Ethernet / IPv4 / UDP with correct checksums, 60 bytes (the
//! 64-byte minimum on a wire, less the FCS). The generator program then changes only the source
//! address and port, updating both checksums.

use std::net::Ipv4Addr;

/// UDP payload bytes: 14 + 20 + 8 + 18 = 60.
const PAYLOAD: &[u8] = b"lb throughput test";

pub fn udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
) -> Vec<u8> {
    let udp_len = 8 + PAYLOAD.len();
    let total = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + total);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());

    f.push(0x45);
    f.push(0);
    f.extend_from_slice(&u16::try_from(total).unwrap_or(u16::MAX).to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes()); // id
    f.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
    f.push(64); // ttl
    f.push(17); // udp
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let ip_check = checksum(0, &f[14..34]);
    f[24..26].copy_from_slice(&ip_check.to_be_bytes());

    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&u16::try_from(udp_len).unwrap_or(u16::MAX).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(PAYLOAD);

    // Pseudo-header: source, destination, zero + protocol, UDP length.
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&u16::try_from(udp_len).unwrap_or(u16::MAX).to_be_bytes());
    let mut udp_check = checksum(sum_words(&pseudo), &f[34..]);
    if udp_check == 0 {
        udp_check = 0xffff;
    }
    f[40..42].copy_from_slice(&udp_check.to_be_bytes());
    f
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn checksum(initial: u32, bytes: &[u8]) -> u16 {
    let mut sum = initial + sum_words(bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the IPv4 header and UDP checksums of `frame` (as built by [`udp`]) verify.
pub fn checksums_ok(frame: &[u8]) -> bool {
    let ip_ok = checksum(0, &frame[14..34]) == 0;
    let udp_len = frame.len() - 34;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&frame[26..34]);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&u16::try_from(udp_len).unwrap_or(u16::MAX).to_be_bytes());
    ip_ok && checksum(sum_words(&pseudo), &frame[34..]) == 0
}
