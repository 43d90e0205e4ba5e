//! The control plane of the forwarding modes against the real, loaded XDP program: requests
//! and reloads go in through `Control`, and the test reads what reached the maps (the `Service`
//! value's mode and flags, the port-0 entry of a fragments service, `Backend::port`, `CONFIG`)
//! and, for dsr, where packets land (`BPF_PROG_TEST_RUN`). Each test runs on a thread moved into
//! a network namespace of its own (as in `control.rs`).

mod packet;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use lb_common::{
    BACKEND_F_ALIVE, CONFIG_F_NAT, FORWARD_DSR, FORWARD_FULLNAT, FORWARD_GUE, FORWARD_IPIP,
    FORWARD_NAT, SERVICE_F_FRAGMENTS,
};
use lb_userspace::{
    api::{
        BackendState, CheckKind, Forward, HealthCheck, Request, Response, Scheduler, ServiceAddr,
    },
    daemon::{
        Control, Routed,
        config::{RoutedSettings, ServiceSettings},
    },
    dataplane::ServiceKey,
};
use packet::{
    FakeProber, Frame, backend_ip, enter_control_netns, small_dataplane, through_balancer,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn svc(s: &str) -> ServiceAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> ServiceKey {
    lb_userspace::daemon::service_key(&svc(s)).unwrap()
}

struct Bed {
    control: Control<FakeProber>,
    probes: FakeProber,
}

impl Bed {
    /// A new network namespace with `lbc0` (10.99.0.2/24) and neighbour entries for backends
    /// 1..=`with_mac`; a small balancer loaded, nothing configured.
    fn new(with_mac: u8) -> Self {
        enter_control_netns(with_mac);
        let probes = FakeProber::default();
        let control = Control::new(small_dataplane(), "lbc0".into(), probes.clone());
        Bed { control, probes }
    }

    fn handle(&mut self, request: Request) -> Result<(), String> {
        match self.control.handle(request) {
            Response::Ok => Ok(()),
            Response::Error { message } => Err(message),
            other => panic!("{other:?}"),
        }
    }

    fn add_service(&mut self, s: &str, scheduler: Scheduler, forward: Forward, fragments: bool) {
        self.try_add_service(s, scheduler, forward, fragments)
            .unwrap_or_else(|e| panic!("adding {s}: {e}"));
    }

    fn try_add_service(
        &mut self,
        s: &str,
        scheduler: Scheduler,
        forward: Forward,
        fragments: bool,
    ) -> Result<(), String> {
        self.handle(Request::ServiceAdd {
            service: svc(s),
            scheduler,
            forward,
            health: HealthCheck::default(),
            fragments,
        })
    }

    fn add_backend(&mut self, s: &str, n: u8, port: Option<u16>) -> Result<(), String> {
        self.handle(Request::BackendAdd {
            service: svc(s),
            ip: backend_ip(n),
            weight: 1,
            port,
        })
    }

    /// Plays two successful probes (rise) for backend `n` of service `s`.
    fn up(&mut self, s: &str, n: u8) {
        let key = *self
            .probes
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|k| k.ip == backend_ip(n) && k.service == svc(s))
            .expect("a probe runs for the backend");
        for _ in 0..2 {
            self.control.probe_result(key, Ok(()));
        }
    }

    /// The kernel's entry of the backend at `ip` (found by address among the live ids).
    fn kernel_backend(&mut self, ip: IpAddr) -> lb_common::Backend {
        let IpAddr::V4(v4) = ip else {
            panic!("IPv4 only")
        };
        let dp = self.control.dataplane();
        (0..16)
            .filter_map(|id| dp.backend(id).ok())
            .find(|b| b.generation != 0 && b.addr[..4] == v4.octets())
            .unwrap_or_else(|| panic!("no kernel entry for {ip}"))
    }

    fn service_value(&mut self, s: &str) -> Option<lb_common::Service> {
        self.control.dataplane().service(&key(s)).ok()
    }

    fn fragment_value(&mut self, s: &str) -> Option<lb_common::Service> {
        let frag = lb_userspace::daemon::fragment_key(&svc(s));
        self.control.dataplane().service(&frag).ok()
    }

    fn settings(&self, s: &str) -> ServiceSettings {
        self.control.running()[&svc(s)].settings.clone()
    }
}

