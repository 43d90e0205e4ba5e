//! A steady stream of HTTP requests through the balancer, for tests that change things while
//! traffic flows.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use super::{http, vip_addr};

/// Sends requests to the VIP from the client, one every 10 ms, on new connections, until
/// stopped; counts successes and failures.
pub struct Stream {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Stream {
    pub fn start(client_ns: &str) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let errors = Arc::new(Mutex::new(Vec::new()));
        let ns = client_ns.to_owned();
        let (s, o, f, e) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match http::get_in(&ns, vip_addr()) {
                    Ok(_) => o.fetch_add(1, Ordering::SeqCst),
                    Err(err) => {
                        e.lock().unwrap().push(format!("{err:#}"));
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                };
                thread::sleep(Duration::from_millis(10));
            }
        });
        Stream {
            stop,
            ok,
            failed,
            errors,
            handle: Some(handle),
        }
    }

    /// Stops the stream; returns (succeeded, failed, the errors).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("request stream thread");
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}
