//! Length-prefixed frames on a logical stream: a little-endian `u32` payload
//! length, then the payload (one postcard message). Lengths above
//! [`MAX_FRAME_LEN`](crate::MAX_FRAME_LEN) are refused before any allocation.

use crate::{MAX_FRAME_LEN, ProtoError};

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Prepends the length header to an encoded payload.
pub fn wrap(payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Incremental decoder for a byte stream of frames, for callers that receive
/// bytes in arbitrary pieces (and for the fuzz target).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Returns the next complete payload, `Ok(None)` when more bytes are
    /// needed, or an error when the header announces an oversized frame (the
    /// stream is then unusable).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        let Some(header) = self.buffer.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*header) as usize;
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        if self.buffer.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buffer[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buffer.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }
}

#[cfg(feature = "tokio")]
mod io {
    use super::*;
    use serde::{Serialize, de::DeserializeOwned};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    /// Reads one frame payload; `Ok(None)` on a clean end of stream at a frame
    /// boundary.
    pub async fn read_payload<R: AsyncRead + Unpin>(
        reader: &mut R,
    ) -> Result<Option<Vec<u8>>, ProtoError> {
        let mut header = [0u8; HEADER_LEN];
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(header) as usize;
        if len > MAX_FRAME_LEN {
            return Err(ProtoError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).await?;
        Ok(Some(payload))
    }

    /// Reads and decodes one message; `Ok(None)` on a clean end of stream.
    pub async fn read_message<T: DeserializeOwned, R: AsyncRead + Unpin>(
        reader: &mut R,
    ) -> Result<Option<T>, ProtoError> {
        match read_payload(reader).await? {
            Some(payload) => Ok(Some(crate::decode(&payload)?)),
            None => Ok(None),
        }
    }

    /// Encodes and writes one message as a frame, then flushes.
    pub async fn write_message<T: Serialize, W: AsyncWrite + Unpin>(
        writer: &mut W,
        message: &T,
    ) -> Result<(), ProtoError> {
        let framed = wrap(&crate::encode(message)?)?;
        writer.write_all(&framed).await?;
        writer.flush().await?;
        Ok(())
    }
}

#[cfg(feature = "tokio")]
pub use io::{read_message, read_payload, write_message};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_reassembles_frames_split_anywhere() {
        let mut stream = wrap(b"hello").expect("wrap");
        stream.extend(wrap(b"").expect("wrap"));
        stream.extend(wrap(b"world!").expect("wrap"));
        for split in 0..stream.len() {
            let mut decoder = FrameDecoder::new();
            let mut frames = Vec::new();
            for piece in [&stream[..split], &stream[split..]] {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().expect("frame") {
                    frames.push(frame);
                }
            }
            assert_eq!(frames, vec![b"hello".to_vec(), vec![], b"world!".to_vec()]);
        }
    }

    #[test]
    fn decoder_refuses_oversized_header_without_allocating() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decoder.next_frame(),
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn async_read_refuses_oversized_header() {
        let bytes = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        let mut reader: &[u8] = &bytes;
        assert!(matches!(
            read_payload(&mut reader).await,
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }
}
