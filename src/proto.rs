//! The `baton.v1` protobuf types and gRPC stubs generated from `proto/baton/v1/leadership.proto`,
//! and the encoded file descriptor set that server reflection serves.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("baton.v1");

/// The encoded `FileDescriptorSet` of `baton.v1` (and the well-known types it imports), for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("baton_descriptor");
