//! Applying a configuration file to the running daemon (at start, on `lb reload` and on SIGHUP).
//!
//! The new file is checked in full first (syntax, values, capacity); only then is the
//! difference between the running state and the file applied, as changes made in place:
//! a service whose settings change keeps its id, table and flows; a backend whose weight changes
//! keeps its id, so its flows stay. Nothing that the file does not change is touched. If a step
//! fails anyway (a map update refused by the kernel), the steps before it are undone, so a
//! reload is applied whole or not at all.
//!
//! The file is the source of truth: changes made with the CLI since the last load stay until the
//! next reload, which undoes those the file does not contain, with a warning for each.

use std::{fmt, net::IpAddr, path::PathBuf};

use tracing::{info, warn};

use super::{
    config::{
        self, BackendConfig, Config, DaemonSettings, Located, ServiceSettings, Services,
        format_duration,
    },
    control::{Control, ControlError, Prober},
};
use crate::api::{Response, ServiceAddr};

/// The configuration file the daemon was started with, and what was last applied from it.
pub struct ConfigSource {
    pub path: PathBuf,
    /// The services of the file as last applied. Where the running state differs from them,
    /// the CLI changed it since.
    pub applied: Option<Services>,
}

/// One step from a running state towards a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    RemoveBackend {
        service: ServiceAddr,
        ip: IpAddr,
    },
    /// With all its backends.
    RemoveService {
        service: ServiceAddr,
    },
    /// Without backends (each comes as an `AddBackend`).
    AddService {
        service: ServiceAddr,
        settings: ServiceSettings,
    },
    UpdateService {
        service: ServiceAddr,
        settings: ServiceSettings,
    },
    AddBackend {
        service: ServiceAddr,
        ip: IpAddr,
        backend: BackendConfig,
    },
    UpdateBackend {
        service: ServiceAddr,
        ip: IpAddr,
        backend: BackendConfig,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend_text = |b: &BackendConfig| {
            let port = b.port.map(|p| format!("port {p}, ")).unwrap_or_default();
            if b.drain {
                format!("{port}weight {}, drained", b.weight)
            } else {
                format!("{port}weight {}", b.weight)
            }
        };
        match self {
            Change::RemoveBackend { service, ip } => write!(f, "{service}: backend {ip} removed"),
            Change::RemoveService { service } => write!(f, "service {service} removed"),
            Change::AddService { service, settings } => {
                write!(f, "service {service} added ({})", settings_text(settings))
            }
            Change::UpdateService { service, settings } => {
                write!(f, "{service}: settings now {}", settings_text(settings))
            }
            Change::AddBackend {
                service,
                ip,
                backend,
            } => write!(
                f,
                "{service}: backend {ip} added ({})",
                backend_text(backend)
            ),
            Change::UpdateBackend {
                service,
                ip,
                backend,
            } => write!(f, "{service}: backend {ip} now {}", backend_text(backend)),
        }
    }
}

fn settings_text(s: &ServiceSettings) -> String {
    let h = &s.health;
    format!(
        "scheduler {}, forward {}{}, health check every {} (timeout {}, rise {}, fall {})",
        s.scheduler.name(),
        s.forward.name(),
        if s.fragments { ", fragments" } else { "" },
        format_duration(h.interval),
        format_duration(h.timeout),
        h.rise,
        h.fall
    )
}

/// The changes that turn `from` into `to`, in the order they are applied: removals first (so
/// their ids are free for what is added), then additions and changes in place. A backend
/// whose port changes is removed and added again (its flows were translated to the old
/// port). Services turning fragments off are changed before any other is added or changed,
/// so the port-0 entry of their VIP is free for one turning it on.
pub fn plan(from: &Services, to: &Services) -> Vec<Change> {
    let mut remove_backends = Vec::new();
    let mut remove_services = Vec::new();
    let mut add_services = Vec::new();
    let mut fragments_off = Vec::new();
    let mut update_services = Vec::new();
    let mut add_backends = Vec::new();
    let mut update_backends = Vec::new();
    for (&service, old) in from {
        match to.get(&service) {
            None => remove_services.push(Change::RemoveService { service }),
            Some(new) => {
                for &ip in old.backends.keys() {
                    if !new.backends.contains_key(&ip) {
                        remove_backends.push(Change::RemoveBackend { service, ip });
                    }
                }
            }
        }
    }
    for (&service, new) in to {
        let old = from.get(&service);
        match old {
            None => add_services.push(Change::AddService {
                service,
                settings: new.settings.clone(),
            }),
            Some(old) if old.settings != new.settings => {
                let change = Change::UpdateService {
                    service,
                    settings: new.settings.clone(),
                };
                if old.settings.fragments && !new.settings.fragments {
                    fragments_off.push(change);
                } else {
                    update_services.push(change);
                }
            }
            Some(_) => {}
        }
        for (&ip, &backend) in &new.backends {
            match old.and_then(|o| o.backends.get(&ip)) {
                None => add_backends.push(Change::AddBackend {
                    service,
                    ip,
                    backend,
                }),
                Some(was) if was.port != backend.port => {
                    remove_backends.push(Change::RemoveBackend { service, ip });
                    add_backends.push(Change::AddBackend {
                        service,
                        ip,
                        backend,
                    });
                }
                Some(was) if *was != backend => update_backends.push(Change::UpdateBackend {
                    service,
                    ip,
                    backend,
                }),
                Some(_) => {}
            }
        }
    }
    [
        remove_backends,
        remove_services,
        fragments_off,
        add_services,
        update_services,
        add_backends,
        update_backends,
    ]
    .concat()
}