fn in_netns(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(body).join().expect("test thread");
}

#[test]
fn a_nat_service_writes_its_mode_and_each_backends_mapped_port() {
    in_netns(|| {
        let mut bed = Bed::new(0);
        let nat = "10.200.0.11:80/tcp";
        bed.add_service(nat, Scheduler::Maglev, Forward::Nat, false);
        let value = bed.service_value(nat).expect("service entry");
        assert_eq!((value.forward, value.flags), (FORWARD_NAT, 0));
        bed.add_backend(nat, 1, Some(8080)).unwrap();
        bed.add_backend(nat, 2, None).unwrap();
        // The service's own port given explicitly is no mapping.
        bed.add_backend(nat, 3, Some(80)).unwrap();
        assert_eq!(bed.kernel_backend(backend_ip(1)).port, 8080u16.to_be());
        assert_eq!(bed.kernel_backend(backend_ip(2)).port, 80u16.to_be());
        assert_eq!(bed.kernel_backend(backend_ip(3)).port, 80u16.to_be());
        assert_eq!(
            bed.control.running()[&svc(nat)].backends[&backend_ip(1)].port,
            Some(8080)
        );
        assert_eq!(
            bed.control.running()[&svc(nat)].backends[&backend_ip(3)].port,
            None
        );

        // No neighbour entry anywhere: a routed mode needs no MAC, so healthy is alive.
        bed.up(nat, 1);
        let b = bed.kernel_backend(backend_ip(1));
        assert_eq!(b.flags & BACKEND_F_ALIVE, BACKEND_F_ALIVE, "{b:?}");
        assert_eq!(b.mac, [0; 6]);
        let Response::Status(status) = bed.control.handle(Request::Status) else {
            panic!("no status");
        };
        let s = &status.services[0];
        assert_eq!(s.forward, Forward::Nat);
        let b1 = s.backends.iter().find(|b| b.ip == backend_ip(1)).unwrap();
        assert_eq!(
            (b1.port, b1.state, b1.in_table),
            (8080, BackendState::Active, true)
        );
        let b2 = s.backends.iter().find(|b| b.ip == backend_ip(2)).unwrap();
        assert_eq!((b2.port, b2.in_table), (80, false), "not healthy yet");

        // dsr still needs the MAC: the same health without one keeps it out.
        let dsr = "10.200.0.12:80/tcp";
        bed.add_service(dsr, Scheduler::Maglev, Forward::Dsr, false);
        bed.add_backend(dsr, 4, None).unwrap();
        bed.up(dsr, 4);
        assert_eq!(bed.kernel_backend(backend_ip(4)).flags & BACKEND_F_ALIVE, 0);

        // Ports only for nat modes, families only where the mode allows.
        let e = bed.add_backend(dsr, 5, Some(8080)).unwrap_err();
        assert!(e.contains("differs from the service port 80"), "{e}");
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        for (s, forward) in [(nat, "nat"), (dsr, "dsr")] {
            let e = bed
                .handle(Request::BackendAdd {
                    service: svc(s),
                    ip: v6,
                    weight: 1,
                    port: None,
                })
                .unwrap_err();
            assert!(
                e.contains(&format!("forwarding mode {forward} needs")),
                "{e}"
            );
        }
        let ipip = "10.200.0.13:80/tcp";
        bed.add_service(ipip, Scheduler::Maglev, Forward::Ipip, false);
        bed.handle(Request::BackendAdd {
            service: svc(ipip),
            ip: v6,
            weight: 1,
            port: None,
        })
        .expect("ipip carries IPv4 in IPv6");
        assert_eq!(bed.service_value(ipip).unwrap().forward, FORWARD_IPIP);
    });
}

