//! Compiles the wire contract with protox (pure Rust): no protoc binary is needed for our own protos.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/runyard/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