/// The changes made at runtime (the difference between `applied`, the file last loaded, and
/// `running`) that loading `next` undoes.
pub fn discarded(applied: &Services, running: &Services, next: &Services) -> Vec<Change> {
    plan(applied, running)
        .into_iter()
        .filter(|change| match change {
            Change::RemoveService { service }
            | Change::AddService { service, .. }
            | Change::UpdateService { service, .. } => {
                running.get(service).map(|s| &s.settings) != next.get(service).map(|s| &s.settings)
            }
            Change::RemoveBackend { service, ip }
            | Change::AddBackend { service, ip, .. }
            | Change::UpdateBackend { service, ip, .. } => {
                let backend =
                    |s: &Services| s.get(service).and_then(|s| s.backends.get(ip)).copied();
                backend(running) != backend(next)
            }
        })
        .collect()
}

impl<P: Prober> Control<P> {
    /// Names the file `lb reload` (and SIGHUP) reads.
    pub fn set_config_file(&mut self, path: PathBuf) {
        self.config = Some(ConfigSource {
            path,
            applied: None,
        });
    }

    /// Makes the running state what `config` declares; `file` names it in errors. Checks it
    /// whole first: on an error nothing has changed. Returns the changes made.
    pub fn apply_config(
        &mut self,
        config: &Config,
        file: &str,
    ) -> Result<Vec<Change>, ControlError> {
        if let Some(Located { value, line }) = &config.daemon.interfaces
            && *value != self.ifaces()
        {
            return Err(ControlError::Invalid(format!(
                "{file}:{line}: interface {}: the daemon runs on {}; changing the \
                 interfaces needs a restart",
                value.join(", "),
                self.ifaces().join(", ")
            )));
        }
        config::check_services(&config.services)
            .map_err(|m| ControlError::Invalid(format!("{file}: {m}")))?;
        let sizing = self.sizing();
        let services = config.services.len();
        if services > sizing.max_services as usize {
            return Err(ControlError::Invalid(format!(
                "{file}: {services} services declared; the daemon holds at most {} \
                 (--max-services)",
                sizing.max_services
            )));
        }
        let backends: usize = config.services.values().map(|s| s.backends.len()).sum();
        if backends > sizing.max_backends as usize {
            return Err(ControlError::Invalid(format!(
                "{file}: {backends} backends declared; the daemon holds at most {} \
                 (--max-backends)",
                sizing.max_backends
            )));
        }
        let changes = plan(&self.running(), &config.services);
        self.apply_plan(&changes)?;
        if let Some(source) = &mut self.config {
            source.applied = Some(config.services.clone());
        }
        Ok(changes)
    }

    /// Applies `changes` in order; if one fails, undoes those applied before it and returns the
    /// error. Does not check capacity: [`Self::apply_config`] does.
    pub fn apply_plan(&mut self, changes: &[Change]) -> Result<(), ControlError> {
        self.batch(|control| control.apply_in_order(changes))
    }

    fn apply_in_order(&mut self, changes: &[Change]) -> Result<(), ControlError> {
        let before = self.running();
        for (done, change) in changes.iter().enumerate() {
            if let Err(e) = self.apply_change(change) {
                let undo = plan(&self.running(), &before);
                for step in &undo {
                    if let Err(e) = self.apply_change(step) {
                        warn!("rolling back a failed configuration change: {step}: {e}");
                    }
                }
                return Err(ControlError::Invalid(format!(
                    "applying the configuration failed at \"{change}\": {e}; the {done} \
                     change(s) before it were undone"
                )));
            }
        }
        Ok(())
    }

