//! The command line: `lb daemon` and the control commands that talk to it.

mod client;
mod config;
pub(crate) mod decap;
mod stats;
mod status;
mod wire;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

use crate::{
    api::{
        self, BackendTarget, CheckKind, DEFAULT_API_SOCKET, Forward, HcTarget, HealthCheck,
        Request, Scheduler, ServiceAddr, StatusRange,
    },
    daemon::DaemonArgs,
};

#[derive(Debug, Parser)]
#[command(
    name = "lb",
    version,
    about = "An XDP layer-4 load balancer: daemon and control CLI"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "LB_API", default_value = DEFAULT_API_SOCKET)]
    pub api: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the balancer in the foreground: attach XDP, serve the API, run health checks.
    Daemon(DaemonArgs),
    /// Add or delete services (VIP:PORT/PROTO).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Add, delete or drain a service's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Read the daemon's configuration file (--config) again and apply what changed;
    /// established flows keep their backends. A bad file changes nothing.
    Reload,
    /// Print the running configuration, or check a file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show services, backends, health and traffic.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Packets and bytes per second per service and backend, from two snapshots an interval
    /// apart.
    Stats(stats::StatsArgs),
    /// On a backend: strip the IPIP/GUE headers the balancer adds (--forward ipip|gue), in XDP,
    /// for packets to IFACE's addresses; runs until SIGINT/SIGTERM and prints counters on exit.
    Decap(decap::DecapArgs),
    /// Print a completion script for SHELL on stdout (for example
    /// `lb completions bash > /usr/share/bash-completion/completions/lb`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Test aid: attach an XDP_PASS program to interfaces until SIGINT/SIGTERM. A frame sent
    /// into a veth with XDP_TX is only received when the peer runs an XDP program.
    #[command(hide = true)]
    TestbedWire {
        #[arg(long, required = true)]
        iface: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service: traffic to VIP:PORT/PROTO is spread over its backends.
    Add {
        /// VIP:PORT/tcp or VIP:PORT/udp, for example 10.0.0.10:80/tcp.
        service: ServiceAddr,
        /// How new flows pick a backend.
        #[arg(long, value_enum, default_value = "maglev")]
        scheduler: Scheduler,
        /// How packets reach the backend (see the README's "Forwarding modes" for what each
        /// needs on the backends).
        #[arg(long, value_enum, default_value = "dsr")]
        forward: Forward,
        /// Forward IP fragments too, every fragment of a client to one backend (needs
        /// --scheduler source-hash and --forward dsr, ipip or gue; one service per VIP and
        /// protocol).
        #[arg(long)]
        fragments: bool,
        /// Time between health checks of each backend (500ms, 1s, ...).
        #[arg(long, default_value = "1s", value_parser = api::parse_duration)]
        hc_interval: Duration,
        /// Time a health check may take before it counts as failed.
        #[arg(long, default_value = "1s", value_parser = api::parse_duration)]
        hc_timeout: Duration,
        /// Consecutive successful checks that bring a backend (back) into service.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
        hc_rise: u32,
        /// Consecutive failed checks that take a backend out of service.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
        hc_fall: u32,
        /// Where probes go: `backend` (its own address) or `vip` (the VIP, steered to the
        /// backend like client traffic: a backend without the VIP or its listener fails).
        #[arg(long, value_enum, default_value = "backend")]
        hc_target: HcTarget,
        #[command(flatten)]
        hc: CheckArgs,
    },
    /// Delete a service and all its backends.
    Del {
        /// VIP:PORT/PROTO of the service.
        service: ServiceAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend; it gets traffic once its health checks pass.
    Add {
        /// VIP:PORT/PROTO of the service.
        service: ServiceAddr,
        /// The backend's address (IP, IP:PORT or [IPv6]:PORT). A port other than the service's
        /// is for nat and fullnat only. For dsr, ipip and gue the backend holds the VIP on a
        /// loopback.
        #[arg(value_name = "IP[:PORT]")]
        target: BackendTarget,
        /// Relative share of new flows.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        weight: u32,
    },
    /// Delete a backend: its flows move to the other backends.
    Del {
        /// VIP:PORT/PROTO of the service.
        service: ServiceAddr,
        /// The backend's address.
        ip: IpAddr,
    },
    /// Drain a backend: no new flows; established flows stay until they end.
    Drain {
        /// VIP:PORT/PROTO of the service.
        service: ServiceAddr,
        /// The backend's address.
        ip: IpAddr,
        /// Longest wait for its established flows to end (30s, 2m, ...); then they move to
        /// other backends. Without it the drain waits for every flow.
        #[arg(long, value_parser = api::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Change a backend's weight live: new flows follow the new weights at once, established
    /// flows stay. Weight 0 behaves as a drain.
    Set {
        /// VIP:PORT/PROTO of the service.
        service: ServiceAddr,
        /// The backend's address.
        ip: IpAddr,
        /// Relative share of new flows (0 = no new flows).
        #[arg(long, required = true, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        weight: u32,
    },
}

/// Health-check kinds `--hc` chooses from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CheckKindArg {
    /// TCP connect to the backend's address and the service port.
    Tcp,
    /// HTTP GET over a new TCP connection; expects a status in --hc-http-status.
    Http,
    /// Send a datagram (--hc-udp-send) and expect a reply (containing --hc-udp-expect).
    Udp,
    /// No checks: backends count as up as soon as they are added.
    None,
}

/// What each health probe does (`lb service add --hc ...`).
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Kind of health check sent to each backend's address and the service port.
    #[arg(long = "hc", value_enum, default_value = "tcp")]
    pub kind: CheckKindArg,
    /// HTTP checks: the path to GET (default /).
    #[arg(long, value_parser = api::parse_http_path)]
    pub hc_http_path: Option<String>,
    /// HTTP checks: status codes that count as healthy, a range or one code (default 200-399).
    #[arg(long)]
    pub hc_http_status: Option<StatusRange>,
    /// HTTP checks: the Host header (default: the backend's address).
    #[arg(long, value_parser = api::parse_http_host)]
    pub hc_http_host: Option<String>,
    /// UDP checks: the payload to send (default empty); escapes \n \r \t \0 \\ \xHH.
    #[arg(long)]
    pub hc_udp_send: Option<String>,
    /// UDP checks: text the reply must contain (default: any reply counts); same escapes.
    #[arg(long)]
    pub hc_udp_expect: Option<String>,
}

