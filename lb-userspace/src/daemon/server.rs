//! The control API server: a Unix socket (mode 0600, so only root talks to the daemon), one JSON
//! request line and one JSON response line per connection.

use std::{os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::oneshot,
};
use tracing::warn;

use super::{Event, EventSender, check_socket_free};
use crate::api::{Request, Response};

/// Longest request accepted; real ones are a few hundred bytes.
const MAX_REQUEST: u64 = 64 * 1024;

pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    check_socket_free(path)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, events: EventSender) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let events = events.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, events).await {
                        warn!("API connection: {e:#}");
                    }
                });
            }
            Err(e) => warn!("accepting an API connection: {e}"),
        }
    }
}

async fn handle(stream: UnixStream, events: EventSender) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read)
        .take(MAX_REQUEST)
        .read_line(&mut line)
        .await
        .context("reading the request")?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if events.send(Event::Api(request, reply)).is_err() {
                Response::Error {
                    message: "the daemon is shutting down".into(),
                }
            } else {
                answer.await.unwrap_or(Response::Error {
                    message: "the daemon is shutting down".into(),
                })
            }
        }
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).context("encoding the response")?;
    out.push(b'\n');
    write
        .write_all(&out)
        .await
        .context("writing the response")?;
    Ok(())
}
