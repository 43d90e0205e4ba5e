//! Project automation. `cargo xtask demo` and `cargo xtask test` are the README's two commands;
//! each runs `scripts/setup.sh` first, so either one alone prepares a new machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, demo and test automation for the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need (Debian packages, nightly rust-src, bpf-linker).
    Setup,
    /// Set up, then build the release `lb` binary with the XDP object embedded.
    Build,
    /// Set up, build, then run the demo: a namespace network, real HTTP, a failover.
    Demo,
    /// Set up, build, then run every test: formatting, clippy, unit tests, BPF_PROG_TEST_RUN
    /// tests and the end-to-end tests over network namespaces (needs root), then the
    /// benchmarks in quick mode (figures only, no timing asserted).
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, then measure the data plane: ns per packet with BPF_PROG_TEST_RUN against
    /// baseline programs, and packets per second through a namespace test bed. Prints figures;
    /// asserts no time.
    Bench {
        /// Fewer packets and smaller tables: a quick look, not figures to publish.
        #[arg(long)]
        quick: bool,
        /// Katran's XDP object (balancer.bpf.o, built by scripts/katran-object.sh from a Katran
        /// checkout): measured in the same run by the same method, and our per-packet cost
        /// compared with its on each path.
        #[arg(long, value_name = "PATH")]
        katran: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().command {
        Cmd::Setup => setup(&root),
        Cmd::Build => {
            setup(&root)?;
            build(&root)
        }
        Cmd::Demo => {
            setup(&root)?;
            build(&root)?;
            exec(
                Command::new("bash")
                    .arg(root.join("scripts/demo.sh"))
                    .arg(root.join("target/release/lb")),
            )
        }
        Cmd::Bench { quick, katran } => {
            // Checked first: a wrong path should not cost a build.
            let katran = katran
                .map(|path| {
                    std::fs::canonicalize(&path)
                        .with_context(|| format!("the Katran object {}", path.display()))
                })
                .transpose()?;
            setup(&root)?;
            build(&root)?;
            bench(&root, quick, katran.as_deref())
        }
        Cmd::Test { args } => {
            setup(&root)?;
            build(&root)?;
            exec(cargo(&root).args(["fmt", "--all", "--check"]))
                .context("formatting differs: run `cargo fmt --all`")?;
            // Host crates and the eBPF crate are linted apart: built together, feature
            // unification would give lb-ebpf std (through aya) and two panic handlers.
            exec(cargo(&root).args([
                "clippy",
                "--release",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            exec(
                Command::new("cargo")
                    .current_dir(root.join("lb-ebpf"))
                    .env_remove("RUSTC")
                    .env_remove("CARGO")
                    .args([
                        "+nightly",
                        "clippy",
                        "--release",
                        "--target",
                        "bpfel-unknown-none",
                    ])
                    .args(["-Z", "build-std=core", "--", "-D", "warnings"]),
            )?;
            exec(
                cargo(&root)
                    .args(["test", "--release", "--workspace", "--exclude", "lb-ebpf"])
                    .args(&args),
            )?;
            // The benchmarks in quick mode, so they never rot: they print figures and assert
            // only that every packet got the verdict it should (no timing is asserted).
            if args.is_empty() {
                bench(&root, true, None)?;
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn setup(root: &Path) -> anyhow::Result<()> {
    exec(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

fn build(root: &Path) -> anyhow::Result<()> {
    exec(cargo(root).args(["build", "--release"]))
}

/// `katran`: an absolute path (cargo runs benchmarks in the package's directory).
fn bench(root: &Path, quick: bool, katran: Option<&Path>) -> anyhow::Result<()> {
    for bench in ["dataplane", "throughput"] {
        let mut cmd = cargo(root);
        cmd.args(["bench", "-p", "lb-userspace", "--bench", bench, "--"]);
        if quick {
            cmd.arg("--quick");
        }
        if let (Some(object), "dataplane") = (katran, bench) {
            cmd.arg("--katran").arg(object);
        }
        exec(&mut cmd)?;
    }
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn exec(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
