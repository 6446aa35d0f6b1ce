//! `privcomm-chat bench-calls`: calls between two clients through a real
//! server (docs/BENCHMARKS.md). Two accounts are registered and connected;
//! then, per call, A calls B, B answers as soon as it hears the offer, and
//! the set-up time runs from `start_call` (offer encrypted and sent through
//! the relay) until both sides report `Connected` (answer back, candidates,
//! ICE, DTLS). Then, in every call, audio runs as a phone would run it: A
//! hands in a 20 ms frame every 20 ms (a second of silence, then a 440 Hz
//! tone until B hears it, 300 ms of silence, the tone again…), B takes one
//! out every 20 ms from its jitter buffer, on a clock of its own whose phase
//! against A's is drawn at random per call. The latency of an onset runs from when
//! its first sample was captured (a frame handed in at `t` began at
//! `t - 20 ms`) until it plays at B (a frame taken out at `t` plays from `t`,
//! a sample `k` into it at `t + k / 48 kHz`): framing, Opus, SRTP over UDP
//! and the jitter buffer.

use crate::call::engine::{CallInfo, CallListener, CallSettings, CallState};
use crate::call::jitter::JitterStats;
use crate::call::media::{FRAME_SAMPLES, SAMPLE_RATE};
use crate::call::tone::{Tone, rms};
use crate::client::{Client, ClientConfig, ClientListener, ConnectionState};
use crate::core::ChatMessage;
use crate::error::{ClientError, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What was measured, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct CallFigures {
    /// `start_call` → both connected, one per call.
    pub setup_ms: Vec<f64>,
    /// A tone's first sample captured at A → played at B, one per onset.
    pub latency_ms: Vec<f64>,
    /// B's playout during the latency run.
    pub playout: JitterStats,
}

/// Connection states and call changes, with when they were heard.
struct Heard {
    states: Mutex<Sender<ConnectionState>>,
    calls: Mutex<Sender<(Instant, CallInfo)>>,
}

impl ClientListener for Heard {
    fn on_state_changed(&self, state: ConnectionState, _detail: String) {
        let _ = self.states.lock().map(|s| s.send(state));
    }
    fn on_message(&self, _message: ChatMessage) {}
    fn on_sent(&self, _message_id: String) {}
    fn on_send_failed(&self, _message_id: String, _reason: String) {}
    fn on_identity_changed(&self, _contact: String, _safety_number: String) {}
    fn on_undecryptable(&self, _from: String, _reason: String) {}
}

struct CallHeard(Arc<Heard>);

impl CallListener for CallHeard {
    fn on_call_changed(&self, call: CallInfo) {
        let _ = self.0.calls.lock().map(|s| s.send((Instant::now(), call)));
    }
}

struct Side {
    client: Arc<Client>,
    calls: Receiver<(Instant, CallInfo)>,
}

fn bench_error(what: impl std::fmt::Display) -> ClientError {
    ClientError::Call(format!("benchmark: {what}"))
}

impl Side {
    fn open(dir: &Path, name: &str, server: &str, settings: &CallSettings) -> Result<(Side, String)> {
        let (states_tx, states) = channel();
        let (calls_tx, calls) = channel();
        let heard = Arc::new(Heard { states: Mutex::new(states_tx), calls: Mutex::new(calls_tx) });
        let config = ClientConfig {
            store_path: dir
                .join(format!("bench-call-{name}-{}.db", uuid::Uuid::now_v7().simple()))
                .display()
                .to_string(),
            store_key: rand::random::<[u8; 32]>().to_vec(),
            server_url: server.to_owned(),
        };
        let client = Client::new(config, heard.clone())?;
        client.set_call_listener(Arc::new(CallHeard(heard)));
        client.configure_calls(settings.clone())?;
        let phone = format!("+1555{:010}", rand::random::<u64>() % 10_000_000_000);
        let user = client.register(phone)?;
        client.connect()?;
        loop {
            match states.recv_timeout(Duration::from_secs(30)) {
                Ok(ConnectionState::Connected) => break,
                Ok(ConnectionState::Error) => return Err(bench_error(format!("{name} cannot connect to {server}"))),
                Ok(_) => {}
                Err(_) => return Err(bench_error(format!("{name} not connected to {server} within 30 s"))),
            }
        }
        Ok((Side { client, calls }, user))
    }

    /// The next change of a call that satisfies `wanted`, within 10 s.
    fn wait(&self, wanted: impl Fn(&CallInfo) -> bool) -> Result<(Instant, CallInfo)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, call) =
                self.calls.recv_timeout(left).map_err(|_| bench_error("a call did not progress in 10 s"))?;
            if call.state == CallState::Ended && !wanted(&call) {
                return Err(bench_error(format!("the call ended: {:?} {}", call.end_reason, call.detail)));
            }
            if wanted(&call) {
                return Ok((at, call));
            }
        }
    }
}

