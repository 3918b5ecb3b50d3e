//! The protobuf codec of every gRPC service here: tonic's prost codec, but an
//! encoder that reserves each message's encoded length before writing it.
//!
//! tonic's encoder starts from an 8 KiB buffer and lets prost grow it while
//! writing, so a 50-message history page (about 55 KB) was copied three times
//! on the way (8 → 16 → 32 → 64 KiB) in every process it crossed: 5% of the
//! cluster's CPU under history reads. Computing the length first is a walk
//! over the message's fields, without copying its bodies.
//!
//! Every gRPC call of the test suite goes through this codec.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::Status;

/// Used by the generated code (`build.rs` names it as the codec path).
#[derive(Debug, Clone)]
pub struct SizedProstCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SizedProstCodec<T, U> {
    fn default() -> Self {
        SizedProstCodec(PhantomData)
    }
}

impl<T, U> Codec for SizedProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

#[derive(Debug, Clone)]
pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))
    }
}
