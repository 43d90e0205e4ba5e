//! TCP health probes: one tokio task per backend, all sharing a bounded number of concurrent
//! connection attempts, so thousands of backends need neither thousands of threads nor
//! thousands of simultaneous sockets. Results go to the control loop, which applies rise/fall.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpStream, sync::Semaphore, task::AbortHandle, time};

use super::{Event, EventSender};
use crate::api::{HealthCheck, ServiceAddr};

/// Connection attempts in flight at once, across all backends.
const MAX_CONCURRENT_PROBES: usize = 256;

/// Which backend a probe result is about. The generation tells a result for a backend from one
/// for an earlier backend with the same address that was deleted meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeKey {
    pub service: ServiceAddr,
    pub ip: std::net::IpAddr,
    pub generation: u32,
}

/// `Err` carries why the probe failed, for `lb status`.
pub type ProbeOutcome = Result<(), String>;

pub struct TokioProber {
    runtime: tokio::runtime::Handle,
    events: EventSender,
    limit: Arc<Semaphore>,
}

impl TokioProber {
    pub fn new(runtime: tokio::runtime::Handle, events: EventSender) -> Self {
        TokioProber {
            runtime,
            events,
            limit: Arc::new(Semaphore::new(MAX_CONCURRENT_PROBES)),
        }
    }
}

impl super::control::Prober for TokioProber {
    type Handle = AbortHandle;

    fn start(&mut self, key: ProbeKey, target: SocketAddr, check: HealthCheck) -> AbortHandle {
        let events = self.events.clone();
        let limit = self.limit.clone();
        self.runtime
            .spawn(async move {
                let mut ticker = time::interval(check.interval);
                ticker.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let outcome = {
                        let Ok(_permit) = limit.acquire().await else {
                            return;
                        };
                        probe_tcp(target, check.timeout).await
                    };
                    if events.send(Event::Probe(key, outcome)).is_err() {
                        return; // the daemon is shutting down
                    }
                }
            })
            .abort_handle()
    }

    fn stop(&mut self, handle: AbortHandle) {
        handle.abort();
    }
}

/// Succeeds when a TCP connection to `target` is established within `timeout`.
pub async fn probe_tcp(target: SocketAddr, timeout: std::time::Duration) -> ProbeOutcome {
    match time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("connect to {target}: {e}")),
        Err(_) => Err(format!("connect to {target}: no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_succeeds_against_a_listener_and_fails_when_it_is_gone() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_eq!(
            probe_tcp(addr, std::time::Duration::from_secs(1)).await,
            Ok(())
        );
        drop(listener);
        let err = probe_tcp(addr, std::time::Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }
}
