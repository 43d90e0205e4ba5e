//! The daemon's control logic against the real, loaded XDP program: requests and health results
//! go in through `Control`, packets go through the program with `BPF_PROG_TEST_RUN`, and the test
//! checks where they land. Backend MACs come from the kernel's neighbour table, so each test runs
//! on a thread moved into a network namespace of its own with permanent neighbour entries.

mod packet;

use std::net::{IpAddr, Ipv4Addr};

use lb_userspace::{
    api::{
        CheckKind, Forward, HealthCheck, Request, Response, Scheduler, ServiceAddr, Status,
        StatusRange,
    },
    daemon::Control,
    neighbour::parse_mac,
};
use packet::{
    FakeProber, Frame, add_neighbour, backend_ip, backend_mac, enter_control_netns,
    small_dataplane, through_balancer,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

struct Bed {
    control: Control<FakeProber>,
    probes: FakeProber,
    service: ServiceAddr,
    /// Flows whose SYN went through: their later packets are ACKs, as a client's are.
    opened: std::collections::HashSet<u16>,
}

impl Bed {
    /// Moves this thread into a new network namespace with interface `lbc0` and neighbour
    /// entries for backends 1..=`with_mac` (backends above that have no known MAC).
    fn new(with_mac: u8) -> Self {
        Self::with_check(with_mac, HealthCheck::default())
    }

    /// [`Bed::new`] with the service's health check set to `health`.
    fn with_check(with_mac: u8, health: HealthCheck) -> Self {
        enter_control_netns(with_mac);
        let dp = small_dataplane();
        let probes = FakeProber::default();
        let mut control = Control::new(dp, "lbc0".into(), probes.clone());
        let service: ServiceAddr = format!("{VIP}:80/tcp").parse().unwrap();
        assert_eq!(
            control.handle(Request::ServiceAdd {
                service,
                scheduler: Scheduler::Maglev,
                forward: Forward::Dsr,
                health,
                fragments: false,
            }),
            Response::Ok
        );
        Bed {
            control,
            probes,
            service,
            opened: Default::default(),
        }
    }

    fn ok(&mut self, request: Request) {
        assert_eq!(
            self.control.handle(request.clone()),
            Response::Ok,
            "{request:?}"
        );
    }

    fn add(&mut self, n: u8) {
        let (service, ip) = (self.service, backend_ip(n));
        self.ok(Request::BackendAdd {
            service,
            ip,
            weight: 1,
            port: None,
        });
    }

    /// Plays `count` probe results for backend `n`.
    fn probe(&mut self, n: u8, ok: bool, count: u32) {
        let key = *self
            .probes
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|k| k.ip == backend_ip(n))
            .expect("a probe runs for the backend");
        for _ in 0..count {
            let outcome = if ok {
                Ok(())
            } else {
                Err("refused".to_string())
            };
            self.control.probe_result(key, outcome);
        }
    }

    fn up(&mut self, n: u8) {
        self.add(n);
        self.probe(n, true, 2);
    }

    fn status(&mut self) -> Status {
        match self.control.handle(Request::Status) {
            Response::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Sends one packet of flow `sport` (a SYN until one goes through, then ACKs); returns the
    /// backend number it went to, or None if dropped.
    fn send(&mut self, sport: u16) -> Option<u8> {
        let flags = if self.opened.contains(&sport) {
            ACK
        } else {
            SYN
        };
        let to = self.send_flags(sport, flags);
        if to.is_some() {
            self.opened.insert(sport);
        }
        to
    }

    fn spread(&mut self, flows: std::ops::Range<u16>) -> [u32; 10] {
        let mut seen = [0; 10];
        for sport in flows {
            if let Some(b) = self.send(sport) {
                seen[b as usize] += 1;
            }
        }
        seen
    }
}

/// A permanent neighbour entry for backend `n` on `lbc0`.
/// Runs a test body on its own thread, so the namespace it enters dies with it.
fn in_netns(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(body).join().expect("test thread");
}

#[test]
fn backends_enter_the_table_after_rise_successes_and_only_with_a_known_mac() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.add(1);
        bed.add(3); // no neighbour entry
        assert_eq!(bed.send(1), None, "no backend is up yet");
        bed.probe(1, true, 1);
        assert_eq!(bed.send(1), None, "one success is below rise = 2");
        bed.probe(1, true, 1);
        bed.probe(3, true, 2);
        let seen = bed.spread(1000..1300);
        assert_eq!(
            seen[1], 300,
            "all flows to the only backend with a MAC: {seen:?}"
        );
        let s = bed.status();
        let b3 = &s.services[0].backends[1];
        assert_eq!((b3.in_table, b3.mac.clone()), (false, None));
        let b1 = &s.services[0].backends[0];
        assert!(b1.in_table);
        assert_eq!(b1.mac.as_deref().and_then(parse_mac), Some(backend_mac(1)));
        assert_eq!(b1.packets, 300);
    });
}