    fn apply_change(&mut self, change: &Change) -> Result<(), ControlError> {
        match change {
            &Change::RemoveBackend { service, ip } => self.backend_del(service, ip),
            &Change::RemoveService { service } => self.service_del(service),
            Change::AddService { service, settings } => self.service_add(
                *service,
                settings.scheduler,
                settings.forward,
                settings.health.clone(),
                settings.fragments,
            ),
            Change::UpdateService { service, settings } => {
                self.service_update(*service, settings.clone())
            }
            &Change::AddBackend {
                service,
                ip,
                backend,
            } => {
                self.backend_add(service, ip, backend.weight, backend.port)?;
                if backend.drain {
                    self.backend_drain(service, ip, None)?;
                }
                Ok(())
            }
            &Change::UpdateBackend {
                service,
                ip,
                backend,
            } => self.backend_update(service, ip, backend),
        }
    }

    /// `lb reload`: reads the file again and applies it; on any error the running state is
    /// unchanged.
    pub(super) fn reload(&mut self) -> Result<Response, ControlError> {
        let result = self.reload_file();
        if let Err(e) = &result {
            warn!("reload refused, running state unchanged: {e}");
        }
        result
    }

    fn reload_file(&mut self) -> Result<Response, ControlError> {
        let Some(source) = &self.config else {
            return Err(ControlError::Invalid(
                "the daemon was started without --config: there is no file to reload".into(),
            ));
        };
        let path = source.path.clone();
        let applied = source.applied.clone();
        let file = path.display().to_string();
        let config = Config::load(&path).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let undone = applied
            .map(|applied| discarded(&applied, &self.running(), &config.services))
            .unwrap_or_default();
        let changes = self.apply_config(&config, &file)?;
        for change in &undone {
            warn!(
                file,
                "reload undoes a change made at runtime (the file is the source of truth): {change}"
            );
        }
        info!(file, changes = changes.len(), "configuration reloaded");
        Ok(Response::Reloaded {
            file,
            changes: changes.iter().map(ToString::to_string).collect(),
        })
    }

