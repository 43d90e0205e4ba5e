//! `lb testbed-wire`: an XDP_PASS program on the far end of each veth a balancer transmits on.

use anyhow::Context as _;
use lb_common::names;

use crate::dataplane::{AttachMode, attach_program};

pub fn run(ifaces: &[String]) -> anyhow::Result<()> {
    let mut ebpf = aya::Ebpf::load(crate::dataplane::XDP_OBJECT).context("loading the object")?;
    let _logger = aya_log::EbpfLogger::init(&mut ebpf);
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(names::PROG_PASS)
        .context("the pass program is missing from the object")?
        .try_into()?;
    prog.load().context("loading the pass program")?;
    for iface in ifaces {
        attach_program(prog, iface, AttachMode::Native)
            .with_context(|| format!("attaching the pass program to {iface}"))?;
    }
    eprintln!(
        "testbed-wire: XDP_PASS on {}; stop with SIGTERM",
        ifaces.join(", ")
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        anyhow::Ok(())
    })?;
    Ok(())
}