#[test]
fn the_fragments_option_writes_the_service_under_port_zero_while_it_is_on() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        let web = "10.200.0.10:80/udp";
        // Refused without source-hash or with a NAT mode; nothing is written then.
        let e = bed
            .try_add_service(web, Scheduler::Maglev, Forward::Dsr, true)
            .unwrap_err();
        assert!(e.contains("needs --scheduler source-hash"), "{e}");
        let e = bed
            .try_add_service(web, Scheduler::SourceHash, Forward::Fullnat, true)
            .unwrap_err();
        assert!(e.contains("not fullnat"), "{e}");
        assert_eq!(bed.control.dataplane().service_keys().unwrap(), vec![]);

        bed.add_service(web, Scheduler::SourceHash, Forward::Gue, true);
        let main = bed.service_value(web).expect("service entry");
        assert_eq!(main.forward, FORWARD_GUE);
        assert_eq!(main.flags, SERVICE_F_FRAGMENTS);
        assert_eq!(
            bed.fragment_value(web),
            Some(main),
            "port-0 entry is the same value"
        );
        // A backend changes the table: both entries switch together.
        bed.add_backend(web, 1, None).unwrap();
        bed.up(web, 1);
        let main = bed.service_value(web).unwrap();
        assert_eq!(bed.fragment_value(web), Some(main));

        // A second service of the VIP and protocol cannot have it too; another protocol can.
        let dns = "10.200.0.10:53/udp";
        let e = bed
            .try_add_service(dns, Scheduler::SourceHash, Forward::Dsr, true)
            .unwrap_err();
        assert!(e.contains("already forwards the fragments"), "{e}");
        bed.add_service(
            "10.200.0.10:53/tcp",
            Scheduler::SourceHash,
            Forward::Dsr,
            true,
        );
        assert!(bed.fragment_value("10.200.0.10:53/tcp").is_some());

        // Turned off in place: the port-0 entry goes, the service keeps its id.
        let mut settings = bed.settings(web);
        settings.fragments = false;
        bed.control
            .service_update(svc(web), settings.clone())
            .unwrap();
        assert_eq!(bed.fragment_value(web), None);
        let off = bed.service_value(web).unwrap();
        assert_eq!((off.id, off.flags), (main.id, 0));
        // Now the other service of the VIP may take it.
        bed.add_service(dns, Scheduler::SourceHash, Forward::Dsr, true);
        assert_eq!(bed.fragment_value(web), bed.service_value(dns));
        bed.handle(Request::ServiceDel { service: svc(dns) })
            .unwrap();
        assert_eq!(bed.fragment_value(web), None, "removed with its service");

        // On again, then deleted with the service.
        settings.fragments = true;
        bed.control.service_update(svc(web), settings).unwrap();
        assert_eq!(bed.fragment_value(web), bed.service_value(web));
        bed.handle(Request::ServiceDel { service: svc(web) })
            .unwrap();
        assert_eq!(bed.fragment_value(web), None);
        let keys = bed.control.dataplane().service_keys().unwrap();
        let other = "10.200.0.10:53/tcp";
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.contains(&key(other)));
        assert!(keys.contains(&lb_userspace::daemon::fragment_key(&svc(other))));
    });
}

