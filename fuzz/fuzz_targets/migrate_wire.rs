//! The migration harness's wire formats, decoded from arbitrary bytes (I8 for the harness):
//! page-frame and return-path headers, the destination's hello, the switch-over body and the
//! source's summary. Anything malformed must be a typed error, never a panic; anything that
//! decodes must encode back to what decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagehint_migrate::wire::{
    Channel, FrameHeader, Hello, RpHeader, Summary, SwitchOver, WireError,
};

fn typed(e: WireError) {
    assert!(matches!(e, WireError::Malformed(..)), "{e:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..FrameHeader::LEN) {
        match FrameHeader::decode(b.try_into().expect("length"), Channel::Urgent) {
            Ok(h) => assert_eq!(FrameHeader::decode(&h.encode(), Channel::Urgent).ok(), Some(h)),
            Err(e) => typed(e),
        }
    }
    if let Some(b) = data.get(..RpHeader::LEN) {
        match RpHeader::decode(b.try_into().expect("length")) {
            Ok(h) => assert_eq!(RpHeader::decode(&h.encode()).ok(), Some(h)),
            Err(e) => typed(e),
        }
    }
    if let Some(b) = data.get(..Hello::LEN) {
        match Hello::decode(b.try_into().expect("length")) {
            Ok(h) => assert_eq!(Hello::decode(&h.encode()).ok(), Some(h)),
            Err(e) => typed(e),
        }
    }
    match SwitchOver::decode(data) {
        Ok(s) => {
            let again = SwitchOver::decode(&s.encode()).expect("re-decodes");
            assert_eq!(again.encode(), s.encode());
        }
        Err(e) => typed(e),
    }
    match Summary::decode(data) {
        Ok(s) => assert_eq!(Summary::decode(&s.encode()).ok(), Some(s)),
        Err(e) => typed(e),
    }
});
