//! Generates the gRPC code from `proto/*.proto` with `protoc` (Debian's protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().build_client(true).build_server(true).compile_protos(
        &["proto/error.proto", "proto/volume.proto", "proto/agent.proto", "proto/sailbox.proto", "proto/tenancy.proto"],
        &["proto"],
    )?;
    Ok(())
}
