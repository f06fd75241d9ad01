//! The `baton.v1` protobuf types and gRPC stubs generated from `proto/baton/v1/leadership.proto`,
//! the codec they use, and the encoded file descriptor set that server reflection serves.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("baton.v1");

/// The encoded `FileDescriptorSet` of `baton.v1` (and the well-known types it imports), for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("baton_descriptor");

/// Initial size of the encode and decode buffer of each call. tonic's default (8 KiB) is held
/// for the whole life of a WatchLeadership stream, whose events are about 150 bytes: at 10,000
/// subscribers that buffer alone was most of the daemon's memory. A larger message grows the
/// buffer in steps of this size.
const CALL_BUFFER: usize = 512;

/// prost's codec with 512-byte buffers (`CALL_BUFFER`) (tonic's `codec_buffers` example); the
/// generated stubs use it through `tonic_prost_build::Builder::codec_path` (see `build.rs`).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> tonic::codec::BufferSettings {
    // The yield threshold stays tonic's default (32 KiB).
    tonic::codec::BufferSettings::new(CALL_BUFFER, 32 * 1024)
}
