//! Compiles the wire contract with protox (pure Rust): no protoc binary is needed for our own protos.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/runyard/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // Log chunks stay `Bytes` end to end: no copy between the wire and the log file.
    tonic_prost_build::configure()
        .bytes(".runyard.agent.v1.LogChunk.data")
        // Tunnel data likewise: decoded as a slice of the receive buffer, not a copy.
        .bytes(".runyard.agent.v1.TunnelFrame.data")
        .compile_fds(fds)?;
    Ok(())
}
