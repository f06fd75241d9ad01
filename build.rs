//! Compiles `proto/` with a pure-Rust protobuf compiler (protox), so no system `protoc` is
//! needed, and keeps the file descriptor set for gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/baton/v1/leadership.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("baton_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Small per-call buffers: see `proto::Codec`.
        .codec_path("crate::proto::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
