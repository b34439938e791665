//! Generates the gRPC server and client code from `proto/` and the encoded
//! file descriptor set that server reflection serves.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate unless `PROTOC` is set,
//! so a machine without protobuf-compiler builds the project.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["users", "catalog", "orders", "admin", "analytics"]
        .map(|name| PathBuf::from(format!("proto/datagate/v1/{name}.proto")));
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");

    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the
        // environment concurrently.
        unsafe { env::set_var("PROTOC", protoc) };
    }
    let well_known = protoc_bin_vendored::include_path()?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("datagate_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto"), well_known])?;
    Ok(())
}
