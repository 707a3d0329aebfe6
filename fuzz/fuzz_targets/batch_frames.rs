//! Batch upload bodies (`volume_model::batch`): arbitrary bytes, fed in arbitrary pieces, never
//! panic or hold more than one chunk; whatever parses re-frames to the same bytes, and the
//! split points never change the result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_model::batch::{FrameError, FrameParser, frame_header};

fuzz_target!(|input: (u16, &[u8])| {
    let (step, data) = input;
    let parse = |step: usize| {
        let mut p = FrameParser::new();
        let mut frames = Vec::new();
        let mut failed = None;
        for piece in data.chunks(step.max(1)) {
            let r = p.feed(piece, |id, bytes| {
                frames.push((id, bytes.to_vec()));
                Ok::<_, FrameError>(())
            });
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        let end = failed.clone().map(Err).unwrap_or_else(|| p.finish().map(|_| ()));
        (frames, end)
    };
    let (frames, end) = parse(step as usize);
    assert_eq!((frames.clone(), end.clone()), parse(data.len().max(1)), "split points changed the result");
    let mut reframed = Vec::new();
    for (id, bytes) in &frames {
        reframed.extend_from_slice(&frame_header(id, bytes.len() as u32));
        reframed.extend_from_slice(bytes);
    }
    assert_eq!(&data[..reframed.len()], &reframed[..], "frames re-encode to the input");
    if end.is_ok() {
        assert_eq!(reframed.len(), data.len(), "a complete parse consumed everything");
    }
});
