//! The protobuf codec of every pdvault service: prost's, except that a message which does
//! not decode is the sender's error.
//!
//! tonic's prost codec answers a decode failure (invalid UTF-8 in a string field, a
//! truncated message, a wrong wire type, nesting past prost's recursion limit) with
//! `INTERNAL`, which tells a client "the server is broken, retry" and sets off the
//! operators' alarms for what is a malformed request. Here it is `INVALID_ARGUMENT` with
//! ErrorInfo reason `MALFORMED_REQUEST` ([`RequestError::Decode`]), like the framing errors
//! the admission layer finds ([`super::admission`]). The message never quotes the bytes it
//! could not decode.
//!
//! Generated clients use the same codec (tonic-prost-build takes one codec path), where the
//! status means a response from the server did not decode.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use super::status::RequestError;

/// prost encoding; decode failures are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U> {
    _messages: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec {
            _messages: PhantomData,
        }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> StrictDecoder<U> {
        StrictDecoder {
            _message: PhantomData,
        }
    }
}

/// Decodes `U` with prost.
#[derive(Debug, Clone, Default)]
pub struct StrictDecoder<U> {
    _message: PhantomData<U>,
}

impl<U: prost::Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|error| RequestError::Decode(error).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
