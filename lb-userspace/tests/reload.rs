//! Configuration reloads against the real, loaded XDP program: a file is written, `Control`
//! reloads it as `lb reload` does, and packets go through the program with
//! `BPF_PROG_TEST_RUN` to show where flows land before and after. Each test runs on a thread
//! moved into a network namespace of its own, with permanent neighbour entries for the
//! backends' MACs (as in `control.rs`).

mod packet;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use lb_userspace::{
    api::{HealthCheck, Request, Response, ServiceAddr, Status},
    daemon::{
        Change, Control, ProbeKey, Prober,
        config::{BackendConfig, Config},
    },
    dataplane::{Dataplane, Sizing},
};
use packet::{Frame, enter_control_netns, small_dataplane, through_balancer};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const SERVICE: &str = "10.200.0.10:80/tcp";

fn backend_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 10 + n)
}

/// Records the probes running now, with their settings; the test plays their results.
#[derive(Clone, Default)]
struct FakeProber(Arc<Mutex<Vec<(ProbeKey, HealthCheck)>>>);

impl Prober for FakeProber {
    type Handle = ProbeKey;
    fn start(
        &mut self,
        key: ProbeKey,
        _: lb_userspace::daemon::ProbeTarget,
        check: HealthCheck,
    ) -> ProbeKey {
        self.0.lock().unwrap().push((key, check));
        key
    }
    fn stop(&mut self, handle: ProbeKey) {
        self.0.lock().unwrap().retain(|(k, _)| *k != handle);
    }
}

struct Bed {
    control: Control<FakeProber>,
    probes: FakeProber,
    dir: PathBuf,
    file: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A service block for the file: `backends` as (number, weight).
fn service_toml(backends: &[(u8, u32)]) -> String {
    let mut text = format!(
        "[daemon]\ninterface = \"lbc0\"\n\n[[service]]\naddress = \"{SERVICE}\"\n\
         health_check = {{ interval = \"1s\", timeout = \"1s\", rise = 2, fall = 2 }}\n"
    );
    for (n, weight) in backends {
        text += &format!(
            "\n[[service.backend]]\naddress = \"{}\"\nweight = {weight}\n",
            backend_ip(*n)
        );
    }
    text
}

impl Bed {
    /// Moves this thread into a new network namespace with interface `lbc0` and neighbour
    /// entries for backends 1..=9; loads the program (4 services, 16 backends at most) and
    /// names a configuration file, not yet written.
    fn new(name: &str) -> Self {
        enter_control_netns(9);
        let dp = small_dataplane();
        let probes = FakeProber::default();
        let mut control = Control::new(dp, "lbc0".into(), probes.clone());
        let dir = std::env::temp_dir().join(format!("lb-reload-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lb.toml");
        control.set_config_file(file.clone());
        Bed {
            control,
            probes,
            dir,
            file,
        }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.file, text).unwrap();
    }

    /// Reloads; expects success and returns the changes.
    fn reload(&mut self) -> Vec<String> {
        match self.control.handle(Request::Reload) {
            Response::Reloaded { changes, .. } => changes,
            other => panic!("reload: {other:?}"),
        }
    }

    /// Reloads; expects a refusal and returns its one line.
    fn reload_err(&mut self) -> String {
        match self.control.handle(Request::Reload) {
            Response::Error { message } => {
                assert!(!message.contains('\n'), "one line: {message}");
                message
            }
            other => panic!("reload accepted: {other:?}"),
        }
    }

    /// Plays `count` probe results for backend `n`.
    fn probe(&mut self, n: u8, ok: bool, count: u32) {
        let key = self
            .probes
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| k.ip == IpAddr::V4(backend_ip(n)))
            .map(|(k, _)| *k)
            .expect("a probe runs for the backend");
        for _ in 0..count {
            let outcome = if ok { Ok(()) } else { Err("refused".into()) };
            self.control.probe_result(key, outcome);
        }
    }

