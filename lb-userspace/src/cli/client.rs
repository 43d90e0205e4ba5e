//! The CLI side of the control API.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::api::{Request, Response, Status};

/// How long a command waits for the daemon (a table rebuild takes milliseconds).
const TIMEOUT: Duration = Duration::from_secs(10);

pub fn call(api: &Path, request: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(api).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is `lb daemon` running? set --api or LB_API)",
            api.display()
        )
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).context("sending the request")?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("reading the daemon's answer")?;
    serde_json::from_str(&answer).context("the daemon's answer is not valid")
}

pub fn call_ok(api: &Path, request: &Request) -> anyhow::Result<()> {
    match call(api, request)? {
        Response::Ok => Ok(()),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

pub fn status(api: &Path) -> anyhow::Result<Status> {
    match call(api, &Request::Status)? {
        Response::Status(status) => Ok(status),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}
