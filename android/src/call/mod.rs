//! Voice calls. [`engine`] is the call state machine and its signalling
//! (offer, answer, trickled candidates and hangup as end-to-end-encrypted
//! messages); [`media`] is the media path: a str0m `Rtc` per call (ICE,
//! DTLS-SRTP) carrying one Opus audio track, driven Sans-IO, with a
//! [`jitter`] buffer on the receive side. [`bench`] measures set-up time and
//! audio latency between two clients through a real server.

pub mod bench;
pub mod engine;
pub mod jitter;
pub mod media;
pub mod tone;
pub mod turn;