#[test]
fn a_failed_backend_leaves_after_fall_failures_and_its_flows_move() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let before = bed.spread(2000..2400);
        assert!(before[1] > 120 && before[2] > 120, "{before:?}");
        bed.probe(2, false, 1);
        assert_eq!(
            bed.spread(2000..2400),
            before,
            "one failure is below fall = 2"
        );
        bed.probe(2, false, 1);
        let after = bed.spread(2000..2400);
        assert_eq!(
            after[1], 400,
            "every flow, old or new, on the survivor: {after:?}"
        );
        assert_eq!(
            bed.status().services[0].backends[1].last_error.as_deref(),
            Some("refused")
        );
        // Recovery after rise successes: new flows reach it again.
        bed.probe(2, true, 2);
        let recovered = bed.spread(5000..5400);
        assert!(recovered[2] > 120, "{recovered:?}");
    });
}

#[test]
fn established_flows_stay_when_backends_are_added() {
    in_netns(|| {
        let mut bed = Bed::new(4);
        bed.up(1);
        bed.up(2);
        let flows: Vec<(u16, u8)> = (3000..3300).map(|p| (p, bed.send(p).unwrap())).collect();
        bed.up(3);
        bed.up(4);
        for (sport, backend) in &flows {
            assert_eq!(bed.send(*sport), Some(*backend), "flow {sport} moved");
        }
        let fresh = bed.spread(9000..9800);
        assert!(
            fresh[3] > 100 && fresh[4] > 100,
            "new backends get new flows: {fresh:?}"
        );
    });
}

#[test]
fn drained_backends_keep_their_flows_and_get_no_new_ones() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let flows: Vec<(u16, u8)> = (4000..4200).map(|p| (p, bed.send(p).unwrap())).collect();
        let (service, ip) = (bed.service, backend_ip(2));
        bed.ok(Request::BackendDrain {
            service,
            ip,
            timeout_ms: None,
        });
        for (sport, backend) in &flows {
            assert_eq!(bed.send(*sport), Some(*backend), "flow {sport} moved");
        }
        assert_eq!(
            bed.spread(10000..10300)[1],
            300,
            "new flows avoid the drained backend"
        );
        let s = bed.status();
        assert_eq!(
            serde_json::to_value(s.services[0].backends[1].state).unwrap(),
            "draining"
        );
    });
}

#[test]
fn a_deleted_backend_loses_its_flows_and_its_address_can_return() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let (service, ip) = (bed.service, backend_ip(2));
        bed.ok(Request::BackendDel { service, ip });
        assert_eq!(bed.spread(6000..6300)[1], 300);
        assert!(
            bed.probes.0.lock().unwrap().iter().all(|k| k.ip != ip),
            "probe stopped"
        );
        bed.up(2);
        // Flows 6000.. are now pinned to backend 1; fresh flows reach the returning backend.
        assert_eq!(bed.spread(6000..6300)[1], 300);
        assert!(bed.spread(7000..7300)[2] > 100);
    });
}

