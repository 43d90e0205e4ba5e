//! Rebuild the eBPF object when bpf-linker changes (a new LLVM means a new object).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
