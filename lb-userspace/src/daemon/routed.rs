//! Settings of the routed forwarding modes (ipip, gue, nat, fullnat): the source addresses the
//! balancer writes, resolved from the daemon's options and its interface's addresses, and the
//! `CONFIG` value the XDP program reads them from.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{CONFIG_F_NAT, DataplaneConfig};

use super::config::{DEFAULT_SNAT_PORTS, RoutedSettings};
use crate::api::{Forward, ServiceAddr};

/// The routed modes' settings with every default filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routed {
    /// As given on the command line and in the file (for `lb config dump`).
    pub given: RoutedSettings,
    pub encap_source4: Option<Ipv4Addr>,
    pub encap_source6: Option<Ipv6Addr>,
    pub encap_source_hash_bits: u8,
    pub gue_port: u16,
    pub snat4: Option<Ipv4Addr>,
    pub snat6: Option<Ipv6Addr>,
    pub snat_ports: (u16, u16),
    /// `DataplaneConfig::syn_guard`.
    pub syn_guard: u32,
}

impl Routed {
    /// Fills what `given` leaves out: source addresses from `iface_addrs` (the first
    /// interface's, in its order; IPv6 link-local and loopback addresses are skipped, since
    /// routed packets cannot come from them), the rest from the built-in defaults.
    pub fn resolve(given: RoutedSettings, iface_addrs: &[IpAddr]) -> Routed {
        let first4 = iface_addrs.iter().find_map(|a| match a {
            IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => Some(*v4),
            _ => None,
        });
        let first6 = iface_addrs.iter().find_map(|a| match a {
            IpAddr::V6(v6)
                if !v6.is_loopback() && !v6.is_unspecified() && !v6.is_unicast_link_local() =>
            {
                Some(*v6)
            }
            _ => None,
        });
        Routed {
            given,
            encap_source4: given.encap_source4.or(first4),
            encap_source6: given.encap_source6.or(first6),
            encap_source_hash_bits: given.encap_source_hash_bits.unwrap_or(0),
            gue_port: given.gue_port.unwrap_or(lb_common::DEFAULT_GUE_PORT),
            snat4: given.snat4.or(first4),
            snat6: given.snat6.or(first6),
            snat_ports: given.snat_ports.unwrap_or(DEFAULT_SNAT_PORTS),
            syn_guard: given.syn_guard.unwrap_or(lb_common::DEFAULT_SYN_GUARD),
        }
    }

    /// The `CONFIG` value; `nat`: some service uses nat or fullnat.
    pub fn kernel(&self, nat: bool) -> DataplaneConfig {
        let v4 = |a: Option<Ipv4Addr>| a.map_or(0, |a| u32::from_ne_bytes(a.octets()));
        let v6 = |a: Option<Ipv6Addr>| a.map_or([0; 4], |a| super::ipv6_words(&a));
        DataplaneConfig {
            encap_src4: v4(self.encap_source4),
            encap_src6: v6(self.encap_source6),
            encap_src_hash_bits: self.encap_source_hash_bits,
            _pad0: 0,
            gue_port: self.gue_port.to_be(),
            snat4: v4(self.snat4),
            snat6: v6(self.snat6),
            snat_port_min: self.snat_ports.0,
            snat_port_max: self.snat_ports.1,
            flags: if nat { CONFIG_F_NAT } else { 0 },
            syn_guard: self.syn_guard,
        }
    }

    /// Why a service forwarded with `forward` to `backends` cannot work with these settings:
    /// ipip and gue need an outer source of each backend's family, fullnat an SNAT address of
    /// the VIP's family.
    pub fn check_sources(
        &self,
        service: &ServiceAddr,
        forward: Forward,
        mut backends: impl Iterator<Item = IpAddr>,
    ) -> Result<(), String> {
        match forward {
            Forward::Ipip | Forward::Gue => {
                if let Some(ip) = backends.find(|ip| match ip {
                    IpAddr::V4(_) => self.encap_source4.is_none(),
                    IpAddr::V6(_) => self.encap_source6.is_none(),
                }) {
                    let (family, flag) = family(ip, "--encap-source");
                    return Err(format!(
                        "service {service}: {} to backend {ip} needs an outer {family} source \
                         address: the interface has none; pass {flag}",
                        forward.name()
                    ));
                }
            }
            Forward::Fullnat => {
                let missing = match service.vip {
                    IpAddr::V4(_) => self.snat4.is_none(),
                    IpAddr::V6(_) => self.snat6.is_none(),
                };
                if missing {
                    let (family, flag) = family(service.vip, "--snat");
                    return Err(format!(
                        "service {service}: fullnat needs an {family} SNAT address: the \
                         interface has none; pass {flag}"
                    ));
                }
            }
            Forward::Dsr | Forward::Nat => {}
        }
        Ok(())
    }
}