#[test]
fn refused_requests_change_nothing() {
    in_netns(|| {
        let mut bed = Bed::new(1);
        bed.up(1);
        let before = bed.status();
        let service = bed.service;
        let other: ServiceAddr = "10.200.0.99:80/tcp".parse().unwrap();
        let refused = [
            Request::BackendAdd {
                service,
                ip: backend_ip(1),
                weight: 1,
                port: None,
            },
            Request::BackendAdd {
                service: other,
                ip: backend_ip(2),
                weight: 1,
                port: None,
            },
            Request::BackendAdd {
                service,
                ip: "127.0.0.1".parse().unwrap(),
                weight: 1,
                port: None,
            },
            Request::BackendAdd {
                service,
                ip: "0.0.0.0".parse().unwrap(),
                weight: 1,
                port: None,
            },
            Request::BackendAdd {
                service,
                ip: IpAddr::V4(VIP),
                weight: 1,
                port: None,
            },
            Request::BackendAdd {
                service,
                ip: backend_ip(5),
                weight: 10_001,
                port: None,
            },
            Request::BackendDel {
                service,
                ip: backend_ip(7),
            },
            Request::BackendDrain {
                service: other,
                ip: backend_ip(1),
                timeout_ms: None,
            },
            Request::ServiceDel { service: other },
            Request::ServiceAdd {
                service,
                scheduler: Scheduler::Maglev,
                forward: Forward::Dsr,
                health: HealthCheck::default(),
                fragments: false,
            },
            Request::BackendSet {
                service,
                ip: backend_ip(7),
                weight: 2,
            },
            Request::BackendSet {
                service: other,
                ip: backend_ip(1),
                weight: 2,
            },
            Request::BackendSet {
                service,
                ip: backend_ip(1),
                weight: 10_001,
            },
            // A check the CLI would refuse, sent straight to the daemon.
            Request::ServiceAdd {
                service: other,
                scheduler: Scheduler::Maglev,
                forward: Forward::Dsr,
                health: HealthCheck {
                    kind: CheckKind::Http {
                        path: "health".into(),
                        status: StatusRange::default(),
                        host: None,
                    },
                    ..HealthCheck::default()
                },
                fragments: false,
            },
        ];
        for request in refused {
            let Response::Error { message } = bed.control.handle(request.clone()) else {
                panic!("{request:?} was accepted");
            };
            assert!(!message.contains('\n'), "one-line error: {message}");
        }
        assert_eq!(bed.status(), before);
        assert_eq!(bed.spread(1..200)[1], 199);
    });
}

#[test]
fn running_out_of_service_slots_is_refused_cleanly() {
    in_netns(|| {
        let mut bed = Bed::new(0);
        for i in 1..4 {
            let service = format!("10.200.1.{i}:80/tcp").parse().unwrap();
            bed.ok(Request::ServiceAdd {
                service,
                scheduler: Scheduler::Maglev,
                forward: Forward::Dsr,
                health: HealthCheck::default(),
                fragments: false,
            });
        }
        let service = "10.200.1.9:80/tcp".parse().unwrap();
        let r = bed.control.handle(Request::ServiceAdd {
            service,
            scheduler: Scheduler::Maglev,
            forward: Forward::Dsr,
            health: HealthCheck::default(),
            fragments: false,
        });
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
        // Deleting one frees its slot and its table.
        let gone = "10.200.1.2:80/tcp".parse().unwrap();
        bed.ok(Request::ServiceDel { service: gone });
        bed.ok(Request::ServiceAdd {
            service,
            scheduler: Scheduler::Maglev,
            forward: Forward::Dsr,
            health: HealthCheck::default(),
            fragments: false,
        });
        assert_eq!(bed.status().services.len(), 4);
    });
}

#[test]
fn backend_set_weight_changes_the_spread_live_and_zero_drains() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let (service, ip) = (bed.service, backend_ip(2));
        let even = bed.spread(20000..22000);
        assert!((900..=1100).contains(&even[2]), "equal weights: {even:?}");
        let flows: Vec<(u16, u8)> = (20000..20400).map(|p| (p, bed.send(p).unwrap())).collect();

        bed.ok(Request::BackendSet {
            service,
            ip,
            weight: 3,
        });
        let weighted = bed.spread(30000..32000);
        assert!(
            (1400..=1600).contains(&weighted[2]),
            "weights 1:3 give backend 2 about 3/4 of new flows: {weighted:?}"
        );
        for (sport, backend) in &flows {
            assert_eq!(bed.send(*sport), Some(*backend), "flow {sport} moved");
        }
        let st = bed.status();
        let b2 = &st.services[0].backends[1];
        assert_eq!((b2.weight, b2.in_table), (3, true));
        assert_eq!(serde_json::to_value(b2.state).unwrap(), "active");

        // Weight 0: no new flows, established ones stay, and it reads as draining.
        bed.ok(Request::BackendSet {
            service,
            ip,
            weight: 0,
        });
        assert_eq!(bed.spread(40000..40500)[1], 500, "new flows avoid weight 0");
        for (sport, backend) in &flows {
            assert_eq!(bed.send(*sport), Some(*backend), "flow {sport} moved");
        }
        let st = bed.status();
        let b2 = &st.services[0].backends[1];
        assert_eq!((b2.weight, b2.in_table), (0, false));
        assert_eq!(serde_json::to_value(b2.state).unwrap(), "draining");

        // And back: new flows reach it again.
        bed.ok(Request::BackendSet {
            service,
            ip,
            weight: 1,
        });
        assert!(bed.spread(50000..50600)[2] > 200);
    });
}

