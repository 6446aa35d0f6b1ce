//! Voice calls. [`media`] is the media path: a str0m `Rtc` per call (ICE,
//! DTLS-SRTP) carrying one Opus audio track, driven Sans-IO by its owner.
//! Signalling (offer, answer, candidates and hangup as end-to-end-encrypted
//! messages), the call state machine and the bindings are not built yet
//! (issue "Voice calls"; see the closing notes).

pub mod bench;
pub mod media;
pub mod tone;
