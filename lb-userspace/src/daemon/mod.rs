//! `lb daemon`: loads and attaches the XDP program, serves the control API, runs health checks.
//!
//! Threads: the control loop runs on its own thread and owns all state and the maps (writing a
//! table is a blocking syscall); tokio runs the API server, the health probes and the signal
//! handlers, which talk to the control loop through one channel.

pub mod config;
mod control;
mod health;
pub mod metrics;
pub mod nat_expiry;
mod reload;
mod routed;
mod server;
mod vip_route;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use config::{Config, RoutedSettings};
pub use control::{
    Control, ControlError, Prober, SavedState, fragment_key, ipv6_words, service_key,
};
pub use health::{ProbeKey, ProbeOutcome, ProbeTarget};
pub use reload::{Change, discarded, plan};
pub use routed::Routed;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::{
    api::{Request, Response},
    dataplane::{AttachMode, Dataplane, Sizing},
    pins::PinDir,
};

/// How often the control loop rereads the neighbour table for backend MACs and checks drains.
const NEIGHBOUR_REFRESH: Duration = Duration::from_millis(500);
/// How often active flows are recounted from the connection table.
const FLOW_RECOUNT: Duration = Duration::from_secs(5);

pub enum Event {
    Api(Request, oneshot::Sender<Response>),
    Probe(ProbeKey, ProbeOutcome),
    Shutdown,
}

pub type EventSender = mpsc::Sender<Event>;

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// Network interface to attach the balancer to (the one VIP traffic arrives on); repeat
    /// it (`--iface A --iface B`) to attach to several, for example a client-facing and a
    /// backend-facing one: routed packets leave through whichever the kernel's route names.
    /// May be given as `[daemon] interface` in the --config file instead.
    #[arg(long, required_unless_present = "config")]
    pub iface: Vec<String>,
    /// Configuration file declaring the services and backends (TOML; usually
    /// /etc/lb/lb.toml). Applied at start; `lb reload` or SIGHUP applies it again. Without it
    /// the daemon starts with the saved state and is configured through the CLI.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// XDP attach mode: native (driver) by default; generic works on any interface but is
    /// slower; auto tries native and falls back to generic with a warning.
    #[arg(long, value_enum, default_value = "native")]
    pub xdp_mode: AttachMode,
    /// Most services at once (each holds a 65537-entry Maglev table, 256 KiB).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_SERVICES, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_services: u32,
    /// Most backends at once, over all services.
    #[arg(long, default_value_t = lb_common::DEFAULT_MAX_BACKENDS, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_backends: u32,
    /// Flows each connection table (IPv4, IPv6) has room for, rounded up to a power of two of
    /// sets of four; a new flow in a full set takes the place of the flow seen longest ago.
    /// 16 bytes per IPv4 flow, 32 per IPv6 flow. Size it at two to four times the flows
    /// expected.
    #[arg(long, default_value_t = lb_common::DEFAULT_CONNTRACK_SIZE, value_parser = clap::value_parser!(u32).range(1024..=64_000_000))]
    pub conntrack_size: u32,
    /// Log every forwarding decision from the XDP program (slow; for debugging only).
    #[arg(long)]
    pub debug_packets: bool,
    /// Directory on a bpf filesystem for the pinned maps and XDP link, so the data plane keeps
    /// forwarding while no daemon runs and a restarted or upgraded daemon adopts it. Inside
    /// `ip netns exec` use a bpffs mounted outside /sys (for example /run/lb/bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pub pin_dir: PathBuf,
    /// Where the configuration is saved after every change and read back on start
    /// [default: state.json beside the API socket].
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// On SIGTERM/SIGINT leave the data plane running (program attached, maps pinned) for a
    /// restart or an upgrade; without it the daemon detaches and removes its pins.
    #[arg(long)]
    pub keep_on_exit: bool,
    /// Start over: remove a data plane left pinned in --pin-dir (dropping its connection
    /// table) and ignore the saved state.
    #[arg(long)]
    pub fresh: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (for example 127.0.0.1:9100); off
    /// unless set.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// ipip/gue: outer IPv4 source address [default: the first IPv4 address of the first
    /// --iface].
    #[arg(long, value_name = "IP")]
    pub encap_source4: Option<Ipv4Addr>,
    /// ipip/gue: outer IPv6 source address [default: the first global IPv6 address of the
    /// first --iface].
    #[arg(long, value_name = "IP")]
    pub encap_source6: Option<Ipv6Addr>,
    /// ipip/gue: take this many low bits of the outer source address from the flow hash, so
    /// backends' NICs spread flows over queues (0 to 16) [default: 0, a fixed source].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=16))]
    pub encap_source_hash_bits: Option<u8>,
    /// gue: UDP destination port of the encapsulated packets (backends' `lb decap --gue-port`)
    /// [default: 6080].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub gue_port: Option<u16>,
    /// fullnat: IPv4 source address towards backends [default: the first IPv4 address of the
    /// first --iface].
    #[arg(long, value_name = "IP")]
    pub snat4: Option<Ipv4Addr>,
    /// fullnat: IPv6 source address towards backends [default: the first global IPv6 address
    /// of the first --iface].
    #[arg(long, value_name = "IP")]
    pub snat6: Option<Ipv6Addr>,
    /// fullnat: source ports given to flows, MIN-MAX inclusive [default: 61000-65535].
    #[arg(long, value_name = "MIN-MAX", value_parser = crate::api::parse_port_range)]
    pub snat_ports: Option<(u16, u16)>,
    /// nat/fullnat: entries of each NAT table (forward flows and replies, per family); a new
    /// flow finding its table full is dropped and counted [default: 262144].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=64_000_000))]
    pub nat_size: Option<u32>,
    /// The SYN-flood guard: SYNs of maglev and source-hash services each CPU enters in the
    /// connection table per second; past it, SYNs go to their backend without an entry and the
    /// connection's first ACK makes it. 0: no limit [default: 125000].
    #[arg(long, value_name = "N")]
    pub syn_guard: Option<u32>,
}