#[test]
fn backends_of_a_none_checked_service_are_up_without_probes() {
    in_netns(|| {
        let mut bed = Bed::with_check(
            1,
            HealthCheck {
                kind: CheckKind::None,
                ..HealthCheck::default()
            },
        );
        bed.add(1);
        bed.add(2); // its MAC is not known yet
        assert_eq!(
            bed.spread(1..300)[1],
            299,
            "backend 1 takes traffic with no probe result"
        );
        let st = bed.status();
        let (b1, b2) = (&st.services[0].backends[0], &st.services[0].backends[1]);
        assert_eq!(serde_json::to_value(b1.health).unwrap(), "up");
        assert!(b1.in_table);
        assert_eq!(serde_json::to_value(b2.health).unwrap(), "up");
        assert!(!b2.in_table, "no MAC, not in the table: {b2:?}");
        assert_eq!(
            serde_json::to_value(&st.services[0].health_check.kind).unwrap(),
            serde_json::json!({"type": "none"})
        );
        // Once the neighbour is resolved, the next refresh brings it in.
        add_neighbour(2);
        bed.control.refresh_macs();
        assert!(bed.spread(1000..1600)[2] > 200);
        // A stray probe result cannot take a none-checked backend down.
        bed.probe(1, false, 5);
        assert!(bed.status().services[0].backends[0].in_table);
    });
}

impl Bed {
    /// Sends one packet of flow `sport` with TCP `flags`.
    fn send_flags(&mut self, sport: u16, flags: u8) -> Option<u8> {
        let frame = Frame::tcp(CLIENT, sport, VIP, 80).tcp_flags(flags).build();
        match through_balancer(self.control.dataplane(), &frame) {
            Some(0) => panic!("passed to the kernel"),
            other => other,
        }
    }

    fn backend_state(&mut self, n: u8) -> serde_json::Value {
        let s = self.status();
        let b = s.services[0]
            .backends
            .iter()
            .find(|b| b.ip == backend_ip(n))
            .expect("backend listed")
            .clone();
        serde_json::to_value(b.state).unwrap()
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN_ACK: u8 = 0x11;

#[test]
fn a_drain_completes_when_the_last_flow_closes_and_a_redeploy_ends_it() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let on_2: Vec<u16> = (100..200).filter(|p| bed.send(*p) == Some(2)).collect();
        assert!(!on_2.is_empty());
        let (service, ip) = (bed.service, backend_ip(2));
        bed.ok(Request::BackendDrain {
            service,
            ip,
            timeout_ms: None,
        });
        bed.control.tick_drains();
        assert_eq!(bed.backend_state(2), "draining", "flows still open");
        for p in &on_2 {
            assert_eq!(bed.send_flags(*p, FIN_ACK), Some(2), "closing flows stay");
        }
        bed.control.tick_drains();
        assert_eq!(bed.backend_state(2), "drained");
        // Redeploy: its server stops (checks fail), starts again (checks pass): back in service.
        bed.probe(2, false, 2);
        bed.probe(2, true, 2);
        assert_eq!(bed.backend_state(2), "active");
        assert!(bed.spread(20000..20300)[2] > 100);
    });
}

#[test]
fn a_drain_timeout_moves_the_remaining_flows() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let on_2: Vec<u16> = (300..400).filter(|p| bed.send(*p) == Some(2)).collect();
        let (service, ip) = (bed.service, backend_ip(2));
        bed.ok(Request::BackendDrain {
            service,
            ip,
            timeout_ms: Some(1),
        });
        std::thread::sleep(std::time::Duration::from_millis(5));
        bed.control.tick_drains();
        assert_eq!(bed.backend_state(2), "drained");
        for p in &on_2 {
            assert_eq!(
                bed.send(*p),
                Some(1),
                "flow {p} not moved after the timeout"
            );
        }
    });
}

