//! Prints, for each program of the balancer's object, how long its load took (verification,
//! mostly) and how many instructions the verifier processed: what each program load costs the
//! daemon's start, the tests and the benchmarks. As root:
//! `cargo run --release -p lb-userspace --example verifier_stats`.

use aya::{EbpfLoader, programs::Program};

fn main() -> anyhow::Result<()> {
    let mut ebpf = EbpfLoader::new().load(lb_userspace::dataplane::XDP_OBJECT)?;
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
    for name in names {
        let t = std::time::Instant::now();
        let info = match ebpf.program_mut(&name) {
            Some(Program::Xdp(p)) => p
                .load()
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(p.info()?)),
            Some(Program::SchedClassifier(p)) => p
                .load()
                .map_err(anyhow::Error::from)
                .and_then(|()| Ok(p.info()?)),
            _ => continue,
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        match info {
            Ok(info) => println!(
                "{name}: {ms:.0} ms, {} instructions verified",
                info.verified_instruction_count().unwrap_or(0)
            ),
            Err(e) => println!("{name}: {e:#}"),
        }
    }
    Ok(())
}
