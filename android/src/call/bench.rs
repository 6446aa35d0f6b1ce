//! `privcomm-chat bench-calls`: the media path of calls on loopback (no
//! server, no signalling): how long from creating the offer until both sides
//! are connected (ICE + DTLS), and how long a sound takes from PCM in at A
//! to PCM out at B. The latter counts from when the sound was captured: a
//! 20 ms frame handed in at `t` began at `t - 20 ms`; a decoded frame is
//! taken to play from when B decoded it (there is no jitter buffer yet), so a
//! sample `k` samples into it plays at that time + `k / 48 kHz`. That is the
//! framing, Opus's own delay, RTP/SRTP over UDP and decoding.
//! docs/BENCHMARKS.md.

use crate::call::media::{FRAME_SAMPLES, MediaSession, SAMPLE_RATE};
use crate::call::tone::{Tone, rms};
use crate::error::{ClientError, Result};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// What was measured, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct CallFigures {
    /// Offer created → both connected, one per call.
    pub setup_ms: Vec<f64>,
    /// A tone's first sample captured at A → played at B, one per onset.
    pub latency_ms: Vec<f64>,
}

fn loopback() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

/// A connected pair; returns it and the set-up time.
fn connect() -> Result<(MediaSession, MediaSession, Duration)> {
    let started = Instant::now();
    let (mut a, mut b) = (MediaSession::new(loopback(), started)?, MediaSession::new(loopback(), started)?);
    let offer = a.create_offer()?;
    let answer = b.accept_offer(&offer)?;
    a.accept_answer(&answer)?;
    while started.elapsed() < Duration::from_secs(10) {
        let now = Instant::now();
        let deadline = a.drive(now)?.min(b.drive(now)?);
        if a.is_connected() && b.is_connected() {
            return Ok((a, b, started.elapsed()));
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(1)));
    }
    Err(ClientError::Call("two sessions on loopback did not connect within 10 s".into()))
}

/// Sets up `calls` calls, and on the last one measures `onsets` tone onsets.
pub fn run(calls: usize, onsets: usize) -> Result<CallFigures> {
    let mut figures = CallFigures::default();
    let mut pair = None;
    for _ in 0..calls.max(1) {
        let (a, b, setup) = connect()?;
        figures.setup_ms.push(setup.as_secs_f64() * 1e3);
        pair = Some((a, b));
    }
    let (mut a, mut b) = pair.ok_or_else(|| ClientError::Call("no call".into()))?;
    let mut tone = Tone::new(440.0, SAMPLE_RATE);
    let silence = vec![0i16; FRAME_SAMPLES];
    // Each onset: 300 ms of silence, then the tone until B hears it.
    let mut next_frame = Instant::now();
    for _ in 0..onsets {
        let quiet_until = Instant::now() + Duration::from_millis(300);
        let mut onset: Option<Instant> = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = Instant::now();
            if now > deadline {
                return Err(ClientError::Call("the tone did not arrive within 5 s".into()));
            }
            a.drive(now)?;
            b.drive(now)?;
            let heard = b.take_received();
            let decoded_at = Instant::now();
            // 1 ms windows: the first loud one is where the tone begins.
            let window = SAMPLE_RATE as usize / 1000;
            if let Some(started) = onset
                && let Some(first) = heard.chunks(window).position(|chunk| rms(chunk) > 2_000.0)
            {
                let captured = started - Duration::from_millis(20);
                let played = decoded_at + Duration::from_secs_f64((first * window) as f64 / f64::from(SAMPLE_RATE));
                figures.latency_ms.push((played - captured).as_secs_f64() * 1e3);
                break;
            }
            if now >= next_frame {
                if now >= quiet_until && onset.is_none() {
                    onset = Some(now);
                }
                let frame = if onset.is_some() { tone.next_frame(FRAME_SAMPLES) } else { silence.clone() };
                a.send_frame(&frame, now)?;
                next_frame += Duration::from_millis(20);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    Ok(figures)
}