    /// `lb config dump`: the running state as a configuration file.
    pub(super) fn config_dump(&self) -> Response {
        let config = Config {
            daemon: DaemonSettings {
                interfaces: Some(Located {
                    value: self.ifaces().to_vec(),
                    line: 0,
                }),
                // Read only at start, not part of the running state.
                metrics: None,
                // As given at start (flags or file); defaults stay implicit.
                routed: self.routed_settings(),
            },
            services: self.running(),
        };
        Response::Config {
            text: format!(
                "# The running state of `lb daemon`, written by `lb config dump`.\n{}",
                config::render(&config)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse(text: &str) -> Services {
        Config::parse(text, "test").unwrap().services
    }

    fn svc(s: &str) -> ServiceAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const BASE: &str = r#"
[[service]]
address = "10.0.0.10:80/tcp"
[[service.backend]]
address = "10.0.0.2"
[[service.backend]]
address = "10.0.0.3"
weight = 2

[[service]]
address = "10.0.0.11:53/udp"
[[service.backend]]
address = "10.0.0.2"
"#;

    #[test]
    fn identical_configurations_need_no_change() {
        assert_eq!(plan(&parse(BASE), &parse(BASE)), vec![]);
        assert_eq!(plan(&Services::new(), &Services::new()), vec![]);
    }

    #[test]
    fn from_nothing_every_service_then_every_backend_is_added() {
        let changes = plan(&Services::new(), &parse(BASE));
        let text: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "service 10.0.0.10:80/tcp added (scheduler maglev, forward dsr, health check \
                 every 1s (timeout 1s, rise 2, fall 2))",
                "service 10.0.0.11:53/udp added (scheduler maglev, forward dsr, health check \
                 every 1s (timeout 1s, rise 2, fall 2))",
                "10.0.0.10:80/tcp: backend 10.0.0.2 added (weight 1)",
                "10.0.0.10:80/tcp: backend 10.0.0.3 added (weight 2)",
                "10.0.0.11:53/udp: backend 10.0.0.2 added (weight 1)",
            ]
        );
        // And back: a removed service takes its backends along.
        assert_eq!(
            plan(&parse(BASE), &Services::new()),
            vec![
                Change::RemoveService {
                    service: svc("10.0.0.10:80/tcp")
                },
                Change::RemoveService {
                    service: svc("10.0.0.11:53/udp")
                },
            ]
        );
    }

    #[test]
    fn changes_are_made_in_place_and_removals_come_first() {
        let next = parse(
            r#"
[[service]]
address = "10.0.0.10:80/tcp"
health_check = { interval = "2s", rise = 3 }
[[service.backend]]
address = "10.0.0.2"
weight = 5
[[service.backend]]
address = "10.0.0.4"
drain = true

[[service]]
address = "10.0.0.12:80/tcp"
[[service.backend]]
address = "10.0.0.2"
"#,
        );
        let web = svc("10.0.0.10:80/tcp");
        let health = crate::api::HealthCheck {
            interval: Duration::from_secs(2),
            rise: 3,
            ..Default::default()
        };
        let settings = next[&web].settings.clone();
        assert_eq!(settings.health, health);
        assert_eq!(
            plan(&parse(BASE), &next),
            vec![
                Change::RemoveBackend {
                    service: web,
                    ip: ip("10.0.0.3")
                },
                Change::RemoveService {
                    service: svc("10.0.0.11:53/udp")
                },
                Change::AddService {
                    service: svc("10.0.0.12:80/tcp"),
                    settings: next[&svc("10.0.0.12:80/tcp")].settings.clone(),
                },
                Change::UpdateService {
                    service: web,
                    settings
                },
                Change::AddBackend {
                    service: web,
                    ip: ip("10.0.0.4"),
                    backend: BackendConfig {
                        weight: 1,
                        drain: true,
                        port: None,
                    }
                },
                Change::AddBackend {
                    service: svc("10.0.0.12:80/tcp"),
                    ip: ip("10.0.0.2"),
                    backend: BackendConfig::default(),
                },
                Change::UpdateBackend {
                    service: web,
                    ip: ip("10.0.0.2"),
                    backend: BackendConfig {
                        weight: 5,
                        drain: false,
                        port: None,
                    }
                },
            ]
        );
    }

    /// What a plan does, done on the `Services` value (as the daemon does it on its state).
    fn apply(state: &mut Services, changes: &[Change]) {
        for c in changes {
            match c {
                Change::RemoveBackend { service, ip } => {
                    state.get_mut(service).unwrap().backends.remove(ip).unwrap();
                }
                Change::RemoveService { service } => {
                    state.remove(service).unwrap();
                }
                Change::AddService { service, settings } => {
                    let new = config::ServiceConfig {
                        settings: settings.clone(),
                        backends: Default::default(),
                    };
                    assert!(state.insert(*service, new).is_none());
                }
                Change::UpdateService { service, settings } => {
                    state.get_mut(service).unwrap().settings = settings.clone();
                }
                Change::AddBackend {
                    service,
                    ip,
                    backend,
                } => {
                    let s = state.get_mut(service).unwrap();
                    assert!(s.backends.insert(*ip, *backend).is_none());
                }
                Change::UpdateBackend {
                    service,
                    ip,
                    backend,
                } => {
                    *state
                        .get_mut(service)
                        .unwrap()
                        .backends
                        .get_mut(ip)
                        .unwrap() = *backend;
                }
            }
        }
    }

    #[test]
    fn applying_a_plan_reaches_the_target() {
        let configs = [
            String::new(),
            BASE.to_owned(),
            BASE.replace("weight = 2", "weight = 7\ndrain = true"),
            BASE.replace("10.0.0.3", "10.0.0.9")
                .replace("53/udp", "54/udp"),
            BASE.replace("[[service.backend]]\naddress = \"10.0.0.2\"\n", ""),
        ];
        for from in &configs {
            for to in &configs {
                let (from, to) = (parse(from), parse(to));
                let mut state = from.clone();
                apply(&mut state, &plan(&from, &to));
                assert_eq!(state, to);
            }
        }
    }

    #[test]
    fn runtime_changes_the_next_file_undoes_are_reported() {
        let applied = parse(BASE);
        // At runtime: a backend added, a weight changed, a service deleted.
        let mut running = applied.clone();
        let web = svc("10.0.0.10:80/tcp");
        running
            .get_mut(&web)
            .unwrap()
            .backends
            .insert(ip("10.0.0.8"), BackendConfig::default());
        running
            .get_mut(&web)
            .unwrap()
            .backends
            .get_mut(&ip("10.0.0.3"))
            .unwrap()
            .weight = 9;
        running.remove(&svc("10.0.0.11:53/udp"));

        // Reloading the same file undoes all three.
        let undone: Vec<String> = discarded(&applied, &running, &applied)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            undone,
            [
                "service 10.0.0.11:53/udp removed",
                "10.0.0.10:80/tcp: backend 10.0.0.8 added (weight 1)",
                "10.0.0.10:80/tcp: backend 10.0.0.3 now weight 9",
            ]
        );
        // A file that took the runtime changes in undoes none.
        assert_eq!(discarded(&applied, &running, &running), vec![]);
        // Nothing changed at runtime: nothing to report, whatever the file says.
        assert_eq!(discarded(&applied, &applied, &Services::new()), vec![]);
    }
}