impl DaemonArgs {
    /// The routed modes' settings given as flags.
    fn routed(&self) -> RoutedSettings {
        RoutedSettings {
            encap_source4: self.encap_source4,
            encap_source6: self.encap_source6,
            encap_source_hash_bits: self.encap_source_hash_bits,
            gue_port: self.gue_port,
            snat4: self.snat4,
            snat6: self.snat6,
            snat_ports: self.snat_ports,
            nat_size: self.nat_size,
            syn_guard: self.syn_guard,
        }
    }
}

pub fn run(args: DaemonArgs, api: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;

    // Read and check the file before touching anything: a bad file refuses the start.
    let config = match &args.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    let file_ifaces = config.as_ref().map(Config::interfaces).unwrap_or_default();
    let ifaces: Vec<String> = match (args.iface.as_slice(), file_ifaces) {
        ([], []) => {
            bail!("no interface: pass --iface or set `[daemon] interface` in the configuration")
        }
        (flags, file) if !flags.is_empty() && !file.is_empty() && flags != file => bail!(
            "--iface {} and the configuration's interface {} differ: give one of them",
            flags.join(" --iface "),
            file.join(", ")
        ),
        ([], file) => file.to_vec(),
        (flags, _) => flags.to_vec(),
    };
    config::check_interfaces(&ifaces).map_err(anyhow::Error::msg)?;
    let iface = ifaces[0].clone();
    // The flags win over the file's `[daemon]` keys.
    let routed_settings = args
        .routed()
        .or(config.as_ref().map(|c| c.daemon.routed).unwrap_or_default());

    let listener = runtime.block_on(server::bind(&api))?;
    // The flag wins over the file's `[daemon] metrics`.
    let metrics_addr = args
        .metrics
        .or_else(|| config.as_ref().and_then(|c| c.daemon.metrics));
    let metrics_listener = match metrics_addr {
        Some(addr) => match runtime.block_on(metrics::bind(addr)) {
            Ok(listener) => Some(listener),
            Err(e) => {
                // Nothing serves the socket just bound: leave no stale file behind.
                let _ = std::fs::remove_file(&api);
                return Err(e);
            }
        },
        None => None,
    };

    let requested = Sizing {
        max_services: args.max_services,
        max_backends: args.max_backends,
        conntrack_size: args.conntrack_size,
        nat_size: routed_settings
            .nat_size
            .unwrap_or(lb_common::DEFAULT_NAT_SIZE),
    }
    .normalized();
    if args.fresh {
        PinDir::open(&args.pin_dir)?.remove_all()?;
    }
    let pins = PinDir::open(&args.pin_dir)?;
    let adopting = pins.has_state();
    // Decide before touching the data plane: a refused start leaves it exactly as it was.
    let sizing = match pins.check_layouts()? {
        Some(pinned) => {
            if (
                pinned.max_services,
                pinned.max_backends,
                pinned.conntrack_size,
                pinned.nat_size,
            ) != (
                requested.max_services,
                requested.max_backends,
                requested.conntrack_size,
                requested.nat_size,
            ) {
                warn!(
                    ?pinned,
                    "keeping the sizes of the pinned maps (restart with --fresh to resize)"
                );
            }
            pinned
        }
        None => requested,
    };
    let state_file = args
        .state_file
        .clone()
        .unwrap_or_else(|| api.with_file_name("state.json"));
    let saved = if args.fresh {
        None
    } else {
        read_state(&state_file)?
    };
    if adopting && saved.is_none() && !args.fresh {
        bail!(
            "a data plane is pinned in {} but there is no saved state at {}: pass --state-file, \
             or --fresh to start over (drops established connections)",
            args.pin_dir.display(),
            state_file.display()
        );
    }

    let mut dp = Dataplane::load_pinned(sizing, args.debug_packets, &pins)
        .context("loading the XDP program (are you root? is the kernel built with BPF?)")?;
    // An older build's connection table: its flows are copied before the program is replaced,
    // and the ones it placed meanwhile after.
    let carried = dp
        .carry_legacy_flows(&pins, false)
        .context("copying the flows of the adopted data plane's connection table")?;
    // The logger must live as long as the program: it owns the map the program logs into.
    let logger = aya_log::EbpfLogger::init(dp.ebpf_mut());
    let mut ifindexes = Vec::new();
    for (i, name) in ifaces.iter().enumerate() {
        // The first interface keeps the link path older versions pinned.
        let link = if i == 0 {
            pins.link_path()
        } else {
            pins.extra_link_path(name)
        };
        let replaced = dp
            .attach_pinned_at(name, args.xdp_mode, &link)
            .with_context(|| {
                format!(
                    "attaching XDP to {} in {:?} mode (does the interface exist? if its driver \
                     has no native XDP, use --xdp-mode generic or auto)",
                    name, args.xdp_mode
                )
            })?;
        if let Err(e) = dp.attach_hc_egress(name) {
            warn!(iface = %name, "health checks with --hc-target vip will fail: {e:#}");
        }
        if replaced {
            info!(iface = %name, pin_dir = %args.pin_dir.display(), "adopted the running data plane: program replaced in place, connection table kept");
        } else {
            info!(iface = %name, mode = ?args.xdp_mode, "XDP balancer attached");
        }
        ifindexes.push(ifindex(name)?);
    }
    let more = dp
        .carry_legacy_flows(&pins, true)
        .context("copying the flows of the adopted data plane's connection table")?;
    if carried.max(more) > 0 {
        info!(
            flows = carried.max(more),
            "carried the flows of the older build's connection table over"
        );
    }
    // A restart with fewer interfaces: detach from those no longer named.
    for (name, path) in pins.extra_links() {
        if !ifaces[1..].contains(&name) {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the pinned link {}", path.display()))?;
            info!(iface = %name, "no longer named with --iface: detached");
        }
    }
    dp.set_tx_ports(&ifindexes)
        .context("listing the interfaces for XDP_REDIRECT")?;
    let iface_addrs = crate::cli::decap::interface_addrs(&iface)
        .with_context(|| format!("reading the addresses of {iface}"))?;
    let routed = Routed::resolve(routed_settings, &iface_addrs);

    let (events, inbox) = mpsc::channel();
    let _log_task = match logger {
        Ok(logger) => Some(runtime.spawn(drain_kernel_log(logger))),
        Err(e) => {
            warn!("kernel-side logging unavailable: {e}");
            None
        }
    };
    runtime.spawn(server::serve(listener, events.clone()));
    if let Some(metrics_listener) = metrics_listener {
        if let Ok(addr) = metrics_listener.local_addr() {
            info!(%addr, "serving Prometheus metrics at /metrics");
        }
        runtime.spawn(metrics::serve(metrics_listener, events.clone()));
    }
    runtime.spawn(wait_for_signal(events.clone()));

    let prober = health::TokioProber::new(runtime.handle().clone(), events);
    let mut control = Control::new(dp, iface.clone(), prober);
    control.set_ifaces(ifaces.clone());
    if let Some(saved) = saved {
        control
            .restore(saved, adopting)
            .with_context(|| format!("restoring the state saved in {}", state_file.display()))?;
    }
    if let (Some(path), Some(config)) = (&args.config, &config) {
        // After restoring: the pinned tables and backend ids are adopted first, so a file that
        // did not change moves no flow.
        control.set_config_file(path.clone());
        let file = path.display().to_string();
        let changes = control
            .apply_config(config, &file)
            .context("applying the configuration")?;
        // Each change was logged as it was made.
        info!(file, changes = changes.len(), "configuration applied");
    }
    // After the services are known: a routed service needing a source address there is none
    // of refuses the start; then CONFIG is written.
    control
        .set_routed(routed)
        .context("the routed forwarding modes' settings")?;
    control.sync_vip_routes();
    control.set_state_file(state_file);
    info!(api = %api.display(), "ready");
    control_loop(&mut control, &inbox);

    control.clear_vip_routes();
    if args.keep_on_exit {
        drop(control);
        info!(pin_dir = %args.pin_dir.display(), "daemon stopped; the data plane keeps running (pinned maps and link); start `lb daemon` again to adopt it");
    } else {
        // Unpin first, so dropping the program's last link reference detaches it.
        pins.remove_all()?;
        drop(control);
        info!(ifaces = %ifaces.join(","), "XDP program detached and pins removed; daemon stopped");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = std::fs::remove_file(&api) {
        warn!("removing {}: {e}", api.display());
    }
    Ok(())
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name).context("interface name")?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()).with_context(|| format!("interface {name}")),
        index => Ok(index),
    }
}