#[test]
fn config_is_written_with_the_nat_flag_only_while_a_nat_service_exists() {
    in_netns(|| {
        let mut bed = Bed::new(0);
        let forwarding = || {
            std::fs::read_to_string("/proc/sys/net/ipv4/conf/lbc0/forwarding")
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(forwarding(), "0");
        let given = RoutedSettings {
            encap_source4: Some("192.0.2.1".parse().unwrap()),
            gue_port: Some(7000),
            snat_ports: Some((30000, 30999)),
            ..Default::default()
        };
        // lbc0's address stands in for the interface's (the daemon reads it at start).
        let routed = Routed::resolve(given, &["10.99.0.2".parse().unwrap()]);
        bed.control.set_routed(routed).unwrap();
        let config = bed.control.dataplane().config().unwrap();
        assert_eq!(config.encap_src4.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(config.snat4.to_ne_bytes(), [10, 99, 0, 2]);
        assert_eq!(config.encap_src6, [0; 4], "lbc0 has no global IPv6 address");
        assert_eq!(config.gue_port, 7000u16.to_be());
        assert_eq!((config.snat_port_min, config.snat_port_max), (30000, 30999));
        assert_eq!(config.flags, 0);
        assert_eq!(forwarding(), "0", "no routed service yet");

        let web = "10.200.0.10:80/tcp";
        bed.add_service(web, Scheduler::Maglev, Forward::Dsr, false);
        assert_eq!(bed.control.dataplane().config().unwrap().flags, 0);
        assert_eq!(forwarding(), "0", "dsr needs no forwarding");

        let api = "10.200.0.20:443/tcp";
        bed.add_service(api, Scheduler::Maglev, Forward::Fullnat, false);
        assert_eq!(
            bed.control.dataplane().config().unwrap().flags,
            CONFIG_F_NAT
        );
        assert_eq!(forwarding(), "1", "a routed mode turns forwarding on");
        assert_eq!(bed.service_value(api).unwrap().forward, FORWARD_FULLNAT);

        // nat -> ipip in place: the flag goes with the last NAT service.
        let mut settings = bed.settings(api);
        settings.forward = Forward::Ipip;
        bed.control
            .service_update(svc(api), settings.clone())
            .unwrap();
        assert_eq!(bed.control.dataplane().config().unwrap().flags, 0);
        settings.forward = Forward::Nat;
        bed.control.service_update(svc(api), settings).unwrap();
        assert_eq!(
            bed.control.dataplane().config().unwrap().flags,
            CONFIG_F_NAT
        );
        bed.handle(Request::ServiceDel { service: svc(api) })
            .unwrap();
        assert_eq!(bed.control.dataplane().config().unwrap().flags, 0);

        // A routed service needing a source address there is none of is refused.
        let v6vip = "[2001:db8::10]:80/tcp";
        let e = bed
            .try_add_service(v6vip, Scheduler::Maglev, Forward::Fullnat, false)
            .unwrap_err();
        assert!(
            e.contains("fullnat needs an IPv6 SNAT address") && e.contains("--snat6"),
            "{e}"
        );
        bed.add_service(v6vip, Scheduler::Maglev, Forward::Gue, false);
        let e = bed
            .handle(Request::BackendAdd {
                service: svc(v6vip),
                ip: "2001:db8:1::2".parse().unwrap(),
                weight: 1,
                port: None,
            })
            .unwrap_err();
        assert!(e.contains("--encap-source6"), "{e}");
        bed.add_backend(v6vip, 1, None)
            .expect("IPv6 in IPv4 has a source");
        // The check covers what is already configured, too (the daemon's start).
        let bare = Routed::resolve(RoutedSettings::default(), &[]);
        let e = bed.control.set_routed(bare).unwrap_err().to_string();
        assert!(e.contains("--encap-source4"), "{e}");
    });
}

#[test]
fn a_reload_changing_the_mode_rewrites_the_service_in_place() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        let dir: PathBuf =
            std::env::temp_dir().join(format!("lb-fwd-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lb.toml");
        bed.control.set_config_file(file.clone());
        let service = "10.200.0.10:80/tcp";
        let write = |forward: &str, extra: &str, backend1: &str| {
            std::fs::write(
                &file,
                format!(
                    "[[service]]\naddress = \"{service}\"\nscheduler = \"source-hash\"\n\
                     forward = \"{forward}\"\n{extra}health_check = {{ check = {{ type = \"none\" }} }}\n\
                     [[service.backend]]\naddress = \"{backend1}\"\n\
                     [[service.backend]]\naddress = \"{}\"\n",
                    backend_ip(2)
                ),
            )
            .unwrap();
        };
        let reload = |bed: &mut Bed| match bed.control.handle(Request::Reload) {
            Response::Reloaded { changes, .. } => changes,
            other => panic!("reload: {other:?}"),
        };
        write("dsr", "", &backend_ip(1).to_string());
        reload(&mut bed);
        let before = bed.service_value(service).unwrap();
        assert_eq!(before.forward, FORWARD_DSR);
        let frame = Frame::tcp(CLIENT, 4000, Ipv4Addr::new(10, 200, 0, 10), 80).build();
        let first = through_balancer(bed.control.dataplane(), &frame);
        assert!(matches!(first, Some(1 | 2)), "{first:?}");

        // dsr -> gue with fragments: the same service (id) with the new mode and flag.
        write("gue", "fragments = true\n", &backend_ip(1).to_string());
        assert_eq!(
            reload(&mut bed),
            [format!(
                "{service}: settings now scheduler source-hash, forward gue, fragments, health \
                 check every 1s (timeout 1s, rise 2, fall 2)"
            )]
        );
        let gue = bed.service_value(service).unwrap();
        assert_eq!(
            (gue.id, gue.forward, gue.flags),
            (before.id, FORWARD_GUE, SERVICE_F_FRAGMENTS)
        );
        assert_eq!(bed.fragment_value(service), Some(gue));

        // gue -> nat with backend 1 on port 8080: fragments off (nat cannot have them),
        // backend 1 re-added with its port.
        write("nat", "", &format!("{}:8080", backend_ip(1)));
        let changes = reload(&mut bed);
        assert_eq!(
            changes,
            [
                format!("{service}: backend {} removed", backend_ip(1)),
                format!(
                    "{service}: settings now scheduler source-hash, forward nat, health check \
                     every 1s (timeout 1s, rise 2, fall 2)"
                ),
                format!(
                    "{service}: backend {} added (port 8080, weight 1)",
                    backend_ip(1)
                ),
            ]
        );
        let nat = bed.service_value(service).unwrap();
        assert_eq!(
            (nat.id, nat.forward, nat.flags),
            (before.id, FORWARD_NAT, 0)
        );
        assert_eq!(bed.fragment_value(service), None);
        assert_eq!(bed.kernel_backend(backend_ip(1)).port, 8080u16.to_be());
        assert_eq!(bed.kernel_backend(backend_ip(2)).port, 80u16.to_be());

        // A file asking for something the mode forbids changes nothing.
        write("dsr", "", &format!("{}:8080", backend_ip(1)));
        let Response::Error { message } = bed.control.handle(Request::Reload) else {
            panic!("accepted a mapped port under dsr");
        };
        assert!(
            message.contains("only nat and fullnat map ports"),
            "{message}"
        );
        assert_eq!(bed.service_value(service), Some(nat));

        // And back to dsr: backend 1 is re-added on the service port; packets flow again.
        write("dsr", "", &backend_ip(1).to_string());
        reload(&mut bed);
        let dsr = bed.service_value(service).unwrap();
        assert_eq!((dsr.id, dsr.forward), (before.id, FORWARD_DSR));
        assert_eq!(bed.kernel_backend(backend_ip(1)).port, 80u16.to_be());
        let again = through_balancer(bed.control.dataplane(), &frame);
        assert!(matches!(again, Some(1 | 2)), "{again:?}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Backends of a `none`-checked routed service are alive at once, without a MAC.
#[test]
fn none_checked_backends_of_routed_modes_are_alive_without_a_mac() {
    in_netns(|| {
        let mut bed = Bed::new(0);
        let s = "10.200.0.10:80/tcp";
        bed.handle(Request::ServiceAdd {
            service: svc(s),
            scheduler: Scheduler::Maglev,
            forward: Forward::Ipip,
            health: HealthCheck {
                kind: CheckKind::None,
                ..HealthCheck::default()
            },
            fragments: false,
        })
        .unwrap();
        bed.add_backend(s, 1, None).unwrap();
        assert_eq!(
            bed.kernel_backend(backend_ip(1)).flags & BACKEND_F_ALIVE,
            BACKEND_F_ALIVE
        );
    });
}