    fn status(&mut self) -> Status {
        match self.control.handle(Request::Status) {
            Response::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Sends one packet of flow `sport` to `vip:port`; returns the backend number it went to,
    /// `None` if dropped, `Some(0)` if passed to the kernel (no such service).
    /// Sends a SYN of flow `sport`; returns the backend number it went to.
    fn send_to(&mut self, vip: Ipv4Addr, port: u16, sport: u16) -> Option<u8> {
        let frame = Frame::tcp(CLIENT, sport, vip, port).build();
        through_balancer(self.control.dataplane(), &frame)
    }

    /// Sends a later packet (an ACK) of flow `sport`.
    fn send_ack(&mut self, sport: u16) -> Option<u8> {
        let frame = Frame::tcp(CLIENT, sport, VIP, 80).tcp_flags(0x10).build();
        through_balancer(self.control.dataplane(), &frame)
    }

    fn send(&mut self, sport: u16) -> Option<u8> {
        self.send_to(VIP, 80, sport)
    }

    fn flows(&mut self, sports: std::ops::Range<u16>) -> Vec<(u16, Option<u8>)> {
        sports.map(|p| (p, self.send(p))).collect()
    }

    fn spread(&mut self, sports: std::ops::Range<u16>) -> [u32; 10] {
        let mut seen = [0; 10];
        for sport in sports {
            if let Some(b) = self.send(sport) {
                seen[b as usize] += 1;
            }
        }
        seen
    }

    fn assert_flows_stay(&mut self, flows: &[(u16, Option<u8>)]) {
        for (sport, backend) in flows {
            assert_eq!(self.send_ack(*sport), *backend, "flow {sport} moved");
        }
    }

    fn probe_keys(&self) -> Vec<(ProbeKey, HealthCheck)> {
        let mut keys = self.probes.0.lock().unwrap().clone();
        keys.sort_by_key(|(k, _)| (k.ip, k.generation));
        keys
    }
}

/// Runs a test body on its own thread, so the namespace it enters dies with it.
fn in_netns(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(body).join().expect("test thread");
}

#[test]
fn a_reload_adding_a_backend_and_changing_a_weight_keeps_established_flows() {
    in_netns(|| {
        let mut bed = Bed::new("add");
        bed.write(&service_toml(&[(1, 1), (2, 1)]));
        assert_eq!(
            bed.reload(),
            [
                format!(
                    "service {SERVICE} added (scheduler maglev, forward dsr, health check every \
                     1s (timeout 1s, rise 2, fall 2))"
                ),
                format!("{SERVICE}: backend 10.99.0.11 added (weight 1)"),
                format!("{SERVICE}: backend 10.99.0.12 added (weight 1)"),
            ]
        );
        bed.probe(1, true, 2);
        bed.probe(2, true, 2);
        let flows = bed.flows(3000..3300);
        let on_1 = flows.iter().filter(|(_, b)| *b == Some(1)).count();
        assert!(
            (60..240).contains(&on_1),
            "{on_1} of 300 flows on backend 1"
        );
        let probes_before = bed.probe_keys();

        bed.write(&service_toml(&[(1, 3), (2, 1), (3, 1)]));
        assert_eq!(
            bed.reload(),
            [
                format!("{SERVICE}: backend 10.99.0.13 added (weight 1)"),
                format!("{SERVICE}: backend 10.99.0.11 now weight 3"),
            ]
        );
        // Backends 1 and 2 kept their probes (same generation: same backend id and entry).
        assert_eq!(bed.probe_keys()[..2], probes_before[..]);
        bed.assert_flows_stay(&flows);
        bed.probe(3, true, 2);
        bed.assert_flows_stay(&flows);
        let fresh = bed.spread(20_000..21_000);
        assert!(
            fresh[3] > 80 && fresh[1] > 2 * fresh[2],
            "new flows follow the new weights 3:1:1: {fresh:?}"
        );
        let weights: Vec<u32> = bed.status().services[0]
            .backends
            .iter()
            .map(|b| b.weight)
            .collect();
        assert_eq!(weights, [3, 1, 1]);

        // The same file again: nothing to do.
        assert_eq!(bed.reload(), Vec::<String>::new());
        bed.assert_flows_stay(&flows);
    });
}

#[test]
fn an_invalid_reload_changes_nothing() {
    in_netns(|| {
        let mut bed = Bed::new("invalid");
        let good = service_toml(&[(1, 1), (2, 1)]);
        bed.write(&good);
        bed.reload();
        bed.probe(1, true, 2);
        bed.probe(2, true, 2);
        let flows = bed.flows(4000..4200);
        let before = bed.status();
        let probes = bed.probe_keys();
        let file = bed.file.display().to_string();

        // Each file adds backend 3 (so a half-applied reload would show) and has one error.
        let adding = service_toml(&[(1, 1), (2, 1), (3, 1)]);
        let five_services: String = (1..=5)
            .map(|i| format!("\n[[service]]\naddress = \"10.200.1.{i}:80/tcp\"\n"))
            .collect();
        let too_many_backends: String = (1..=13)
            .map(|i| format!("\n[[service.backend]]\naddress = \"10.99.1.{i}\"\n"))
            .collect();
        let cases = [
            (
                format!("{adding}\n[[service.backend]\naddress = \"10.99.0.15\"\n"),
                format!("{file}:20: unclosed array table, expected `]`"),
            ),
            (
                format!("{adding}weigth = 4\n"),
                format!(
                    "{file}:19: unknown field `weigth`, expected one of `address`, `port`, \
                     `weight`, `drain`"
                ),
            ),
            (
                format!("{adding}\n[[service.backend]]\naddress = \"10.99.0.11\"\n"),
                format!(
                    "{file}:21: duplicate backend 10.99.0.11 in service {SERVICE} (first \
                     declared at line 9)"
                ),
            ),
            (
                adding.replace("10.99.0.13", "10.99.0.300"),
                format!(
                    "{file}:17: backend address '10.99.0.300' is not an IP address (or IP:PORT)"
                ),
            ),
            (
                adding.replace("rise = 2", "rise = 0"),
                format!("{file}:6: rise 0 is out of range (1 to 100 checks)"),
            ),
            (
                adding.replace("timeout = \"1s\"", "timeout = \"3s\""),
                format!("{file}:6: health-check timeout 3s is longer than the interval 1s"),
            ),
            (
                adding.replace(
                    "weight = 1\n\n[[service.backend]]\naddress = \"10.99.0.13\"",
                    "weight = 20000\n\n[[service.backend]]\naddress = \"10.99.0.13\"",
                ),
                format!("{file}:14: weight 20000 is above the maximum 10000"),
            ),
            (
                format!(
                    "{adding}\n[[service]]\naddress = \"[2001:db8::1]:80/tcp\"\n\
                     [[service.backend]]\naddress = \"10.99.0.14\"\n"
                ),
                format!(
                    "{file}:23: backend 10.99.0.14: forwarding mode dsr needs a backend of the \
                     VIP's address family (ipip and gue allow either)"
                ),
            ),
            (
                adding.replace("\"lbc0\"", "\"eth7\""),
                format!(
                    "{file}:2: interface eth7: the daemon runs on lbc0; changing the interfaces \
                     needs a restart"
                ),
            ),
            (
                format!("{adding}{five_services}"),
                format!("{file}: 6 services declared; the daemon holds at most 4 (--max-services)"),
            ),
        ];
        for (text, want) in &cases {
            bed.write(text);
            assert_eq!(&bed.reload_err(), want, "for the file:\n{text}");
            assert_eq!(bed.status(), before, "a refused reload changed the state");
            assert_eq!(
                bed.probe_keys(),
                probes,
                "a refused reload changed the probes"
            );
        }
        // 3 + 13 = 16 backends would fit exactly; one more does not.
        let over =
            format!("{adding}{too_many_backends}\n[[service.backend]]\naddress = \"10.99.1.99\"\n");
        bed.write(&over);
        assert_eq!(
            bed.reload_err(),
            format!("{file}: 17 backends declared; the daemon holds at most 16 (--max-backends)")
        );
        assert_eq!(bed.status(), before);
        let gone = std::fs::remove_file(&bed.file);
        assert!(gone.is_ok());
        assert!(
            bed.reload_err()
                .starts_with(&format!("{file}: cannot read the configuration:"))
        );
        assert_eq!(bed.status(), before);
        bed.assert_flows_stay(&flows);

        // The file fixed: the reload goes through.
        bed.write(&adding);
        assert_eq!(bed.reload().len(), 1);
        bed.assert_flows_stay(&flows);
    });
}

#[test]
fn a_health_check_change_is_made_in_place() {
    in_netns(|| {
        let mut bed = Bed::new("health");
        let text = service_toml(&[(1, 1), (2, 1)]);
        bed.write(&text);
        bed.reload();
        bed.probe(1, true, 2);
        bed.probe(2, true, 2);
        let flows = bed.flows(5000..5200);
        let keys: Vec<ProbeKey> = bed.probe_keys().iter().map(|(k, _)| *k).collect();

        bed.write(&text.replace(
            "interval = \"1s\", timeout = \"1s\", rise = 2, fall = 2",
            "interval = \"300ms\", timeout = \"200ms\", rise = 3, fall = 4",
        ));
        assert_eq!(
            bed.reload(),
            [format!(
                "{SERVICE}: settings now scheduler maglev, forward dsr, health check every \
                 300ms (timeout 200ms, rise 3, fall 4)"
            )]
        );
        // The probes restarted with the new settings, for the same backends.
        let now = bed.probe_keys();
        assert_eq!(now.iter().map(|(k, _)| *k).collect::<Vec<_>>(), keys);
        for (_, check) in &now {
            assert_eq!(check.interval, Duration::from_millis(300));
            assert_eq!((check.rise, check.fall), (3, 4));
        }
        // Still up, flows where they were; the new fall applies.
        bed.assert_flows_stay(&flows);
        let s = bed.status();
        assert_eq!(s.services[0].health_check.fall, 4);
        assert!(s.services[0].backends.iter().all(|b| b.in_table));
        bed.probe(2, false, 3);
        assert!(
            bed.status().services[0].backends[1].in_table,
            "fall is 4 now"
        );
        bed.probe(2, false, 1);
        assert!(!bed.status().services[0].backends[1].in_table);
    });
}

#[test]
fn a_reload_drains_removes_and_adds_services() {
    in_netns(|| {
        let mut bed = Bed::new("services");
        let other = "10.200.0.20:80/tcp";
        let two = format!(
            "{}\n[[service]]\naddress = \"{other}\"\n[[service.backend]]\naddress = \"{}\"\n",
            service_toml(&[(1, 1), (2, 1)]),
            backend_ip(4)
        );
        bed.write(&two);
        bed.reload();
        for n in [1, 2, 4] {
            bed.probe(n, true, 2);
        }
        let flows = bed.flows(6000..6200);
        assert_eq!(bed.send_to(Ipv4Addr::new(10, 200, 0, 20), 80, 1), Some(4));

        // Drain backend 2 from the file and delete the other service.
        bed.write(&format!(
            "{}drain = true\n",
            service_toml(&[(1, 1), (2, 1)])
        ));
        assert_eq!(
            bed.reload(),
            [
                format!("service {other} removed"),
                format!("{SERVICE}: backend 10.99.0.12 now weight 1, drained"),
            ]
        );
        bed.assert_flows_stay(&flows);
        assert_eq!(
            bed.spread(30_000..30_300)[1],
            300,
            "no new flow to the drained one"
        );
        assert_eq!(
            bed.send_to(Ipv4Addr::new(10, 200, 0, 20), 80, 2),
            Some(0),
            "a removed service's VIP passes to the kernel"
        );

        // Undrained again by the file.
        bed.write(&service_toml(&[(1, 1), (2, 1)]));
        assert_eq!(
            bed.reload(),
            [format!("{SERVICE}: backend 10.99.0.12 now weight 1")]
        );
        assert!(bed.spread(31_000..31_300)[2] > 60);
        bed.assert_flows_stay(&flows);
    });
}

#[test]
fn a_reload_undoes_runtime_changes_and_a_dump_reloads_to_no_change() {
    in_netns(|| {
        let mut bed = Bed::new("runtime");
        bed.write(&service_toml(&[(1, 1), (2, 1)]));
        bed.reload();
        let service: ServiceAddr = SERVICE.parse().unwrap();
        // CLI changes at runtime: a backend added, one deleted.
        for request in [
            Request::BackendAdd {
                service,
                ip: IpAddr::V4(backend_ip(3)),
                weight: 5,
                port: None,
            },
            Request::BackendDel {
                service,
                ip: IpAddr::V4(backend_ip(2)),
            },
        ] {
            assert_eq!(bed.control.handle(request), Response::Ok);
        }
        // The dump is the running state: loading it gives exactly that state.
        let Response::Config { text } = bed.control.handle(Request::ConfigDump) else {
            panic!("no dump");
        };
        let dumped = Config::parse(&text, "dump").unwrap();
        assert_eq!(dumped.services, bed.control.running());
        assert_eq!(dumped.interface(), Some("lbc0"));
        let s = &dumped.services[&service];
        assert_eq!(
            s.backends.keys().copied().collect::<Vec<_>>(),
            [IpAddr::V4(backend_ip(1)), IpAddr::V4(backend_ip(3))]
        );
        assert_eq!(
            s.backends[&IpAddr::V4(backend_ip(3))],
            BackendConfig {
                weight: 5,
                drain: false,
                port: None,
            }
        );

        // Reloading the unchanged file undoes both (the file is the source of truth).
        assert_eq!(
            bed.reload(),
            [
                format!("{SERVICE}: backend 10.99.0.13 removed"),
                format!("{SERVICE}: backend 10.99.0.12 added (weight 1)"),
            ]
        );
        let before = bed.status();

        // Writing the dump as the file keeps what runs: no change.
        let Response::Config { text } = bed.control.handle(Request::ConfigDump) else {
            panic!("no dump");
        };
        bed.write(&text);
        assert_eq!(bed.reload(), Vec::<String>::new());
        assert_eq!(bed.status(), before);
    });
}

#[test]
fn a_plan_failing_midway_is_undone() {
    in_netns(|| {
        let mut bed = Bed::new("rollback");
        bed.write(&service_toml(&[(1, 1), (2, 1)]));
        bed.reload();
        bed.probe(1, true, 2);
        bed.probe(2, true, 2);
        let flows = bed.flows(7000..7200);
        let before = bed.control.running();
        let status = bed.status();
        let service: ServiceAddr = SERVICE.parse().unwrap();
        let unknown: ServiceAddr = "10.200.0.99:80/tcp".parse().unwrap();
        // A plan as a reload would make it, with a last step that cannot be applied.
        let changes = [
            Change::RemoveBackend {
                service,
                ip: IpAddr::V4(backend_ip(2)),
            },
            Change::AddBackend {
                service,
                ip: IpAddr::V4(backend_ip(3)),
                backend: BackendConfig::default(),
            },
            Change::UpdateBackend {
                service,
                ip: IpAddr::V4(backend_ip(1)),
                backend: BackendConfig {
                    weight: 4,
                    drain: false,
                    port: None,
                },
            },
            Change::AddBackend {
                service: unknown,
                ip: IpAddr::V4(backend_ip(5)),
                backend: BackendConfig::default(),
            },
        ];
        let err = bed.control.apply_plan(&changes).unwrap_err().to_string();
        assert_eq!(
            err,
            "applying the configuration failed at \"10.200.0.99:80/tcp: backend 10.99.0.15 \
             added (weight 1)\": service 10.200.0.99:80/tcp does not exist; the 3 change(s) \
             before it were undone"
        );
        assert_eq!(bed.control.running(), before);
        // Backend 1 kept its flows throughout; backend 2 came back as a new backend (its flows
        // moved to backend 1 while it was gone, which a removal always does).
        for (sport, backend) in &flows {
            if *backend == Some(1) {
                assert_eq!(bed.send(*sport), Some(1), "flow {sport} moved");
            }
        }
        let after = bed.status();
        assert_eq!(after.services[0].backends.len(), 2);
        assert_eq!(
            after.services[0].backends[1].ip,
            status.services[0].backends[1].ip
        );
    });
}

#[test]
fn without_a_configuration_file_reload_is_refused_and_dump_still_works() {
    // No namespace needed: nothing here reads the neighbour table or sends packets.
    let dp = Dataplane::load(Sizing::default(), false).expect("load");
    let mut control = Control::new(dp, "lbc0".into(), FakeProber::default());
    assert_eq!(
        control.handle(Request::Reload),
        Response::Error {
            message: "the daemon was started without --config: there is no file to reload".into()
        }
    );
    let service: ServiceAddr = SERVICE.parse().unwrap();
    assert_eq!(
        control.handle(Request::ServiceAdd {
            service,
            scheduler: lb_userspace::api::Scheduler::Maglev,
            forward: lb_userspace::api::Forward::Dsr,
            health: HealthCheck::default(),
            fragments: false,
        }),
        Response::Ok
    );
    let Response::Config { text } = control.handle(Request::ConfigDump) else {
        panic!("no dump");
    };
    assert_eq!(
        Config::parse(&text, "dump").unwrap().services,
        control.running()
    );
    assert!(text.contains(&format!("address = \"{SERVICE}\"")), "{text}");
}
