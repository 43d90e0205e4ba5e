//! Builds the XDP object (lb-ebpf) so `cargo build` at the root produces a single `lb` binary
//! with the object embedded. It does what aya-build 0.2.0 does (the nightly toolchain, the BPF
//! target, `-Z build-std=core`, BTF for the linker) plus one thing aya-build cannot pass: the
//! BPF CPU version. `v3` has 32-bit registers and jumps: the flow hash, all 32-bit arithmetic,
//! compiles to about a quarter fewer instructions than for `generic` (v1), which emulates each
//! 32-bit operation with 64-bit ones and masks. Linux 5.1 or later runs v3 programs.
//! `LB_BPF_CPU=generic` builds for v1 instead (to compare).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// The object's programs (`[[bin]]` targets of lb-ebpf), copied into OUT_DIR.
const BINS: [&str; 3] = ["lb-xdp", "lb-baselines", "lb-trafficgen"];

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // The build-dependency on lb-ebpf reruns this on changes to its library; its binaries
    // need this.
    println!("cargo:rerun-if-changed={root_dir}");
    println!("cargo:rerun-if-env-changed=LB_BPF_CPU");
    let cpu = env::var("LB_BPF_CPU").unwrap_or_else(|_| "generic".into());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported endianness {other:?}"),
    };
    // A target directory of its own: cargo would wait on the lock of ours.
    let target_dir = out_dir.join("ebpf-target");
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        format!("-Ctarget-cpu={cpu}"),
    ];
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "lb-ebpf",
        "--bins",
    ])
    .args(["--release", "--target", target, "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
    .current_dir(root_dir.as_std_path());
    // The outer build's compiler settings are for the host.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (scripts/setup.sh installs the toolchain)"))?;
    // Compiler messages reach the outer build as warnings (cargo's progress lines do not).
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        let progress = [
            "Compiling ",
            "Finished ",
            "Updating ",
            "Locking ",
            "Downloaded ",
        ]
        .iter()
        .any(|p| line.trim_start().starts_with(p));
        if !progress || !out.status.success() {
            println!("cargo:warning={line}");
        }
    }
    if !out.status.success() {
        bail!("building lb-ebpf failed: {}", out.status);
    }
    for bin in BINS {
        let built = target_dir.join(target).join("release").join(bin);
        copy(&built, &out_dir.join(bin))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}