#[test]
fn recounting_flows_drops_closed_and_stale_ones() {
    in_netns(|| {
        let mut bed = Bed::new(2);
        bed.up(1);
        bed.up(2);
        let placed: Vec<(u16, u8)> = (500..600).map(|p| (p, bed.send(p).unwrap())).collect();
        let closed: Vec<u16> = placed.iter().take(30).map(|(p, _)| *p).collect();
        for p in &closed {
            bed.send_flags(*p, FIN_ACK);
        }
        let want = |n: u8| {
            placed
                .iter()
                .filter(|(p, b)| *b == n && !closed.contains(p))
                .count() as i64
        };
        let counts = |bed: &mut Bed| -> Vec<i64> {
            bed.status().services[0]
                .backends
                .iter()
                .map(|b| b.active_flows)
                .collect()
        };
        assert_eq!(
            counts(&mut bed),
            vec![want(1), want(2)],
            "kernel bookkeeping"
        );
        // Skew the kernel's counts, as lost FINs or evictions would; a recount repairs them.
        bed.control.dataplane().set_flow_count(0, 999).unwrap();
        bed.control.dataplane().set_flow_count(1, -5).unwrap();
        bed.control.recount_flows();
        assert_eq!(counts(&mut bed), vec![want(1), want(2)], "recounted");
    });
}

#[test]
fn a_batch_puts_added_backends_in_the_table_at_its_end_and_a_removal_in_it_applies_at_once() {
    in_netns(|| {
        let health = HealthCheck {
            kind: lb_userspace::api::CheckKind::None,
            ..HealthCheck::default()
        };
        let mut bed = Bed::with_check(3, health);
        bed.control.batch(|control| {
            for n in 1..=3 {
                let ip = backend_ip(n);
                let service = bed_service();
                assert_eq!(
                    control.handle(Request::BackendAdd {
                        service,
                        ip,
                        weight: 1,
                        port: None,
                    }),
                    Response::Ok
                );
            }
            // Added in the batch: known to the kernel, not yet in the table.
            let Response::Status(s) = control.handle(Request::Status) else {
                panic!("status");
            };
            assert!(s.services[0].backends.iter().all(|b| !b.in_table));
            // A removal applies at once (the batch's MACs are read at its end).
            assert_eq!(
                control.handle(Request::BackendDel {
                    service: bed_service(),
                    ip: backend_ip(2),
                }),
                Response::Ok
            );
            let Response::Status(s) = control.handle(Request::Status) else {
                panic!("status");
            };
            assert_eq!(s.services[0].backends.len(), 2);
        });
        let Response::Status(s) = bed.control.handle(Request::Status) else {
            panic!("status");
        };
        assert!(s.services[0].backends.iter().all(|b| b.in_table));
        let seen = bed.spread(1000..1600);
        assert_eq!(seen[2], 0, "{seen:?}");
        assert!(seen[1] > 200 && seen[3] > 200, "{seen:?}");
    });
}

fn bed_service() -> ServiceAddr {
    format!("{VIP}:80/tcp").parse().unwrap()
}

#[test]
fn probe_results_taken_in_one_batch_change_the_table_once_at_its_end() {
    in_netns(|| {
        let mut bed = Bed::new(3);
        for n in 1..=3 {
            bed.add(n);
        }
        let keys = bed.probes.0.lock().unwrap().clone();
        let key_of = |n: u8| *keys.iter().find(|k| k.ip == backend_ip(n)).unwrap();
        // As the daemon's loop takes results that queued together: all up, then 3 fails.
        let before_end = bed.control.batch(|control| {
            for n in 1..=3 {
                control.probe_result(key_of(n), Ok(()));
                control.probe_result(key_of(n), Ok(()));
            }
            for _ in 0..2 {
                control.probe_result(key_of(3), Err("refused".into()));
            }
            // What the kernel's table says yet: no backend (a new flow is dropped).
            let syn = Frame::tcp(CLIENT, 999, VIP, 80).tcp_flags(SYN).build();
            through_balancer(control.dataplane(), &syn)
        });
        assert_eq!(before_end, None, "the table changed before the batch ended");
        let spread = bed.spread(1000..1600);
        assert_eq!(spread[3], 0, "backend 3 failed in the batch");
        assert!(spread[1] > 200 && spread[2] > 200, "{spread:?}");
    });
}
