//! Code generated from `proto/` by `build.rs`.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("datagate.v1");
}

/// The encoded descriptors of every datagate proto, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("datagate_descriptor");