/// Sets up `calls` calls from A to B through the server at `server` and
/// times `onsets` tone onsets, spread over the calls. Stores go to `dir`.
pub fn run(server: &str, calls: usize, onsets: usize, relay_only: bool, dir: &Path) -> Result<CallFigures> {
    let settings = CallSettings { relay_only, ..CallSettings::default() };
    let (a, _) = Side::open(dir, "a", server, &settings)?;
    let (b, b_id) = Side::open(dir, "b", server, &settings)?;
    let mut figures = CallFigures::default();
    let calls = calls.max(1);
    for n in 0..calls {
        let started = Instant::now();
        let id = a.client.start_call(b_id.clone())?;
        let (_, incoming) = b.wait(|c| c.state == CallState::Incoming)?;
        b.client.accept_call(incoming.call_id.clone())?;
        let (at_a, _) = a.wait(|c| c.call_id == id && c.state == CallState::Connected)?;
        let (at_b, _) = b.wait(|c| c.call_id == id && c.state == CallState::Connected)?;
        figures.setup_ms.push((at_a.max(at_b) - started).as_secs_f64() * 1e3);
        // This call's share of the onsets.
        let share = onsets * (n + 1) / calls - onsets * n / calls;
        if share > 0 {
            let phase = Duration::from_micros(rand::random::<u64>() % 20_000);
            figures.latency_ms.extend(latency(&a.client, &b.client, &id, share, phase)?);
            figures.playout += b.client.call_jitter_stats(&id)?;
        }
        a.client.hang_up(id.clone())?;
        a.wait(|c| c.call_id == id && c.state == CallState::Ended)?;
        b.wait(|c| c.call_id == id && c.state == CallState::Ended)?;
    }
    a.client.shutdown();
    b.client.shutdown();
    Ok(figures)
}

/// A hands in a frame every 20 ms, B takes one out every 20 ms (`phase`
/// after A's clock), each on its own thread.
fn latency(a: &Arc<Client>, b: &Arc<Client>, call: &str, onsets: usize, phase: Duration) -> Result<Vec<f64>> {
    let onset: Arc<Mutex<Option<Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let heard = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (a, call, onset, done, heard) = (a.clone(), call.to_owned(), onset.clone(), done.clone(), heard.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut tone = Tone::new(440.0, SAMPLE_RATE);
            let silence = vec![0i16; FRAME_SAMPLES];
            let mut next = Instant::now();
            let mut quiet_until = next + Duration::from_secs(1);
            while !done.load(Ordering::Acquire) {
                let now = Instant::now();
                if heard.load(Ordering::Acquire) {
                    // Cleared before `heard`: B measures an onset only while `heard` is false.
                    *onset.lock().map_err(bench_error)? = None;
                    heard.store(false, Ordering::Release);
                    quiet_until = now + Duration::from_millis(300);
                }
                let mut started = onset.lock().map_err(bench_error)?;
                if started.is_none() && now >= quiet_until {
                    *started = Some(now);
                }
                let frame = if started.is_some() { tone.next_frame(FRAME_SAMPLES) } else { silence.clone() };
                drop(started);
                a.push_audio(call.clone(), frame)?;
                next += Duration::from_millis(20);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(())
        })
    };
    let mut latencies = Vec::new();
    let mut next = Instant::now() + phase;
    let give_up = Instant::now() + Duration::from_secs(6 + onsets as u64);
    let result = (|| -> Result<()> {
        while latencies.len() < onsets {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            if Instant::now() > give_up {
                return Err(bench_error("the tone did not arrive in time"));
            }
            let pulled_at = Instant::now();
            let frame = b.pull_audio(call.to_owned())?;
            next += Duration::from_millis(20);
            let started = *onset.lock().map_err(bench_error)?;
            let window = SAMPLE_RATE as usize / 1000;
            if let Some(started) = started
                && !heard.load(Ordering::Acquire)
                && let Some(first) = frame.chunks(window).position(|chunk| rms(chunk) > 2_000.0)
            {
                let captured = started - Duration::from_millis(20);
                let played = pulled_at + Duration::from_secs_f64((first * window) as f64 / f64::from(SAMPLE_RATE));
                latencies.push((played - captured).as_secs_f64() * 1e3);
                heard.store(true, Ordering::Release);
            }
        }
        Ok(())
    })();
    done.store(true, Ordering::Release);
    pusher.join().map_err(|_| bench_error("the audio thread panicked"))??;
    result.map(|()| latencies)
}
