//! The command line: `lb daemon` and the control commands that talk to it.

mod client;
mod config;
mod status;
mod wire;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    api::{self, DEFAULT_API_SOCKET, Forward, HealthCheck, Request, Scheduler, ServiceAddr},
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
        /// How packets reach the backend.
        #[arg(long, value_enum, default_value = "dsr")]
        forward: Forward,
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
        /// The backend's address (it must hold the VIP on a loopback for DSR).
        ip: IpAddr,
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
    },
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
        Command::Service(ServiceCommand::Add {
            service,
            scheduler,
            forward,
            hc_interval,
            hc_timeout,
            hc_rise,
            hc_fall,
        }) => Request::ServiceAdd {
            service,
            scheduler,
            forward,
            health: HealthCheck {
                interval: hc_interval,
                timeout: hc_timeout,
                rise: hc_rise,
                fall: hc_fall,
            },
        },
        Command::Service(ServiceCommand::Del { service }) => Request::ServiceDel { service },
        Command::Backend(BackendCommand::Add {
            service,
            ip,
            weight,
        }) => Request::BackendAdd {
            service,
            ip,
            weight,
        },
        Command::Backend(BackendCommand::Del { service, ip }) => {
            Request::BackendDel { service, ip }
        }
        Command::Backend(BackendCommand::Drain { service, ip }) => {
            Request::BackendDrain { service, ip }
        }
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
            hc_interval,
            hc_timeout,
            hc_rise,
            hc_fall,
        }) = cli.command
        else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(service.to_string(), "10.0.0.10:80/tcp");
        assert_eq!((scheduler, forward), (Scheduler::Maglev, Forward::Dsr));
        assert_eq!(hc_interval, Duration::from_secs(1));
        assert_eq!(hc_timeout, Duration::from_secs(1));
        assert_eq!((hc_rise, hc_fall), (2, 2));
        assert_eq!(cli.api, PathBuf::from(DEFAULT_API_SOCKET));
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
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }
}
