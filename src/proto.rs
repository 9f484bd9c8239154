//! Code generated from `proto/mailgate/v1` and the descriptor set for server reflection.

#![allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]

/// The `mailgate.v1` package.
pub mod v1 {
    tonic::include_proto!("mailgate.v1");
}

/// Encoded `FileDescriptorSet` of every mailgate proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mailgate_descriptor.bin"));
