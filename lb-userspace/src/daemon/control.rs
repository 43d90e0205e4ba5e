//! The daemon's single source of truth: services, backends, health, and the order in which
//! changes reach the maps. Every request is validated in full before anything is written, so a
//! refused request changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use lb_common::{AF_INET, BACKEND_F_ALIVE, BACKEND_NONE, RING_SIZE, Reason, SERVICE_F_FRAGMENTS};
use tracing::{info, warn};

use super::{
    config::{self, BackendConfig, RoutedSettings, ServiceConfig, ServiceSettings, Services},
    health::{ProbeKey, ProbeOutcome, ProbeTarget},
    reload::ConfigSource,
    routed::Routed,
};
use crate::{
    api::{
        BackendState, BackendStatus, CheckKind, Forward, HcTarget, Health, HealthCheck, Request,
        Response, Scheduler, ServiceAddr, ServiceStatus, Status,
    },
    dataplane::ServiceKey,
    dataplane::{Dataplane, DataplaneError, Sizing},
    neighbour,
    schedule::{self, Member},
};

/// What the daemon saves after every change and restores on start (`--state-file`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub iface: String,
    pub next_generation: u32,
    pub services: Vec<SavedService>,
}

impl SavedState {
    pub const VERSION: u32 = 1;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedService {
    pub service: ServiceAddr,
    pub id: u32,
    pub ring: u32,
    pub scheduler: Scheduler,
    pub forward: Forward,
    pub health: HealthCheck,
    #[serde(default)]
    pub fragments: bool,
    pub backends: Vec<SavedBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBackend {
    pub ip: IpAddr,
    pub id: u32,
    pub generation: u32,
    pub weight: u32,
    pub draining: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A TCP flow with no packet for this many ticks (~300 s; no FIN/RST seen) stops counting as
/// active.
const TCP_ACTIVE_IDLE: u32 = 280;
/// The same for UDP (~30 s), which has no close.
const UDP_ACTIVE_IDLE: u32 = 28;

/// CLOCK_MONOTONIC in the ticks of `FlowState::last_seen` (`bpf_ktime_get_coarse_ns` is the
/// coarse reading of the same clock).
fn monotonic_ticks() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ns = (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64;
    (ns >> lb_common::FLOW_TICK_SHIFT) as u32
}

/// Largest accepted backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("service {0} does not exist")]
    UnknownService(ServiceAddr),
    #[error("service {0} already exists")]
    DuplicateService(ServiceAddr),
    #[error("backend {ip} is not in service {service}")]
    UnknownBackend { service: ServiceAddr, ip: IpAddr },
    #[error("backend {ip} is already in service {service}")]
    DuplicateBackend { service: ServiceAddr, ip: IpAddr },
    #[error("{0}")]
    Invalid(String),
    #[error("no room: {0}")]
    Full(&'static str),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// Starts and stops the health probe of one backend (the daemon runs them on tokio; tests can
/// record the calls).
pub trait Prober {
    type Handle;
    fn start(&mut self, key: ProbeKey, target: ProbeTarget, check: HealthCheck) -> Self::Handle;
    fn stop(&mut self, handle: Self::Handle);
}

struct ServiceEntry {
    id: u32,
    ring: u32,
    scheduler: Scheduler,
    forward: Forward,
    health: HealthCheck,
    /// `SERVICE_F_FRAGMENTS`: the service is also written under port 0.
    fragments: bool,
    backends: BTreeMap<IpAddr, BackendEntry>,
    /// (backend id, weight) of the table now live, to skip rebuilding an identical one; `None`
    /// when unknown (just restored), which makes the next sync write it.
    table_members: Option<Vec<(u32, u32)>>,
}

struct BackendEntry {
    id: u32,
    generation: u32,
    weight: u32,
    /// `lb backend drain`: no new flows; established ones stay until they end or the deadline.
    draining: bool,
    drain_deadline: Option<Instant>,
    /// The drain finished: the backend keeps no flows either, until it is redeployed (its
    /// health checks fail and pass again), which ends the drain.
    drained: bool,
    /// Its health went down while draining (its server was stopped for a redeploy).
    down_while_draining: bool,
    health: Health,
    successes: u32,
    failures: u32,
    last_error: Option<String>,
    mac: Option<[u8; 6]>,
    /// The port it listens on when not the service's (nat, fullnat).
    port: Option<u16>,
    /// The value last written to the kernel's backend array.
    written: lb_common::Backend,
}

impl BackendEntry {
    /// May keep established flows: healthy, not drained and, for L2 DSR, with a known MAC
    /// (the routed modes take the next hop from the kernel's FIB). Draining backends keep
    /// theirs.
    fn alive(&self, forward: Forward) -> bool {
        self.health == Health::Up && (self.mac.is_some() || !forward.needs_mac()) && !self.drained
    }

    /// May receive new flows.
    fn in_table(&self, forward: Forward) -> bool {
        self.alive(forward) && !self.draining && self.weight > 0
    }
}

/// Small integer ids handed out lowest first.
struct IdPool(BTreeSet<u32>);

impl IdPool {
    fn new(n: u32) -> Self {
        IdPool((0..n).collect())
    }
    fn take(&mut self) -> Option<u32> {
        self.0.pop_first()
    }
    fn give_back(&mut self, id: u32) {
        self.0.insert(id);
    }
}

pub struct Control<P: Prober> {
    dp: Dataplane,
    iface: String,
    /// Every interface the balancer is attached to (`iface` first).
    ifaces: Vec<String>,
    /// The routed modes' settings; `None` (tests driving `Control` alone) leaves `CONFIG` to
    /// the caller and checks no source address.
    routed: Option<Routed>,
    /// `CONFIG` as last written.
    written_config: Option<lb_common::DataplaneConfig>,
    /// IP forwarding was turned on on `ifaces` for the routed modes.
    forwarding_on: bool,
    prober: P,
    services: BTreeMap<ServiceAddr, ServiceEntry>,
    probes: BTreeMap<(ServiceAddr, IpAddr), P::Handle>,
    service_ids: IdPool,
    ring_tables: IdPool,
    backend_ids: IdPool,
    /// Generation given to the next backend: unique across ids and restarts, so a
    /// connection-table entry made for an earlier holder of an id never matches a new one.
    next_generation: u32,
    /// Where the configuration is saved after every change, for restarts.
    state_file: Option<PathBuf>,
    /// VIPs with a route for VIP-addressed health checks (see vip_route.rs).
    vip_routes: BTreeSet<IpAddr>,
    /// The configuration file (`--config`) and what was last applied from it.
    pub(super) config: Option<ConfigSource>,
    /// In a batch of changes (`batch`): services with backends added, whose MACs are read and
    /// table rebuilt once, at the batch's end. `None` outside a batch.
    deferred: Option<BTreeSet<ServiceAddr>>,
}

impl<P: Prober> Control<P> {
    pub fn new(dp: Dataplane, iface: String, prober: P) -> Self {
        let sizing = dp.sizing();
        let mut control = Control {
            ifaces: vec![iface.clone()],
            routed: None,
            written_config: None,
            forwarding_on: false,
            iface,
            prober,
            services: BTreeMap::new(),
            probes: BTreeMap::new(),
            service_ids: IdPool::new(sizing.max_services),
            ring_tables: IdPool::new(sizing.ring_tables()),
            backend_ids: IdPool::new(sizing.max_backends),
            next_generation: 1,
            state_file: None,
            vip_routes: BTreeSet::new(),
            config: None,
            deferred: None,
            dp,
        };
        control.tick_clock();
        control
    }

    /// Adds the routes VIP-addressed health checks need and removes those no service needs.
    pub fn sync_vip_routes(&mut self) {
        let wanted: BTreeSet<IpAddr> = self
            .services
            .iter()
            .filter(|(_, e)| e.health.target == HcTarget::Vip)
            .map(|(addr, _)| addr.vip)
            .collect();
        for vip in wanted.difference(&self.vip_routes) {
            match super::vip_route::add(&self.iface, *vip) {
                Ok(()) => info!(%vip, "route for VIP-addressed health checks added"),
                Err(e) => warn!(%vip, "VIP-addressed health checks will fail: {e}"),
            }
        }
        for vip in self.vip_routes.difference(&wanted) {
            if let Err(e) = super::vip_route::remove(&self.iface, *vip) {
                warn!(%vip, "removing the health-check route: {e}");
            }
        }
        self.vip_routes = wanted;
    }

    /// Removes every route added for VIP-addressed health checks (a clean stop).
    pub fn clear_vip_routes(&mut self) {
        for vip in std::mem::take(&mut self.vip_routes) {
            if let Err(e) = super::vip_route::remove(&self.iface, vip) {
                warn!(%vip, "removing the health-check route: {e}");
            }
        }
    }

    /// Writes the current tick for the program to stamp flows with (called twice a second).
    pub fn tick_clock(&mut self) {
        if let Err(e) = self.dp.set_clock(monotonic_ticks()) {
            warn!("writing the clock: {e}");
        }
    }

    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Every interface the balancer is attached to (the first is `iface`); the neighbour
    /// tables of all of them are read for backend MACs.
    pub fn set_ifaces(&mut self, ifaces: Vec<String>) {
        if let Some(first) = ifaces.first() {
            self.iface = first.clone();
            self.ifaces = ifaces;
        }
    }

    pub fn ifaces(&self) -> &[String] {
        &self.ifaces
    }

    /// Takes the routed modes' settings: from now on `CONFIG` follows the services (written
    /// now and whenever they change) and a routed service that needs a source address its
    /// settings lack is refused. Fails when a service already configured needs one.
    pub fn set_routed(&mut self, routed: Routed) -> Result<(), ControlError> {
        for (addr, e) in &self.services {
            routed
                .check_sources(addr, e.forward, e.backends.keys().copied())
                .map_err(ControlError::Invalid)?;
        }
        self.routed = Some(routed);
        self.written_config = None;
        self.sync_routed();
        Ok(())
    }

    /// The routed settings as given (flags and file), for `lb config dump`.
    pub fn routed_settings(&self) -> RoutedSettings {
        self.routed.as_ref().map(|r| r.given).unwrap_or_default()
    }

    /// Refuses a service or backend whose routed mode needs a source address there is none of.
    fn check_sources(
        &self,
        addr: &ServiceAddr,
        forward: Forward,
        backends: impl Iterator<Item = IpAddr>,
    ) -> Result<(), ControlError> {
        match &self.routed {
            Some(r) => r
                .check_sources(addr, forward, backends)
                .map_err(ControlError::Invalid),
            None => Ok(()),
        }
    }

    /// Writes `CONFIG` when it changed (`CONFIG_F_NAT` iff a service uses nat or fullnat) and
    /// turns IP forwarding on on the balancer's interfaces once a service uses a routed mode
    /// (the program's FIB lookups fail without it).
    fn sync_routed(&mut self) {
        let Some(routed) = &self.routed else { return };
        let nat = self.services.values().any(|e| e.forward.nat());
        let wanted = routed.kernel(nat);
        if self.written_config != Some(wanted) {
            match self.dp.set_config(&wanted) {
                Ok(()) => self.written_config = Some(wanted),
                Err(e) => warn!("writing the routed modes' settings: {e}"),
            }
        }
        if !self.forwarding_on && self.services.values().any(|e| e.forward.routed()) {
            match super::routed::enable_forwarding(&self.ifaces) {
                Ok(()) => info!(
                    ifaces = self.ifaces.join(","),
                    "IPv4 and IPv6 forwarding turned on for the routed forwarding modes"
                ),
                Err(e) => warn!("routed modes will drop packets (drop_no_route): {e}"),
            }
            self.forwarding_on = true;
        }
    }

    pub fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::ServiceAdd {
                service,
                scheduler,
                forward,
                health,
                fragments,
            } => self.service_add(service, scheduler, forward, health, fragments),
            Request::ServiceDel { service } => self.service_del(service),
            Request::BackendAdd {
                service,
                ip,
                weight,
                port,
            } => self.backend_add(service, ip, weight, port),
            Request::BackendDel { service, ip } => self.backend_del(service, ip),
            Request::BackendDrain {
                service,
                ip,
                timeout_ms,
            } => self.backend_drain(service, ip, timeout_ms.map(Duration::from_millis)),
            Request::BackendSet {
                service,
                ip,
                weight,
            } => self.backend_set(service, ip, weight),
            Request::Status => return self.status().unwrap_or_else(error_response),
            Request::Reload => {
                return match self.reload() {
                    Ok(response) => {
                        self.save();
                        response
                    }
                    Err(e) => error_response(e),
                };
            }
            Request::ConfigDump => return self.config_dump(),
        };
        match result {
            Ok(()) => {
                self.save();
                Response::Ok
            }
            Err(e) => error_response(e),
        }
    }

    /// Saves the configuration after every change (write to a temporary file, then rename, so a
    /// crash leaves the old file or the new one, never half of one).
    pub fn set_state_file(&mut self, path: PathBuf) {
        self.state_file = Some(path);
        self.save();
    }

    fn save(&self) {
        let Some(path) = &self.state_file else { return };
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec_pretty(&self.snapshot())
            .map_err(std::io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            warn!(path = %path.display(), "saving the daemon state failed: {e}; a restart would lose the last change");
        }
    }

    /// The configuration and the ids that tie it to the maps.
    pub fn snapshot(&self) -> SavedState {
        SavedState {
            version: SavedState::VERSION,
            iface: self.iface.clone(),
            next_generation: self.next_generation,
            services: self
                .services
                .iter()
                .map(|(addr, e)| SavedService {
                    service: *addr,
                    id: e.id,
                    ring: e.ring,
                    scheduler: e.scheduler,
                    forward: e.forward,
                    health: e.health.clone(),
                    fragments: e.fragments,
                    backends: e
                        .backends
                        .iter()
                        .map(|(ip, b)| SavedBackend {
                            ip: *ip,
                            id: b.id,
                            generation: b.generation,
                            weight: b.weight,
                            draining: b.draining,
                            port: b.port,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Rebuilds the daemon's state from a saved one over maps that may already hold it (a
    /// restart: `adopt` is true and the kernel's backend entries say which backends were alive,
    /// so traffic keeps flowing to them while their probes catch up) or that are new (`adopt`
    /// false: the saved configuration is applied from scratch). Either way the kernel is then
    /// reconciled with the state: every service entry and table is written again, and service
    /// or backend entries the state does not know are removed.
    pub fn restore(&mut self, saved: SavedState, adopt: bool) -> Result<(), ControlError> {
        if saved.version != SavedState::VERSION {
            return Err(ControlError::Invalid(format!(
                "state file version {} is not {} (written by another version)",
                saved.version,
                SavedState::VERSION
            )));
        }
        if adopt && saved.iface != self.iface {
            return Err(ControlError::Invalid(format!(
                "the pinned data plane runs on {}, not {}; start with --iface {} or --fresh",
                saved.iface, self.iface, saved.iface
            )));
        }
        self.next_generation = saved.next_generation.max(1);
        let mut kept_keys = Vec::new();
        for s in saved.services {
            let key = service_key(&s.service)?;
            if !self.service_ids.0.remove(&s.id) || !self.ring_tables.0.remove(&s.ring) {
                return Err(ControlError::Invalid(format!(
                    "state file: service {} has an id or table out of range or used twice",
                    s.service
                )));
            }
            let mut backends = BTreeMap::new();
            for b in s.backends {
                if !self.backend_ids.0.remove(&b.id) {
                    return Err(ControlError::Invalid(format!(
                        "state file: backend {} has an id out of range or used twice",
                        b.ip
                    )));
                }
                let kernel = if adopt {
                    self.dp.backend(b.id).ok()
                } else {
                    None
                }
                .filter(|k| k.generation == b.generation);
                let alive = kernel.is_some_and(|k| k.flags & BACKEND_F_ALIVE != 0);
                let written = kernel.unwrap_or_else(dead_backend);
                backends.insert(
                    b.ip,
                    BackendEntry {
                        id: b.id,
                        generation: b.generation,
                        weight: b.weight,
                        draining: b.draining,
                        drain_deadline: None,
                        drained: false,
                        down_while_draining: false,
                        health: if alive || s.health.kind == CheckKind::None {
                            Health::Up
                        } else {
                            Health::Unknown
                        },
                        successes: 0,
                        failures: 0,
                        last_error: None,
                        mac: kernel.map(|k| k.mac).filter(|m| *m != [0; 6]),
                        port: b.port,
                        written,
                    },
                );
                let probe = self.prober.start(
                    ProbeKey {
                        service: s.service,
                        ip: b.ip,
                        generation: b.generation,
                    },
                    probe_target(
                        s.service,
                        b.ip,
                        b.port.unwrap_or(s.service.port),
                        b.id,
                        &s.health,
                    ),
                    s.health.clone(),
                );
                self.probes.insert((s.service, b.ip), probe);
            }
            self.services.insert(
                s.service,
                ServiceEntry {
                    id: s.id,
                    ring: s.ring,
                    scheduler: s.scheduler,
                    forward: s.forward,
                    health: s.health,
                    fragments: s.fragments,
                    backends,
                    // The next sync writes the table again (into the spare, then switches),
                    // identical to the live one when nothing changed meanwhile.
                    table_members: None,
                },
            );
            kept_keys.push(key);
            if s.fragments {
                kept_keys.push(fragment_key(&s.service));
            }
        }
        // Service entries the state does not know (a change applied to the maps just before a
        // crash, before it was saved) would point at tables and ids now free: remove them.
        for key in self.dp.service_keys()? {
            if !kept_keys.contains(&key) {
                self.dp.remove_service(&key)?;
            }
        }
        let free: Vec<u32> = self.backend_ids.0.iter().copied().collect();
        for id in free {
            if self.dp.backend(id).is_ok_and(|k| k.flags != 0) {
                self.dp.set_backend(id, dead_backend())?;
            }
        }
        let addrs: Vec<ServiceAddr> = self.services.keys().copied().collect();
        for addr in addrs {
            if let Some(e) = self.services.get(&addr) {
                set_service_value(
                    &mut self.dp,
                    &addr,
                    kernel_service(e.id, e.ring, e.scheduler, e.forward, e.fragments),
                )?;
            }
            self.sync_service(addr)?;
        }
        self.sync_routed();
        info!(services = self.services.len(), adopt, "state restored");
        self.sync_vip_routes();
        self.save();
        Ok(())
    }

    pub fn service_add(
        &mut self,
        addr: ServiceAddr,
        scheduler: Scheduler,
        forward: Forward,
        health: HealthCheck,
        fragments: bool,
    ) -> Result<(), ControlError> {
        service_key(&addr)?;
        if self.services.contains_key(&addr) {
            return Err(ControlError::DuplicateService(addr));
        }
        if fragments {
            self.check_fragments(&addr, scheduler, forward)?;
        }
        self.check_sources(&addr, forward, std::iter::empty())?;
        if health.rise == 0 || health.fall == 0 {
            return Err(ControlError::Invalid(
                "health-check rise and fall must be at least 1".into(),
            ));
        }
        if health.timeout > health.interval {
            return Err(ControlError::Invalid(
                "health-check timeout must not exceed the interval".into(),
            ));
        }
        health.kind.validate().map_err(ControlError::Invalid)?;
        let id = self.service_ids.take().ok_or(ControlError::Full(
            "every service slot is in use (--max-services)",
        ))?;
        // There is always a spare: one more ring table than service ids.
        let Some(ring) = self.ring_tables.take() else {
            self.service_ids.give_back(id);
            return Err(ControlError::Full("no free ring table"));
        };
        let written = self
            .dp
            .write_ring(ring, &vec![BACKEND_NONE; RING_SIZE as usize])
            .and_then(|()| self.dp.reset_service_traffic(id))
            .and_then(|()| {
                set_service_value(
                    &mut self.dp,
                    &addr,
                    kernel_service(id, ring, scheduler, forward, fragments),
                )
            });
        if let Err(e) = written {
            self.service_ids.give_back(id);
            self.ring_tables.give_back(ring);
            return Err(e.into());
        }
        info!(service = %addr, id, forward = forward.name(), fragments, "service added");
        self.services.insert(
            addr,
            ServiceEntry {
                id,
                ring,
                scheduler,
                forward,
                health,
                fragments,
                backends: BTreeMap::new(),
                table_members: Some(Vec::new()),
            },
        );
        self.sync_routed();
        Ok(())
    }

    /// Refuses fragments on a service that cannot have them, or on a second service of the
    /// same VIP and protocol (both would be written under the one port-0 key).
    fn check_fragments(
        &self,
        addr: &ServiceAddr,
        scheduler: Scheduler,
        forward: Forward,
    ) -> Result<(), ControlError> {
        crate::api::check_fragments(scheduler, forward).map_err(ControlError::Invalid)?;
        if let Some((other, _)) = self.services.iter().find(|(other, e)| {
            *other != addr && e.fragments && (other.vip, other.proto) == (addr.vip, addr.proto)
        }) {
            return Err(ControlError::Invalid(format!(
                "service {other} already forwards the fragments of this VIP and protocol \
                 (fragments carry no port, so only one service can)"
            )));
        }
        Ok(())
    }

    pub fn service_del(&mut self, addr: ServiceAddr) -> Result<(), ControlError> {
        let key = service_key(&addr)?;
        if !self.services.contains_key(&addr) {
            return Err(ControlError::UnknownService(addr));
        }
        // Unhook the VIP first: from here on its packets pass to the kernel, so nothing reads the
        // ring or backends we release below.
        self.dp.remove_service(&key)?;
        if self.services.get(&addr).is_some_and(|e| e.fragments) {
            self.dp.remove_service(&fragment_key(&addr))?;
        }
        let Some(entry) = self.services.remove(&addr) else {
            return Ok(());
        };
        for (ip, backend) in &entry.backends {
            if let Some(probe) = self.probes.remove(&(addr, *ip)) {
                self.prober.stop(probe);
            }
            self.release_backend(backend.id);
        }
        self.ring_tables.give_back(entry.ring);
        self.service_ids.give_back(entry.id);
        info!(service = %addr, "service deleted");
        self.sync_routed();
        Ok(())
    }

    /// Adds backend `ip` to service `addr`; `port` is where it listens when that is not the
    /// service port (nat and fullnat only).
    pub fn backend_add(
        &mut self,
        addr: ServiceAddr,
        ip: IpAddr,
        weight: u32,
        port: Option<u16>,
    ) -> Result<(), ControlError> {
        let entry = self
            .services
            .get(&addr)
            .ok_or(ControlError::UnknownService(addr))?;
        // dsr leaves the packet as the client sent it (the backend holds the VIP and answers
        // from it); nat and fullnat rewrite addresses of the client's family: the backend must
        // be of the VIP's family. ipip and gue carry either family in either.
        crate::api::check_backend_family(&addr, entry.forward, ip)
            .map_err(ControlError::Invalid)?;
        crate::api::check_backend_port(&addr, entry.forward, ip, port)
            .map_err(ControlError::Invalid)?;
        let port = port.filter(|p| *p != addr.port);
        let owner = (entry.id, entry.forward.kernel());
        self.check_sources(&addr, entry.forward, std::iter::once(ip))?;
        let unicast = match ip {
            IpAddr::V4(v4) => {
                !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.is_loopback())
            }
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_loopback()),
        };
        if !unicast {
            return Err(ControlError::Invalid(format!(
                "backend {ip} is not a unicast host address"
            )));
        }
        if ip == addr.vip {
            return Err(ControlError::Invalid(format!(
                "backend {ip} is the service's own VIP"
            )));
        }
        if weight > MAX_WEIGHT {
            return Err(ControlError::Invalid(format!(
                "weight {weight} is above the maximum {MAX_WEIGHT}"
            )));
        }
        if entry.backends.contains_key(&ip) {
            return Err(ControlError::DuplicateBackend { service: addr, ip });
        }
        if entry.scheduler == Scheduler::LeastConn
            && entry.backends.len() >= lb_common::LC_MAX_BACKENDS as usize
        {
            return Err(ControlError::Invalid(format!(
                "a least-conn service has at most {} backends",
                lb_common::LC_MAX_BACKENDS
            )));
        }
        let health = entry.health.clone();
        // A `none` check never reports, so the backend is up from the start (it still needs its
        // MAC; the prober makes the kernel resolve it).
        let initial_health = if health.kind == CheckKind::None {
            Health::Up
        } else {
            Health::Unknown
        };
        let id = self.backend_ids.take().ok_or(ControlError::Full(
            "every backend slot is in use (--max-backends)",
        ))?;
        let generation = self.next_generation;
        let written = kernel_backend(
            owner.0,
            owner.1,
            ip,
            port.unwrap_or(addr.port),
            None,
            generation,
            0,
        );
        let stored = self
            .dp
            .reset_backend_traffic(id)
            .and_then(|()| self.dp.set_flow_count(id, 0))
            .and_then(|()| self.dp.set_backend(id, written));
        if let Err(e) = stored {
            self.backend_ids.give_back(id);
            return Err(e.into());
        }
        self.next_generation = generation.wrapping_add(1).max(1);
        let probe = self.prober.start(
            ProbeKey {
                service: addr,
                ip,
                generation,
            },
            probe_target(addr, ip, port.unwrap_or(addr.port), id, &health),
            health,
        );
        self.probes.insert((addr, ip), probe);
        // Its MAC may already be known; a batch reads the neighbour tables once at its end.
        let mac = if self.deferred.is_some() {
            None
        } else {
            self.known_mac(ip)
        };
        let Some(entry) = self.services.get_mut(&addr) else {
            return Ok(());
        };
        entry.backends.insert(
            ip,
            BackendEntry {
                id,
                generation,
                weight,
                draining: false,
                drain_deadline: None,
                drained: false,
                down_while_draining: false,
                health: initial_health,
                successes: 0,
                failures: 0,
                last_error: None,
                mac,
                port,
                written,
            },
        );
        info!(service = %addr, backend = %ip, port = port.unwrap_or(addr.port), id, weight, "backend added; waiting for health checks");
        if let Some(dirty) = &mut self.deferred {
            dirty.insert(addr);
            return Ok(());
        }
        // A routed mode needs no MAC: a backend up from the start (a `none` check) is alive now.
        if let Err(e) = self.sync_service(addr) {
            warn!(service = %addr, "adding backend {ip}: {e}");
        }
        Ok(())
    }

    /// Runs `changes` as one batch: a backend added in it, or whose health changed, enters or
    /// leaves its service's table when the batch ends, so a service given many backends (or
    /// whose backends come up together) has its table built once, not once per backend (a
    /// Maglev build is about 1 ms), and the neighbour tables are read once. Safe to wait for:
    /// an added backend's kernel entry is written at once; only the ring does not name it yet.
    /// Every other change syncs its service at once.
    pub fn batch<T>(&mut self, changes: impl FnOnce(&mut Self) -> T) -> T {
        if self.deferred.is_some() {
            return changes(self);
        }
        self.deferred = Some(BTreeSet::new());
        let result = changes(self);
        let dirty = self.deferred.take().unwrap_or_default();
        if !dirty.is_empty() {
            self.refresh_macs();
        }
        for addr in dirty {
            if self.services.contains_key(&addr)
                && let Err(e) = self.sync_service(addr)
            {
                warn!(service = %addr, "adding backends: {e}");
            }
        }
        result
    }

    pub fn backend_del(&mut self, addr: ServiceAddr, ip: IpAddr) -> Result<(), ControlError> {
        let entry = self
            .services
            .get_mut(&addr)
            .ok_or(ControlError::UnknownService(addr))?;
        let Some(backend) = entry.backends.remove(&ip) else {
            return Err(ControlError::UnknownBackend { service: addr, ip });
        };
        if let Some(probe) = self.probes.remove(&(addr, ip)) {
            self.prober.stop(probe);
        }
        // Out of the table first, then out of the backend array, then its id is free.
        if let Err(e) = self.sync_service(addr) {
            warn!(service = %addr, "rebuilding the table after deleting {ip}: {e}");
        }
        self.release_backend(backend.id);
        info!(service = %addr, backend = %ip, "backend deleted");
        Ok(())
    }

    /// The entry of backend `ip` of service `addr`.
    fn backend_mut(
        &mut self,
        addr: ServiceAddr,
        ip: IpAddr,
    ) -> Result<&mut BackendEntry, ControlError> {
        self.services
            .get_mut(&addr)
            .ok_or(ControlError::UnknownService(addr))?
            .backends
            .get_mut(&ip)
            .ok_or(ControlError::UnknownBackend { service: addr, ip })
    }

    pub fn backend_drain(
        &mut self,
        addr: ServiceAddr,
        ip: IpAddr,
        timeout: Option<Duration>,
    ) -> Result<(), ControlError> {
        let backend = self.backend_mut(addr, ip)?;
        backend.drain_deadline = timeout.map(|t| Instant::now() + t);
        if !backend.draining {
            backend.draining = true;
            backend.down_while_draining = false;
            self.sync_service(addr)?;
            info!(service = %addr, backend = %ip, ?timeout, "backend draining: no new flows");
        }
        Ok(())
    }

    /// Recounts each backend's active flows from the connection table and writes the counts
    /// the kernel keeps, correcting what its +1/-1 bookkeeping cannot see: flows that went
    /// idle without a FIN (all UDP flows) and entries the LRU evicted. Active: not closed, of
    /// this backend's generation, and seen within the idle timeout of its protocol.
    pub fn recount_flows(&mut self) {
        let flows = match self.dp.flows() {
            Ok(f) => f,
            Err(e) => {
                warn!("recounting flows: {e}");
                return;
            }
        };
        let now = monotonic_ticks();
        let mut counts: BTreeMap<u32, (u32, i64)> = BTreeMap::new();
        for entry in self.services.values() {
            for b in entry.backends.values() {
                counts.insert(b.id, (b.generation, 0));
            }
        }
        for (proto, state) in flows {
            let idle = if proto == lb_common::PROTO_TCP {
                TCP_ACTIVE_IDLE
            } else {
                UDP_ACTIVE_IDLE
            };
            if state.flags & lb_common::FLOW_F_CLOSED == 0
                && now.saturating_sub(state.last_seen) <= idle
                && let Some((generation, n)) = counts.get_mut(&state.backend)
                && *generation == state.generation
            {
                *n += 1;
            }
        }
        for (id, (_, n)) in counts {
            if let Err(e) = self.dp.set_flow_count(id, n) {
                warn!(id, "writing a flow count: {e}");
            }
        }
    }

    /// Deletes closed and idle nat/fullnat flows (see `nat_expiry`); run every few seconds.
    pub fn sweep_nat(&mut self) {
        self.sweep_nat_at(monotonic_ticks());
    }

    /// `sweep_nat` as if the clock read `now` (ticks of `FLOW_TICK_SHIFT`).
    pub fn sweep_nat_at(&mut self, now: u32) {
        let tables = match self.dp.nat_tables() {
            Ok(t) => t,
            Err(e) => {
                warn!("reading the NAT tables: {e}");
                return;
            }
        };
        let v4 = super::nat_expiry::expired(&tables.flows_v4, &tables.replies_v4, now);
        let v6 = super::nat_expiry::expired(&tables.flows_v6, &tables.replies_v6, now);
        if let Err(e) = self
            .dp
            .remove_nat(&v4.flows, &v4.replies, &v6.flows, &v6.replies)
        {
            warn!("expiring NAT flows: {e}");
        }
    }

    /// Finishes drains: a draining backend whose last flow ended (the kernel's count of its
    /// active flows is zero) or whose deadline passed becomes drained, and its remaining flows
    /// move to other backends.
    pub fn tick_drains(&mut self) {
        let now = Instant::now();
        let mut changed = Vec::new();
        for (addr, entry) in &mut self.services {
            for (ip, b) in &mut entry.backends {
                if !b.draining || b.drained {
                    continue;
                }
                let flows = self.dp.flow_count(b.id).unwrap_or(0);
                let timed_out = b.drain_deadline.is_some_and(|d| now >= d);
                if flows <= 0 || timed_out {
                    b.drained = true;
                    if flows > 0 {
                        warn!(service = %addr, backend = %ip, flows, "drain timeout: remaining flows move to other backends");
                    } else {
                        info!(service = %addr, backend = %ip, "drain complete: its last flow ended");
                    }
                    changed.push(*addr);
                }
            }
        }
        changed.dedup();
        for addr in changed {
            if let Err(e) = self.sync_service(addr) {
                warn!(service = %addr, "finishing a drain: {e}");
            }
        }
    }

    /// Changes a backend's weight. The Maglev table is rebuilt at once; established flows keep
    /// their backend (connection table). Weight 0 takes the backend out of the table like a drain.
    pub fn backend_set(
        &mut self,
        addr: ServiceAddr,
        ip: IpAddr,
        weight: u32,
    ) -> Result<(), ControlError> {
        if weight > MAX_WEIGHT {
            return Err(ControlError::Invalid(format!(
                "weight {weight} is above the maximum {MAX_WEIGHT}"
            )));
        }
        let backend = self.backend_mut(addr, ip)?;
        let before = backend.weight;
        if before != weight {
            backend.weight = weight;
            if let Err(e) = self.sync_service(addr) {
                // Nothing was switched: keep what the kernel still has.
                if let Some(b) = self
                    .services
                    .get_mut(&addr)
                    .and_then(|s| s.backends.get_mut(&ip))
                {
                    b.weight = before;
                }
                return Err(e);
            }
            info!(service = %addr, backend = %ip, from = before, to = weight, "backend weight changed");
        }
        Ok(())
    }

    /// A health probe finished. Applies rise/fall and, on a change of state, the maps.
    pub fn probe_result(&mut self, key: ProbeKey, outcome: ProbeOutcome) {
        let Some(entry) = self.services.get_mut(&key.service) else {
            return;
        };
        let (rise, fall) = (entry.health.rise, entry.health.fall);
        if entry.health.kind == CheckKind::None {
            return; // never expected: health is not checked
        }
        let Some(backend) = entry.backends.get_mut(&key.ip) else {
            return;
        };
        if backend.generation != key.generation {
            return; // a probe of an earlier backend with this address
        }
        let before = backend.health;
        match outcome {
            Ok(()) => {
                backend.successes += 1;
                backend.failures = 0;
                backend.last_error = None;
                if backend.health != Health::Up && backend.successes >= rise {
                    backend.health = Health::Up;
                }
            }
            Err(error) => {
                backend.failures += 1;
                backend.successes = 0;
                backend.last_error = Some(error);
                if backend.health != Health::Down && backend.failures >= fall {
                    backend.health = Health::Down;
                }
            }
        }
        if backend.health != before {
            if backend.draining && backend.health == Health::Down {
                backend.down_while_draining = true;
            }
            if backend.draining && backend.health == Health::Up && backend.down_while_draining {
                // Stopped and started again while drained: a redeploy. Back in service.
                backend.draining = false;
                backend.drained = false;
                backend.drain_deadline = None;
                info!(service = %key.service, backend = %key.ip, "redeployed backend is back in service");
            }
            match &backend.last_error {
                Some(err) => {
                    warn!(service = %key.service, backend = %key.ip, error = %err, "backend is down")
                }
                None => info!(service = %key.service, backend = %key.ip, "backend is up"),
            }
            let up = backend.health == Health::Up;
            // In a batch, the service is synced (and the neighbours read) once at its end.
            if let Some(dirty) = &mut self.deferred {
                dirty.insert(key.service);
                return;
            }
            if up {
                // The probe's connection resolved the neighbour; read it now rather than on the
                // next tick so the backend enters the table at once.
                self.refresh_macs();
            }
            if let Err(e) = self.sync_service(key.service) {
                warn!(service = %key.service, "applying a health change: {e}");
            }
        }
    }

    /// Reads the neighbour tables of the balancer's interfaces and applies new or changed
    /// backend MACs.
    /// The MAC of neighbour `ip` on the first of the daemon's interfaces that knows it.
    fn known_mac(&self, ip: IpAddr) -> Option<[u8; 6]> {
        self.ifaces
            .iter()
            .find_map(|iface| match neighbour::lookup(iface, ip) {
                Ok(mac) => mac,
                Err(e) => {
                    warn!(iface, "reading the neighbour table: {e}");
                    None
                }
            })
    }

    pub fn refresh_macs(&mut self) {
        let mut table = std::collections::HashMap::new();
        for iface in &self.ifaces {
            match neighbour::table(iface) {
                Ok(t) => table.extend(t),
                Err(e) => {
                    warn!(iface, "reading the neighbour table: {e}");
                    return;
                }
            }
        }
        let mut changed = Vec::new();
        for (addr, entry) in &mut self.services {
            for (ip, backend) in &mut entry.backends {
                // A MAC that disappears from the table is kept: the entry was only garbage
                // collected, and a backend that is really gone fails its health checks.
                if let Some(mac) = table.get(ip)
                    && backend.mac != Some(*mac)
                {
                    info!(service = %addr, backend = %ip, mac = %neighbour::format_mac(mac), "backend MAC learned");
                    backend.mac = Some(*mac);
                    changed.push(*addr);
                }
            }
        }
        changed.dedup();
        for addr in changed {
            if let Err(e) = self.sync_service(addr) {
                warn!(service = %addr, "applying a MAC change: {e}");
            }
        }
    }

    /// Brings the kernel in line with a service's backends: first backends that became usable
    /// are written, then the table is rebuilt (in the spare table, then switched to in one map
    /// update), then backends that became unusable are written. So the ring never names a
    /// backend the kernel does not know as alive, and an unusable backend leaves the table
    /// before its flows are moved.
    fn sync_service(&mut self, addr: ServiceAddr) -> Result<(), ControlError> {
        let Some(entry) = self.services.get_mut(&addr) else {
            return Err(ControlError::UnknownService(addr));
        };
        write_backends(&mut self.dp, entry, addr.port, true)?;

        let forward = entry.forward;
        let members: Vec<Member> = entry
            .backends
            .iter()
            .filter(|(_, b)| b.in_table(forward))
            .map(|(ip, b)| Member {
                ip: *ip,
                id: b.id,
                weight: b.weight,
            })
            .collect();
        let ids: Vec<(u32, u32)> = members.iter().map(|m| (m.id, m.weight)).collect();
        if entry.table_members.as_ref() != Some(&ids) {
            let table = schedule::ring(entry.scheduler, &members, addr.port)
                .map_err(ControlError::Invalid)?;
            let lc_list = match entry.scheduler {
                Scheduler::LeastConn => {
                    Some(schedule::lc_list(&members).map_err(ControlError::Invalid)?)
                }
                _ => None,
            };
            let spare = self
                .ring_tables
                .take()
                .ok_or(ControlError::Full("no spare ring table"))?;
            let switched = self
                .dp
                .write_ring(spare, &table)
                .and_then(|()| match &lc_list {
                    Some(list) => self.dp.write_lc_list(spare, list),
                    None => Ok(()),
                })
                .and_then(|()| {
                    set_service_value(
                        &mut self.dp,
                        &addr,
                        kernel_service(
                            entry.id,
                            spare,
                            entry.scheduler,
                            entry.forward,
                            entry.fragments,
                        ),
                    )
                });
            if let Err(e) = switched {
                self.ring_tables.give_back(spare);
                return Err(e.into());
            }
            self.ring_tables.give_back(entry.ring);
            entry.ring = spare;
            info!(service = %addr, backends = ids.len(), scheduler = entry.scheduler.name(), "table switched");
            entry.table_members = Some(ids);
        }

        write_backends(&mut self.dp, entry, addr.port, false)?;
        Ok(())
    }

    /// Marks a backend id dead in the kernel (so flows pinned to it move) and frees it.
    fn release_backend(&mut self, id: u32) {
        let dead = dead_backend();
        if let Err(e) = self.dp.set_backend(id, dead) {
            warn!(id, "clearing a released backend: {e}");
        }
        self.backend_ids.give_back(id);
    }

    /// The running services and backends, as a configuration file would declare them.
    pub fn running(&self) -> Services {
        self.services
            .iter()
            .map(|(addr, e)| {
                let settings = ServiceSettings {
                    scheduler: e.scheduler,
                    forward: e.forward,
                    health: e.health.clone(),
                    fragments: e.fragments,
                };
                let backends = e
                    .backends
                    .iter()
                    .map(|(ip, b)| {
                        let backend = BackendConfig {
                            weight: b.weight,
                            drain: b.draining,
                            port: b.port,
                        };
                        (*ip, backend)
                    })
                    .collect();
                (*addr, ServiceConfig { settings, backends })
            })
            .collect()
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn sizing(&self) -> Sizing {
        self.dp.sizing()
    }

    /// Changes a service's settings in place: its id, table and backends stay, so its
    /// established flows keep their backends. A new health check restarts the probes (health
    /// states are kept: a backend up stays up until `fall` failures of the new check).
    pub fn service_update(
        &mut self,
        addr: ServiceAddr,
        settings: ServiceSettings,
    ) -> Result<(), ControlError> {
        config::check_health(&settings.health).map_err(ControlError::Invalid)?;
        let entry = self
            .services
            .get(&addr)
            .ok_or(ControlError::UnknownService(addr))?;
        // The backends it keeps must suit the new mode (a reload removes those it drops and
        // re-adds those whose port changes before it changes settings).
        for (ip, b) in &entry.backends {
            crate::api::check_backend_family(&addr, settings.forward, *ip)
                .and_then(|()| crate::api::check_backend_port(&addr, settings.forward, *ip, b.port))
                .map_err(ControlError::Invalid)?;
        }
        self.check_sources(&addr, settings.forward, entry.backends.keys().copied())?;
        if settings.fragments {
            self.check_fragments(&addr, settings.scheduler, settings.forward)?;
        }
        let Some(entry) = self.services.get_mut(&addr) else {
            return Err(ControlError::UnknownService(addr));
        };
        let retable = entry.scheduler != settings.scheduler
            || entry.forward != settings.forward
            || entry.fragments != settings.fragments;
        let fragments_off = entry.fragments && !settings.fragments;
        entry.scheduler = settings.scheduler;
        entry.forward = settings.forward;
        entry.fragments = settings.fragments;
        if entry.health != settings.health {
            entry.health = settings.health.clone();
            for (ip, b) in &entry.backends {
                if let Some(probe) = self.probes.remove(&(addr, *ip)) {
                    self.prober.stop(probe);
                }
                let key = ProbeKey {
                    service: addr,
                    ip: *ip,
                    generation: b.generation,
                };
                let target =
                    probe_target(addr, *ip, b.port.unwrap_or(addr.port), b.id, &entry.health);
                let probe = self.prober.start(key, target, entry.health.clone());
                self.probes.insert((addr, *ip), probe);
            }
        }
        if retable {
            // Written again under the new settings (into the spare table, then switched; the
            // backends' alive flags follow the new mode).
            entry.table_members = None;
            self.sync_service(addr)?;
        }
        if fragments_off {
            self.dp.remove_service(&fragment_key(&addr))?;
        }
        self.sync_routed();
        info!(service = %addr, scheduler = settings.scheduler.name(), forward = settings.forward.name(), fragments = settings.fragments, "service settings changed in place");
        Ok(())
    }

    /// Sets a backend's weight and drain state in place (same id: its flows stay).
    pub fn backend_update(
        &mut self,
        addr: ServiceAddr,
        ip: IpAddr,
        backend: BackendConfig,
    ) -> Result<(), ControlError> {
        config::check_weight(backend.weight).map_err(ControlError::Invalid)?;
        let entry = self
            .services
            .get_mut(&addr)
            .ok_or(ControlError::UnknownService(addr))?;
        let b = entry
            .backends
            .get_mut(&ip)
            .ok_or(ControlError::UnknownBackend { service: addr, ip })?;
        if (b.weight, b.draining) != (backend.weight, backend.drain) {
            b.weight = backend.weight;
            b.draining = backend.drain;
            self.sync_service(addr)?;
            info!(service = %addr, backend = %ip, weight = backend.weight, draining = backend.drain, "backend updated");
        }
        Ok(())
    }

    pub fn status(&self) -> Result<Response, ControlError> {
        let mut services = Vec::new();
        for (addr, entry) in &self.services {
            let e = entry;
            let traffic = self.dp.service_traffic(e.id)?;
            let mut backends = Vec::new();
            for (ip, b) in &e.backends {
                let t = self.dp.backend_traffic(b.id)?;
                backends.push(BackendStatus {
                    ip: *ip,
                    port: b.port.unwrap_or(addr.port),
                    weight: b.weight,
                    // Weight 0 behaves as a drain, so it reads as one.
                    state: if b.drained {
                        BackendState::Drained
                    } else if b.draining || b.weight == 0 {
                        BackendState::Draining
                    } else if b.in_table(e.forward) {
                        BackendState::Active
                    } else {
                        BackendState::Down
                    },
                    health: b.health,
                    last_error: b.last_error.clone(),
                    mac: b.mac.as_ref().map(neighbour::format_mac),
                    in_table: b.in_table(e.forward),
                    active_flows: self.dp.flow_count(b.id)?,
                    packets: t.packets,
                    flows: t.flows,
                    bytes: t.bytes,
                });
            }
            services.push(ServiceStatus {
                service: addr.to_string(),
                forward: e.forward,
                scheduler: e.scheduler,
                fragments: e.fragments,
                health_check: e.health.clone(),
                packets: traffic.packets,
                flows: traffic.flows,
                bytes: traffic.bytes,
                backends,
            });
        }
        let counts = self.dp.reason_counts()?;
        let counters = Reason::ALL
            .iter()
            .map(|(r, name)| (name.to_string(), counts[*r as usize]))
            .collect();
        Ok(Response::Status(Status { services, counters }))
    }
}

/// Writes the backends whose kernel entry differs from what they should be: with `alive_only`,
/// only those that are (still or newly) alive; otherwise all the rest (those losing
/// `BACKEND_F_ALIVE`).
fn write_backends(
    dp: &mut Dataplane,
    entry: &mut ServiceEntry,
    port: u16,
    alive_only: bool,
) -> Result<(), DataplaneError> {
    for (ip, b) in &mut entry.backends {
        let flags = if b.alive(entry.forward) {
            BACKEND_F_ALIVE
        } else {
            0
        };
        let wanted = kernel_backend(
            entry.id,
            entry.forward.kernel(),
            *ip,
            b.port.unwrap_or(port),
            b.mac,
            b.generation,
            flags,
        );
        if wanted != b.written && (flags != 0 || !alive_only) {
            dp.set_backend(b.id, wanted)?;
            b.written = wanted;
        }
    }
    Ok(())
}

/// Where a backend's probes go: its own address, or the VIP with a socket mark naming the
/// backend for the tc egress program to steer it (`--hc-target vip`).
fn probe_target(
    service: ServiceAddr,
    ip: IpAddr,
    port: u16,
    id: u32,
    check: &HealthCheck,
) -> ProbeTarget {
    match check.target {
        HcTarget::Backend => ProbeTarget {
            addr: SocketAddr::new(ip, port),
            mark: None,
            backend: ip,
        },
        HcTarget::Vip => ProbeTarget {
            addr: SocketAddr::new(service.vip, service.port),
            mark: Some(lb_common::HC_MARK_TAG | id),
            backend: ip,
        },
    }
}

fn kernel_service(
    id: u32,
    ring: u32,
    scheduler: Scheduler,
    forward: Forward,
    fragments: bool,
) -> lb_common::Service {
    lb_common::Service {
        id,
        ring,
        forward: forward.kernel(),
        scheduler: scheduler.kernel(),
        flags: if fragments { SERVICE_F_FRAGMENTS } else { 0 },
        _pad: 0,
    }
}

/// Writes a service's value under its key and, with `SERVICE_F_FRAGMENTS`, under its VIP's
/// port-0 key too (where the program looks up fragments, which carry no port).
fn set_service_value(
    dp: &mut Dataplane,
    addr: &ServiceAddr,
    value: lb_common::Service,
) -> Result<(), DataplaneError> {
    dp.set_service(key_of(addr), value)?;
    if value.flags & SERVICE_F_FRAGMENTS != 0 {
        dp.set_service(fragment_key(addr), value)?;
    }
    Ok(())
}

/// The key fragments of `addr`'s VIP and protocol are looked up by: port 0.
pub fn fragment_key(addr: &ServiceAddr) -> ServiceKey {
    key_of(&ServiceAddr { port: 0, ..*addr })
}

/// The kernel's entry for backend `ip` of service `service`, forwarded by `forward` (the
/// program forwards established flows by these, without looking the service up).
fn kernel_backend(
    service: u32,
    forward: u8,
    ip: IpAddr,
    port: u16,
    mac: Option<[u8; 6]>,
    generation: u32,
    flags: u8,
) -> lb_common::Backend {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            AF_INET
        }
        IpAddr::V6(v6) => {
            addr.copy_from_slice(&v6.octets());
            lb_common::AF_INET6
        }
    };
    lb_common::Backend {
        addr,
        mac: mac.unwrap_or_default(),
        port: port.to_be(),
        generation,
        flags,
        family,
        forward,
        _pad: 0,
        service,
    }
}

/// A backend entry that names no backend (released ids).
fn dead_backend() -> lb_common::Backend {
    kernel_backend(0, 0, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, None, 0, 0)
}

/// The map key of a service: addresses and port as the packet carries them.
pub fn service_key(addr: &ServiceAddr) -> Result<ServiceKey, ControlError> {
    Ok(key_of(addr))
}

fn key_of(addr: &ServiceAddr) -> ServiceKey {
    ServiceKey::new(addr.vip, addr.port, addr.proto.number())
}

/// An IPv6 address as the four raw words the program reads from the packet.
pub fn ipv6_words(ip: &std::net::Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

fn error_response(e: ControlError) -> Response {
    Response::Error {
        message: e.to_string(),
    }
}