impl CheckArgs {
    /// The check these flags describe; flags of another kind are an error, not ignored.
    pub fn to_kind(&self) -> Result<CheckKind, String> {
        let http_flags = self.hc_http_path.is_some()
            || self.hc_http_status.is_some()
            || self.hc_http_host.is_some();
        let udp_flags = self.hc_udp_send.is_some() || self.hc_udp_expect.is_some();
        let kind = match self.kind {
            CheckKindArg::Http => CheckKind::Http {
                path: self.hc_http_path.clone().unwrap_or_else(|| "/".into()),
                status: self.hc_http_status.unwrap_or_default(),
                host: self.hc_http_host.clone(),
            },
            CheckKindArg::Udp => CheckKind::Udp {
                send: self.hc_udp_send.clone().unwrap_or_default(),
                expect: self.hc_udp_expect.clone(),
            },
            CheckKindArg::Tcp => CheckKind::Tcp,
            CheckKindArg::None => CheckKind::None,
        };
        if http_flags && self.kind != CheckKindArg::Http {
            return Err("--hc-http-* options need --hc http".into());
        }
        if udp_flags && self.kind != CheckKindArg::Udp {
            return Err("--hc-udp-* options need --hc udp".into());
        }
        kind.validate()?;
        Ok(kind)
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the running state as a configuration file (load it with `lb daemon --config`).
    Dump,
    /// Check a configuration file without applying it: prints the first error as FILE:LINE.
    Check {
        /// The file, for example /etc/lb/lb.toml.
        file: PathBuf,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let request = match cli.command {
        Command::Daemon(args) => return crate::daemon::run(args, cli.api),
        Command::TestbedWire { iface } => return wire::run(&iface),
        Command::Decap(args) => return decap::run(&args),
        Command::Reload => return config::reload(&cli.api),
        Command::Config(ConfigCommand::Dump) => return config::dump(&cli.api),
        Command::Config(ConfigCommand::Check { file }) => return config::check(&file),
        Command::Status { json } => {
            let status = client::status(&cli.api)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status::render(&status));
            }
            return Ok(());
        }
        Command::Stats(args) => return stats::run(&cli.api, &args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut std::io::stdout());
            return Ok(());
        }
        Command::Service(ServiceCommand::Add {
            service,
            scheduler,
            forward,
            fragments,
            hc_interval,
            hc_timeout,
            hc_rise,
            hc_fall,
            hc_target,
            hc,
        }) => {
            if fragments {
                api::check_fragments(scheduler, forward).map_err(anyhow::Error::msg)?;
            }
            Request::ServiceAdd {
                service,
                scheduler,
                forward,
                fragments,
                health: HealthCheck {
                    interval: hc_interval,
                    timeout: hc_timeout,
                    rise: hc_rise,
                    fall: hc_fall,
                    kind: hc.to_kind().map_err(anyhow::Error::msg)?,
                    target: hc_target,
                },
            }
        }
        Command::Service(ServiceCommand::Del { service }) => Request::ServiceDel { service },
        Command::Backend(BackendCommand::Add {
            service,
            target,
            weight,
        }) => Request::BackendAdd {
            service,
            ip: target.ip,
            weight,
            port: target.port,
        },
        Command::Backend(BackendCommand::Del { service, ip }) => {
            Request::BackendDel { service, ip }
        }
        Command::Backend(BackendCommand::Drain {
            service,
            ip,
            timeout,
        }) => Request::BackendDrain {
            service,
            ip,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
        },
        Command::Backend(BackendCommand::Set {
            service,
            ip,
            weight,
        }) => Request::BackendSet {
            service,
            ip,
            weight,
        },
    };
    client::call_ok(&cli.api, &request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lb").chain(args.iter().copied()))
    }

    #[test]
    fn service_add_takes_defaults_from_the_issue() {
        let cli = parse(&["service", "add", "10.0.0.10:80/tcp"]).unwrap();
        let Command::Service(ServiceCommand::Add {
            service,
            scheduler,
            forward,
            fragments,
            hc_interval,
            hc_timeout,
            hc_rise,
            hc_fall,
            hc_target,
            hc,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(service.to_string(), "10.0.0.10:80/tcp");
        assert_eq!((scheduler, forward), (Scheduler::Maglev, Forward::Dsr));
        assert!(!fragments);
        assert_eq!(hc_interval, Duration::from_secs(1));
        assert_eq!(hc_timeout, Duration::from_secs(1));
        assert_eq!((hc_rise, hc_fall), (2, 2));
        assert_eq!(hc_target, HcTarget::Backend);
        assert_eq!(hc.to_kind(), Ok(CheckKind::Tcp));
        assert_eq!(cli.api, PathBuf::from(DEFAULT_API_SOCKET));
    }

    /// The check kind of `lb service add 10.0.0.10:80/tcp ARGS`.
    fn check_of(args: &[&str]) -> Result<CheckKind, String> {
        let mut all = vec!["service", "add", "10.0.0.10:80/tcp"];
        all.extend_from_slice(args);
        match parse(&all).map_err(|e| e.to_string())?.command {
            Command::Service(ServiceCommand::Add { hc, .. }) => hc.to_kind(),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn check_flags_build_each_kind_with_its_defaults() {
        assert_eq!(
            check_of(&["--hc", "http"]),
            Ok(CheckKind::Http {
                path: "/".into(),
                status: StatusRange {
                    low: 200,
                    high: 399
                },
                host: None
            })
        );
        assert_eq!(
            check_of(&[
                "--hc",
                "http",
                "--hc-http-path",
                "/healthz",
                "--hc-http-status",
                "204",
                "--hc-http-host",
                "svc.example"
            ]),
            Ok(CheckKind::Http {
                path: "/healthz".into(),
                status: StatusRange {
                    low: 204,
                    high: 204
                },
                host: Some("svc.example".into())
            })
        );
        assert_eq!(
            check_of(&["--hc", "udp"]),
            Ok(CheckKind::Udp {
                send: String::new(),
                expect: None
            })
        );
        assert_eq!(
            check_of(&[
                "--hc",
                "udp",
                "--hc-udp-send",
                "ping",
                "--hc-udp-expect",
                "pong"
            ]),
            Ok(CheckKind::Udp {
                send: "ping".into(),
                expect: Some("pong".into())
            })
        );
        assert_eq!(check_of(&["--hc", "none"]), Ok(CheckKind::None));
        assert_eq!(check_of(&["--hc", "tcp"]), Ok(CheckKind::Tcp));
    }

    #[test]
    fn bad_check_flags_are_one_line_errors() {
        for args in [
            &["--hc", "icmp"][..],
            &["--hc", "http", "--hc-http-path", "healthz"],
            &["--hc", "http", "--hc-http-status", "399-200"],
            &["--hc", "http", "--hc-http-status", "600"],
            &["--hc", "http", "--hc-http-status", "2xx"],
            &["--hc", "http", "--hc-http-host", "a b"],
            &["--hc-http-path", "/healthz"],
            &["--hc", "udp", "--hc-http-status", "200"],
            &["--hc", "http", "--hc-udp-send", "x"],
            &["--hc", "none", "--hc-udp-expect", "x"],
            &["--hc", "udp", "--hc-udp-send", r"\q"],
            &["--hc", "udp", "--hc-udp-expect", ""],
        ] {
            let err = check_of(args).expect_err(&format!("{args:?} accepted"));
            assert!(!err.trim().is_empty(), "{args:?}");
        }
    }

    #[test]
    fn backend_set_needs_a_weight_in_range() {
        let cli = parse(&[
            "backend",
            "set",
            "10.0.0.10:80/tcp",
            "10.0.0.2",
            "--weight",
            "0",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Backend(BackendCommand::Set { weight: 0, .. })
        ));
        for args in [
            &["backend", "set", "10.0.0.10:80/tcp", "10.0.0.2"][..],
            &[
                "backend",
                "set",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "10001",
            ],
            &[
                "backend",
                "set",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "-1",
            ],
            &["backend", "set", "10.0.0.10:80/tcp", "--weight", "2"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn api_path_is_global() {
        let cli = parse(&[
            "backend",
            "add",
            "10.0.0.10:80/tcp",
            "10.0.0.2",
            "--api",
            "/tmp/x.sock",
            "--weight",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.api, PathBuf::from("/tmp/x.sock"));
        assert!(matches!(
            cli.command,
            Command::Backend(BackendCommand::Add { weight: 5, .. })
        ));
    }

    #[test]
    fn stats_and_metrics_flags_parse() {
        let cli = parse(&["stats", "--watch", "--json", "--interval", "500ms"]).unwrap();
        let Command::Stats(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert!(args.watch && args.json);
        assert_eq!(args.interval, Duration::from_millis(500));
        let Command::Stats(args) = parse(&["stats"]).unwrap().command else {
            panic!("stats did not parse");
        };
        assert!(!args.watch && !args.json);
        assert_eq!(args.interval, Duration::from_secs(1));

        let cli = parse(&["daemon", "--iface", "eth0", "--metrics", "127.0.0.1:9100"]).unwrap();
        let Command::Daemon(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        let Command::Daemon(args) = parse(&["daemon", "--iface", "eth0"]).unwrap().command else {
            panic!("daemon did not parse");
        };
        assert_eq!(args.metrics, None, "metrics must be off unless asked for");
    }

    #[test]
    fn decap_takes_katran_port_and_native_mode_by_default() {
        let Command::Decap(args) = parse(&["decap", "--iface", "eth0"]).unwrap().command else {
            panic!("decap did not parse");
        };
        assert_eq!(args.iface, "eth0");
        assert_eq!(args.gue_port, lb_common::DEFAULT_GUE_PORT);
        assert_eq!(args.xdp_mode, crate::dataplane::AttachMode::Native);
        assert!(args.addrs.is_empty() && !args.json);
        let cli = parse(&[
            "decap",
            "--iface",
            "eth0",
            "--xdp-mode",
            "generic",
            "--gue-port",
            "9000",
            "--addr",
            "2001:db8::2",
        ])
        .unwrap();
        let Command::Decap(args) = cli.command else {
            panic!("decap did not parse");
        };
        assert_eq!(args.gue_port, 9000);
        assert_eq!(args.xdp_mode, crate::dataplane::AttachMode::Generic);
        assert_eq!(args.addrs, vec!["2001:db8::2".parse::<IpAddr>().unwrap()]);
        for bad in [
            &["decap"][..],
            &["decap", "--iface", "eth0", "--gue-port", "0"],
            &["decap", "--iface", "eth0", "--gue-port", "70000"],
            &["decap", "--iface", "eth0", "--xdp-mode", "fast"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn forwarding_modes_fragments_and_backend_ports_parse() {
        for f in Forward::ALL {
            let cli =
                parse(&["service", "add", "10.0.0.10:80/tcp", "--forward", f.name()]).unwrap();
            assert!(matches!(
                cli.command,
                Command::Service(ServiceCommand::Add { forward, fragments: false, .. }) if forward == f
            ));
        }
        let cli = parse(&[
            "service",
            "add",
            "10.0.0.10:80/udp",
            "--scheduler",
            "source-hash",
            "--forward",
            "gue",
            "--fragments",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Service(ServiceCommand::Add {
                fragments: true,
                ..
            })
        ));
        for (arg, ip, port) in [
            ("10.0.0.2", "10.0.0.2", None),
            ("10.0.0.2:8080", "10.0.0.2", Some(8080)),
            ("[2001:db8::2]:8080", "2001:db8::2", Some(8080)),
            ("2001:db8::2", "2001:db8::2", None),
        ] {
            let cli = parse(&["backend", "add", "10.0.0.10:80/tcp", arg]).unwrap();
            let Command::Backend(BackendCommand::Add { target, .. }) = cli.command else {
                panic!("parsed as {:?}", cli.command);
            };
            assert_eq!(target.ip, ip.parse::<IpAddr>().unwrap(), "{arg}");
            assert_eq!(target.port, port, "{arg}");
        }
        for bad in [
            &["service", "add", "10.0.0.10:80/tcp", "--forward", "tunnel"][..],
            &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.2:0"],
            &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.2:http"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn daemon_takes_several_interfaces_and_the_routed_options() {
        let cli = parse(&[
            "daemon",
            "--iface",
            "eth0",
            "--iface",
            "eth1",
            "--encap-source4",
            "192.0.2.1",
            "--encap-source6",
            "2001:db8::1",
            "--encap-source-hash-bits",
            "16",
            "--gue-port",
            "9000",
            "--snat4",
            "192.0.2.2",
            "--snat6",
            "2001:db8::2",
            "--snat-ports",
            "1024-2047",
            "--nat-size",
            "4096",
        ])
        .unwrap();
        let Command::Daemon(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.iface, ["eth0", "eth1"]);
        assert_eq!(args.encap_source4, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(args.encap_source6, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(args.encap_source_hash_bits, Some(16));
        assert_eq!(args.gue_port, Some(9000));
        assert_eq!(args.snat4, Some("192.0.2.2".parse().unwrap()));
        assert_eq!(args.snat6, Some("2001:db8::2".parse().unwrap()));
        assert_eq!(args.snat_ports, Some((1024, 2047)));
        assert_eq!(args.nat_size, Some(4096));
        let Command::Daemon(args) = parse(&["daemon", "--iface", "eth0"]).unwrap().command else {
            panic!("daemon did not parse");
        };
        assert_eq!(
            (args.encap_source4, args.snat_ports, args.gue_port),
            (None, None, None),
            "defaults are filled in at start"
        );
        for bad in [
            &[
                "daemon",
                "--iface",
                "eth0",
                "--encap-source-hash-bits",
                "17",
            ][..],
            &[
                "daemon",
                "--iface",
                "eth0",
                "--encap-source4",
                "2001:db8::1",
            ],
            &["daemon", "--iface", "eth0", "--snat6", "192.0.2.1"],
            &["daemon", "--iface", "eth0", "--snat-ports", "60000-50000"],
            &["daemon", "--iface", "eth0", "--snat-ports", "0-100"],
            &["daemon", "--iface", "eth0", "--snat-ports", "100"],
            &["daemon", "--iface", "eth0", "--gue-port", "0"],
            &["daemon", "--iface", "eth0", "--nat-size", "10"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn completions_name_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lb", &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in [
                "daemon",
                "service",
                "backend",
                "status",
                "stats",
                "completions",
            ] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
    }

    #[test]
    fn bad_input_is_rejected_before_reaching_the_daemon() {
        for args in [
            &["service", "add", "10.0.0.10/tcp"][..],
            &["service", "add", "10.0.0.10:80/icmp"],
            &[
                "service",
                "add",
                "10.0.0.10:80/tcp",
                "--hc-interval",
                "soon",
            ],
            &["service", "add", "10.0.0.10:80/tcp", "--hc-rise", "0"],
            &[
                "service",
                "add",
                "10.0.0.10:80/tcp",
                "--scheduler",
                "random",
            ],
            &["backend", "add", "10.0.0.10:80/tcp", "10.0.0.999"],
            &[
                "backend",
                "add",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "-1",
            ],
            &[
                "backend",
                "add",
                "10.0.0.10:80/tcp",
                "10.0.0.2",
                "--weight",
                "10001",
            ],
            &["backend", "drain", "10.0.0.10:80/tcp"],
            &["daemon"],
            &["daemon", "--iface", "eth0", "--metrics", "localhost"],
            &["stats", "--interval", "0s"],
            &["completions", "tcsh"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }
}
