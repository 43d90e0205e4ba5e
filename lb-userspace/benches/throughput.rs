//! Throughput through a namespace test bed (placeholder until written).
fn main() {
    println!("throughput benchmark: not written yet");
}