fn read_state(path: &std::path::Path) -> anyhow::Result<Option<control::SavedState>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a saved state (remove it or pass --fresh)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn control_loop<P: Prober>(control: &mut Control<P>, inbox: &mpsc::Receiver<Event>) {
    let mut next_refresh = Instant::now();
    let mut next_recount = Instant::now() + FLOW_RECOUNT;
    // An event taken off the inbox while draining probe results, handled next.
    let mut pending = None;
    loop {
        let now = Instant::now();
        if now >= next_recount {
            control.recount_flows();
            control.sweep_nat();
            next_recount = now + FLOW_RECOUNT;
        }
        if now >= next_refresh {
            control.tick_clock();
            control.refresh_macs();
            control.tick_drains();
            next_refresh = now + NEIGHBOUR_REFRESH;
        }
        let event = match pending.take() {
            Some(event) => Ok(event),
            None => inbox.recv_timeout(next_refresh.saturating_duration_since(now)),
        };
        match event {
            Ok(Event::Api(request, reply)) => {
                // The client may have gone; the change is applied either way.
                let _ = reply.send(control.handle(request));
                control.sync_vip_routes();
            }
            // The probe results already queued are one batch: backends checked together (a
            // start, a switch's port coming back) change their service's table once.
            Ok(Event::Probe(key, outcome)) => {
                pending = control.batch(|control| {
                    control.probe_result(key, outcome);
                    loop {
                        match inbox.try_recv() {
                            Ok(Event::Probe(key, outcome)) => control.probe_result(key, outcome),
                            Ok(other) => return Some(other),
                            Err(_) => return None,
                        }
                    }
                });
            }
            Ok(Event::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

async fn wait_for_signal(events: EventSender) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the daemon with SIGKILL");
        return;
    };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(e) => {
            warn!("cannot install the SIGHUP handler ({e}); reload with `lb reload`");
            None
        }
    };
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: detaching"); break; }
            _ = int.recv() => { info!("SIGINT: detaching"); break; }
            Some(()) = async { hup.as_mut()?.recv().await } => {
                info!("SIGHUP: reloading the configuration");
                // The control loop logs the outcome; nobody waits for the answer.
                let (reply, _) = oneshot::channel();
                if events.send(Event::Api(Request::Reload, reply)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = events.send(Event::Shutdown);
}

/// Forwards records from the XDP program's log map to `tracing` (through the `log` bridge).
async fn drain_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring-buffer fd, which stays open and the same until the
    // AsyncFd (which owns the logger) is dropped.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut fd) = registered else {
        warn!("kernel-side logging unavailable: cannot poll the log map");
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Refuses to start when the API socket is held by a running daemon.
pub(crate) fn check_socket_free(api: &std::path::Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(api).is_ok() {
        bail!(
            "another daemon is already serving {} (stop it, or pick another --api path)",
            api.display()
        );
    }
    Ok(())
}