fn family(ip: IpAddr, flag: &str) -> (&'static str, String) {
    if ip.is_ipv4() {
        ("IPv4", format!("{flag}4"))
    } else {
        ("IPv6", format!("{flag}6"))
    }
}

/// Turns on IPv4 and IPv6 forwarding on each interface: the program's FIB lookups (an input
/// lookup from the ingress interface) fail with "forwarding disabled" otherwise. An interface
/// without IPv6 has no IPv6 switch; that is not an error.
pub fn enable_forwarding(ifaces: &[String]) -> Result<(), String> {
    for iface in ifaces {
        let v4 = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
        std::fs::write(&v4, "1").map_err(|e| format!("turning on {v4}: {e}"))?;
        let v6 = format!("/proc/sys/net/ipv6/conf/{iface}/forwarding");
        match std::fs::write(&v6, "1") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("turning on {v6}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn sources_default_to_the_interfaces_first_usable_addresses() {
        let r = Routed::resolve(
            RoutedSettings::default(),
            &addrs(&["fe80::1", "192.0.2.1", "2001:db8::1", "192.0.2.2"]),
        );
        assert_eq!(r.encap_source4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(r.encap_source6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!((r.snat4, r.snat6), (r.encap_source4, r.encap_source6));
        assert_eq!(r.gue_port, lb_common::DEFAULT_GUE_PORT);
        assert_eq!(r.snat_ports, (61000, 65535));
        assert_eq!(r.encap_source_hash_bits, 0);
        // Given values win.
        let given = RoutedSettings {
            encap_source4: Some("198.51.100.1".parse().unwrap()),
            snat6: Some("2001:db8::99".parse().unwrap()),
            gue_port: Some(9000),
            snat_ports: Some((1024, 2047)),
            encap_source_hash_bits: Some(8),
            ..Default::default()
        };
        let r = Routed::resolve(given, &addrs(&["192.0.2.1"]));
        assert_eq!(r.encap_source4, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(r.snat4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(r.encap_source6, None);
        assert_eq!(r.snat6, Some("2001:db8::99".parse().unwrap()));
        assert_eq!(r.given, given);
        let k = r.kernel(true);
        assert_eq!(k.encap_src4.to_ne_bytes(), [198, 51, 100, 1]);
        assert_eq!(k.snat4.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(k.encap_src6, [0; 4]);
        assert_eq!(k.snat6[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(k.snat6[3].to_ne_bytes(), [0, 0, 0, 0x99]);
        assert_eq!(k.gue_port, 9000u16.to_be());
        assert_eq!((k.snat_port_min, k.snat_port_max), (1024, 2047));
        assert_eq!(k.encap_src_hash_bits, 8);
        assert_eq!(k.flags, CONFIG_F_NAT);
        assert_eq!(
            k.syn_guard,
            lb_common::DEFAULT_SYN_GUARD,
            "the SYN-flood guard is on"
        );
        let off = Routed::resolve(
            RoutedSettings {
                syn_guard: Some(0),
                ..given
            },
            &[],
        );
        assert_eq!(off.kernel(false).syn_guard, 0);
        assert_eq!(r.kernel(false).flags, 0);
    }

    #[test]
    fn a_routed_service_needs_a_source_of_the_family_it_sends() {
        let only4 = Routed::resolve(RoutedSettings::default(), &addrs(&["192.0.2.1"]));
        let v4: ServiceAddr = "10.0.0.10:80/tcp".parse().unwrap();
        let v6: ServiceAddr = "[2001:db8::10]:80/tcp".parse().unwrap();
        let b4: IpAddr = "10.0.1.2".parse().unwrap();
        let b6: IpAddr = "2001:db8:1::2".parse().unwrap();
        for f in [Forward::Ipip, Forward::Gue] {
            assert_eq!(only4.check_sources(&v6, f, [b4].into_iter()), Ok(()));
            let e = only4
                .check_sources(&v4, f, [b4, b6].into_iter())
                .unwrap_err();
            assert!(e.contains("--encap-source6"), "{e}");
        }
        assert_eq!(
            only4.check_sources(&v4, Forward::Fullnat, std::iter::empty()),
            Ok(())
        );
        let e = only4
            .check_sources(&v6, Forward::Fullnat, std::iter::empty())
            .unwrap_err();
        assert!(e.contains("--snat6"), "{e}");
        for f in [Forward::Dsr, Forward::Nat] {
            assert_eq!(only4.check_sources(&v6, f, [b6].into_iter()), Ok(()));
        }
    }
}
