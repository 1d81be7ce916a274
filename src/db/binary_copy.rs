//! PostgreSQL's binary COPY format, write side: the stage rows the sink sends.
//!
//! Layout: an 11-byte signature, flags and header-extension length (both
//! zero), then per tuple a 16-bit field count and per field a 32-bit length
//! (-1 for NULL) and the field's binary-format bytes, then a -1 trailer.
//! The encoder builds a batch's data in one buffer, which the caller may
//! hand over in parts as it grows ([`CopyBuffer::take`]); the caller *must*
//! call [`CopyBuffer::finish`] to append the trailer, or the server rejects
//! the data.

use bytes::{BufMut, Bytes, BytesMut};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// The most COPY data sent in one message ([`send`]).
pub const COPY_PIECE: usize = 64 << 10;

/// Sends COPY data in pieces of at most [`COPY_PIECE`]: the connection
/// copies what it is sent into its own buffer, which keeps its largest size
/// for as long as the connection lives.
pub async fn send(
    mut copy: std::pin::Pin<&mut tokio_postgres::CopyInSink<Bytes>>,
    mut data: Bytes,
) -> Result<(), tokio_postgres::Error> {
    while !data.is_empty() {
        let piece = data.split_to(data.len().min(COPY_PIECE));
        futures_util::SinkExt::send(&mut copy, piece).await?;
    }
    Ok(())
}

/// One batch of tuples in binary COPY format, handed over whole or in parts.
pub struct CopyBuffer {
    /// The encoded bytes so far.
    buf: BytesMut,
}

impl CopyBuffer {
    /// Starts a buffer with the header, sized for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity + SIGNATURE.len() + 10);
        buf.put_slice(SIGNATURE);
        buf.put_i32(0);
        buf.put_i32(0);
        CopyBuffer { buf }
    }

    /// Starts a tuple of `fields` fields.
    pub fn row(&mut self, fields: i16) {
        self.buf.put_i16(fields);
    }

    /// Appends one field's bytes, or NULL.
    pub fn field(&mut self, value: Option<&[u8]>) {
        match value {
            None => self.buf.put_i32(-1),
            Some(v) => {
                // Values over 2 GiB cannot be stored by PostgreSQL at all.
                self.buf.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                self.buf.put_slice(v);
            }
        }
    }

    /// Appends tuples already encoded with [`encode_tuple`] (field count, then fields).
    pub fn raw(&mut self, tuples: &[u8]) {
        self.buf.put_slice(tuples);
    }

    /// Bytes encoded and not yet handed over.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether every byte encoded has been handed over.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Hands over the bytes encoded so far (the signature first) and goes
    /// on with an empty buffer; what follows continues the same data.
    pub fn take(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// Appends the trailer and hands over the bytes not yet handed over.
    pub fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

/// Encodes one tuple (field count, then each field) onto `out`, for callers
/// that build tuples in parallel and join them with [`CopyBuffer::raw`].
pub fn encode_tuple(out: &mut Vec<u8>, fields: &[Option<&[u8]>]) {
    out.extend_from_slice(&(fields.len() as i16).to_be_bytes());
    for f in fields {
        match f {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_header_tuple_and_trailer() {
        let mut b = CopyBuffer::with_capacity(0);
        b.row(2);
        b.field(Some(b"ab"));
        b.field(None);
        let out = b.finish();
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[
            0, 2, 0, 0, 0, 2, b'a', b'b', 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn data_taken_in_parts_joins_into_the_data_built_whole() {
        let build = |take_after_each_row: bool| {
            let mut b = CopyBuffer::with_capacity(0);
            let mut out = Vec::new();
            for v in [&b"one"[..], b"", b"three"] {
                b.row(1);
                b.field(Some(v));
                if take_after_each_row {
                    out.extend_from_slice(&b.take());
                    assert!(b.is_empty());
                }
            }
            out.extend_from_slice(&b.finish());
            out
        };
        assert_eq!(build(true), build(false));
    }
}
