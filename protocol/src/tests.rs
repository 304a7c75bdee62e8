use std::io::Cursor;

use crate::samples::{guest_messages, host_messages};
use crate::*;

#[test]
fn every_message_round_trips() {
    for msg in host_messages() {
        let frame = encode_frame(&msg).unwrap();
        let back: HostMessage = read_message(&mut Cursor::new(frame)).unwrap().unwrap();
        assert_eq!(back, msg);
    }
    for msg in guest_messages() {
        let frame = encode_frame(&msg).unwrap();
        let back: GuestMessage = read_message(&mut Cursor::new(frame)).unwrap().unwrap();
        assert_eq!(back, msg);
    }
}

#[test]
fn clean_eof_between_frames_is_none() {
    let mut empty = Cursor::new(Vec::<u8>::new());
    assert!(
        read_message::<HostMessage, _>(&mut empty)
            .unwrap()
            .is_none()
    );
}

#[test]
fn truncated_frames_are_errors() {
    let frame = encode_frame(&host_messages()[1]).unwrap();
    for cut in 1..frame.len() {
        let err = read_message::<HostMessage, _>(&mut Cursor::new(&frame[..cut])).unwrap_err();
        assert!(
            matches!(err, ProtoError::Truncated { .. }),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn oversized_frames_are_refused_before_reading_the_payload() {
    let len = u32::try_from(MAX_FRAME_LEN + 1).unwrap();
    let err = read_message::<HostMessage, _>(&mut Cursor::new(len.to_le_bytes())).unwrap_err();
    assert!(matches!(err, ProtoError::FrameTooLarge { .. }), "{err}");
    let mut d = FrameDecoder::default();
    d.push(&u32::MAX.to_le_bytes());
    assert!(matches!(
        d.next_frame(),
        Err(ProtoError::FrameTooLarge { .. })
    ));
}

#[test]
fn garbage_payloads_are_errors() {
    for payload in [
        &[0xffu8; 16][..],
        &[1, 0xff, 0xff, 0xff, 0xff, 0xff],
        &[],
        &[200],
    ] {
        assert!(decode::<HostMessage>(payload).is_err(), "{payload:?}");
        assert!(decode::<GuestMessage>(payload).is_err(), "{payload:?}");
    }
}

#[test]
fn trailing_bytes_are_errors() {
    let frame = encode_frame(&GuestMessage::Hello(Hello::current())).unwrap();
    let mut payload = frame[4..].to_vec();
    payload.push(0);
    assert!(matches!(
        decode::<GuestMessage>(&payload),
        Err(ProtoError::TrailingBytes(1))
    ));
}

#[test]
fn a_huge_inner_length_is_an_error_not_an_allocation() {
    // A Create whose config_json claims 2^60 bytes must fail on the limit, not abort on OOM.
    let Some(HostMessage::Request {
        id,
        request: Request::Create(mut create),
    }) = host_messages().into_iter().nth(1)
    else {
        panic!("sample 1 is a Create");
    };
    create.config_json = b"MARK".to_vec();
    let msg = HostMessage::Request {
        id,
        request: Request::Create(create),
    };
    let frame = encode_frame(&msg).unwrap();
    let payload = &frame[4..];
    let at = payload.windows(5).position(|w| w == b"\x04MARK").unwrap();
    let mut evil = payload[..at].to_vec();
    evil.push(253); // varint marker: a u64 follows
    evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
    evil.extend_from_slice(&payload[at + 1..]);
    // Either the limit or the end of the payload stops it; what matters is an error value.
    let err = decode::<HostMessage>(&evil).unwrap_err();
    assert!(matches!(err, ProtoError::Decode(_)), "{err}");
}

#[test]
fn version_mismatch_is_reported_with_both_versions() {
    let theirs = Hello {
        version: PROTOCOL_VERSION + 1,
    };
    let err = theirs.check().unwrap_err();
    assert!(matches!(err, ProtoError::VersionMismatch { .. }));
    assert!(
        err.to_string()
            .contains(&format!("version {}", PROTOCOL_VERSION + 1))
    );
    // Hello is variant 0 of both enums: a guest's hello decodes as the host's type and back.
    let frame = encode_frame(&GuestMessage::Hello(theirs.clone())).unwrap();
    let as_host: HostMessage = decode(&frame[4..]).unwrap();
    assert_eq!(as_host, HostMessage::Hello(theirs));
}

#[test]
fn decoder_splits_a_stream_fed_byte_by_byte() {
    let mut stream = Vec::new();
    for msg in guest_messages() {
        stream.extend(encode_frame(&msg).unwrap());
    }
    let mut d = FrameDecoder::default();
    let mut out = Vec::new();
    for b in stream {
        d.push(&[b]);
        while let Some(p) = d.next_frame().unwrap() {
            out.push(decode::<GuestMessage>(&p).unwrap());
        }
    }
    assert_eq!(out, guest_messages());
    assert_eq!(d.pending(), 0);
    assert!(d.truncation_error().is_none());
}

#[test]
fn wait_status_decodes_raw_statuses() {
    assert_eq!(WaitStatus::from_raw(3 << 8), WaitStatus::Exited(3));
    assert_eq!(
        WaitStatus::from_raw(9),
        WaitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    assert_eq!(WaitStatus::from_raw(0x80 | 11).exit_code(), 139);
}
