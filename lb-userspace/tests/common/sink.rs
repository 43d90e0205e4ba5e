//! A TCP sink for large transfers: the server reads each connection to its end and answers
//! with "NAME BYTES" (who it is and how many bytes arrived), so a test can send megabytes
//! through the balancer and check that every byte reached one backend.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::{http, netns};

pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Sink {
    /// Listens on 0.0.0.0:`port` in namespace `ns`.
    pub fn start(name: &str, ns: &str, port: u16) -> Self {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let listener = netns::run_in(ns, move || TcpListener::bind(addr))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{name}: bind tcp {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || -> io::Result<()> {
                while !s.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let name = name.clone();
                            // Health checks connect and close; uploads take a while: one
                            // thread each, detached (they end with their connection).
                            std::thread::spawn(move || {
                                let _ = conn.set_nonblocking(false);
                                let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                                let mut total = 0u64;
                                let mut buf = vec![0u8; 64 * 1024];
                                loop {
                                    match conn.read(&mut buf) {
                                        Ok(0) => break,
                                        Ok(n) => total += n as u64,
                                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                        Err(_) => return,
                                    }
                                }
                                let _ = conn.write_all(format!("{name} {total}").as_bytes());
                                let _ = conn.shutdown(Shutdown::Write);
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                Ok(())
            })
            .expect("spawning the sink thread");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `bytes` bytes from namespace `ns` to `addr` on one connection; returns the sink's
/// answer (name and byte count).
pub fn upload_in(ns: &str, addr: SocketAddr, bytes: usize) -> Result<(String, u64)> {
    let mut stream = http::connect_in(ns, addr)?;
    // Path-MTU discovery may stall a segment for a retransmission timeout: be patient.
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n]).with_context(|| {
            format!("sending to {addr} ({} of {bytes} bytes sent)", bytes - left)
        })?;
        left -= n;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the sink's answer from {addr}"))?;
    let Some((name, count)) = answer.split_once(' ') else {
        bail!("unexpected answer from {addr}: {answer:?}");
    };
    let count = count
        .parse()
        .with_context(|| format!("unexpected byte count from {addr}: {answer:?}"))?;
    Ok((name.to_owned(), count))
}
