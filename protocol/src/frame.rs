//! Length-prefixed framing and the bincode codec.
//!
//! A frame is `len: u32 LE` then `len` payload bytes. [`FrameDecoder`] splits a byte stream
//! into payloads without blocking (for event loops); [`read_message`] and [`write_message`]
//! do the same on blocking streams. Nothing here panics on bad input.

use std::io::{self, Read, Write};

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame payload either side accepts (8 MiB: a config.json is rarely over 100 KiB).
pub const MAX_FRAME_LEN: usize = 8 << 20;

const HEADER_LEN: usize = 4;

/// Errors of framing, decoding and the handshake.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced payload length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes received)")]
    Truncated {
        /// Bytes of the frame (header included) received.
        got: usize,
        /// Bytes the frame should have had.
        expected: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed message")]
    Decode(#[source] bincode::error::DecodeError),
    /// The payload decoded but bytes were left over.
    #[error("malformed message: {0} bytes left over after the message")]
    TrailingBytes(usize),
    /// A message could not be encoded (too large).
    #[error("cannot encode message")]
    Encode(#[source] bincode::error::EncodeError),
    /// The peer speaks another protocol version.
    #[error(
        "protocol version mismatch: this side speaks version {ours}, the peer version {theirs}"
    )]
    VersionMismatch {
        /// Our version.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// A valid message arrived where the protocol does not allow it.
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// A short description of what arrived.
        got: String,
    },
    /// Reading or writing the connection failed.
    #[error("I/O error on the control connection")]
    Io(#[from] io::Error),
}

type Config = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_LEN>>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes `msg` as one complete frame (header and payload).
pub fn encode_frame<M: Serialize>(msg: &M) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; HEADER_LEN];
    bincode::serde::encode_into_std_write(msg, &mut out, config()).map_err(ProtoError::Encode)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let len = u32::try_from(len).map_err(|_| ProtoError::FrameTooLarge {
        len,
        max: MAX_FRAME_LEN,
    })?;
    out[..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(out)
}

/// Decodes one payload (without its header) into a message.
pub fn decode<M: DeserializeOwned>(payload: &[u8]) -> Result<M, ProtoError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (msg, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(ProtoError::Decode)?;
    if used != payload.len() {
        return Err(ProtoError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Writes `msg` as one frame and flushes.
pub fn write_message<M: Serialize, W: Write>(w: &mut W, msg: &M) -> Result<(), ProtoError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame and decodes it. `Ok(None)` is a clean end of stream between frames.
pub fn read_message<M: DeserializeOwned, R: Read>(r: &mut R) -> Result<Option<M>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(r, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ProtoError::Truncated {
            got,
            expected: HEADER_LEN,
        });
    }
    let len = payload_len(header)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(ProtoError::Truncated {
            got: HEADER_LEN + got,
            expected: HEADER_LEN + len,
        });
    }
    decode(&payload).map(Some)
}

fn payload_len(header: [u8; HEADER_LEN]) -> Result<usize, ProtoError> {
    let len = usize::try_from(u32::from_le_bytes(header)).unwrap_or(usize::MAX);
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Splits a byte stream into frame payloads, for non-blocking readers.
///
/// Feed it whatever bytes arrive with [`FrameDecoder::push`], then take complete payloads
/// with [`FrameDecoder::next_frame`]. It never holds more than one maximal frame plus one read.
///
/// ```
/// use husk_proto::{FrameDecoder, encode_frame};
/// let frame = encode_frame(&42u32).unwrap();
/// let mut d = FrameDecoder::default();
/// d.push(&frame[..3]);
/// assert!(d.next_frame().unwrap().is_none());
/// d.push(&frame[3..]);
/// let payload = d.next_frame().unwrap().unwrap();
/// assert_eq!(husk_proto::decode::<u32>(&payload).unwrap(), 42);
/// ```
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next complete payload, if one has arrived. After an error the stream is
    /// unusable (the frame boundary is lost).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = payload_len(*header)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }

    /// Bytes received that do not yet form a frame; non-zero at EOF means a truncated frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The error to report when the stream ends with [`FrameDecoder::pending`] bytes.
    pub fn truncation_error(&self) -> Option<ProtoError> {
        if self.buf.is_empty() {
            return None;
        }
        let expected = match self.buf.first_chunk::<HEADER_LEN>() {
            Some(h) => HEADER_LEN + payload_len(*h).unwrap_or(0),
            None => HEADER_LEN,
        };
        Some(ProtoError::Truncated {
            got: self.buf.len(),
            expected,
        })
    }
}
