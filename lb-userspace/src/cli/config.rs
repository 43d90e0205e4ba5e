//! `lb reload`, `lb config dump` and `lb config check`.

use std::path::Path;

use anyhow::bail;

use super::client;
use crate::{
    api::{Request, Response},
    daemon::config::Config,
};

pub fn reload(api: &Path) -> anyhow::Result<()> {
    match client::call(api, &Request::Reload)? {
        Response::Reloaded { file, changes } if changes.is_empty() => {
            println!("reloaded {file}: no change");
        }
        Response::Reloaded { file, changes } => {
            println!("reloaded {file}: {} change(s)", changes.len());
            for change in changes {
                println!("  {change}");
            }
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
    Ok(())
}

pub fn dump(api: &Path) -> anyhow::Result<()> {
    match client::call(api, &Request::ConfigDump)? {
        Response::Config { text } => print!("{text}"),
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
    Ok(())
}

pub fn check(file: &Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    let backends: usize = config.services.values().map(|s| s.backends.len()).sum();
    println!(
        "{}: ok ({} service(s), {backends} backend(s))",
        file.display(),
        config.services.len()
    );
    Ok(())
}
