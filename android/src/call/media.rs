//! The media path of a call: a str0m [`Rtc`] (ICE, DTLS, SRTP) with one Opus
//! audio track (48 kHz mono, 20 ms frames), a UDP socket, and the Opus
//! encoder and decoder. It is driven Sans-IO: the owner calls
//! [`MediaSession::drive`] when the returned deadline passes or a packet may
//! have arrived, and hands PCM in and out.
//!
//! The offer and answer carry the DTLS fingerprints; exchanged over the
//! Signal session (as the call signalling is), they authenticate the media
//! keys end to end. ICE candidates are not in them: they are trickled
//! ([`MediaSession::gather`], [`MediaSession::add_remote_candidate`]).
//!
//! Received packets wait in a [`JitterBuffer`] until the platform takes the
//! next frame ([`MediaSession::pull_frame`]).
//!
//! With a TURN credential ([`MediaSession::start_relay`]) the session also
//! allocates a relay on the same socket ([`TurnClient`]) and offers it as a
//! relayed candidate once granted ([`MediaSession::take_relay_candidate`]);
//! str0m's packets from that candidate travel in Send indications, and Data
//! indications from the TURN server are handed to str0m as if they had
//! arrived on the relayed address. Relay only (no host candidate) keeps this
//! device's addresses from the peer.

use crate::call::jitter::{JitterBuffer, JitterStats, Playout};
use crate::call::turn::{TurnClient, TurnState, is_stun};
use crate::error::{ClientError, Result};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

/// Samples per second.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 960;

/// Sends what the TURN client has for its server (lost ones are sent
/// again by its timers).
fn to_turn(socket: &UdpSocket, turn: &mut TurnClient) {
    for datagram in turn.take_outgoing() {
        let _ = socket.send_to(&datagram, turn.server());
    }
}

fn call_error(what: &str, error: impl std::fmt::Display) -> ClientError {
    ClientError::Call(format!("{what}: {error}"))
}

/// One side of a call's media.
pub struct MediaSession {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    pending_offer: Option<SdpPendingOffer>,
    mid: Option<Mid>,
    encoder: opus::Encoder,
    decoder: opus::Decoder,
    /// RTP time of the next frame sent (samples).
    sent_samples: u64,
    muted: bool,
    connected: bool,
    ice: IceConnectionState,
    /// Received packets not yet played.
    jitter: JitterBuffer,
    /// When the last datagram arrived.
    last_received: Option<Instant>,
    /// The TURN relay, if one was asked for, and whether its candidate was taken.
    turn: Option<TurnClient>,
    relay_offered: bool,
    /// The peer's candidates' IPs: the relay lets them in as soon as it can.
    remote_ips: Vec<IpAddr>,
}

impl Drop for MediaSession {
    /// Gives the relay back rather than leaving it to expire.
    fn drop(&mut self) {
        if let Some(turn) = &mut self.turn {
            turn.close();
            to_turn(&self.socket, turn);
        }
    }
}

impl std::fmt::Debug for MediaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaSession").field("local", &self.local).field("connected", &self.connected).finish()
    }
}

impl MediaSession {
    /// A session with a UDP socket on `ip` (a free port), its host candidate
    /// (see [`MediaSession::gather`]).
    pub fn new(ip: IpAddr, now: Instant) -> Result<MediaSession> {
        let socket = UdpSocket::bind((ip, 0)).map_err(|e| call_error("binding the media socket", e))?;
        socket.set_nonblocking(true).map_err(|e| call_error("media socket", e))?;
        let local = socket.local_addr().map_err(|e| call_error("media socket", e))?;
        let rtc = Rtc::builder().clear_codecs().enable_opus(true, false).build(now);
        let encoder = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)
            .map_err(|e| call_error("Opus encoder", e))?;
        let decoder =
            opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).map_err(|e| call_error("Opus decoder", e))?;
        Ok(MediaSession {
            rtc,
            socket,
            local,
            pending_offer: None,
            mid: None,
            encoder,
            decoder,
            sent_samples: 0,
            muted: false,
            connected: false,
            ice: IceConnectionState::New,
            jitter: JitterBuffer::new(FRAME_SAMPLES as u64),
            last_received: None,
            turn: None,
            relay_offered: false,
            remote_ips: Vec::new(),
        })
    }

    /// The UDP address media is received on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// A socket on the same port, to wait on for packets (`drive` reads them).
    pub fn socket(&self) -> Result<UdpSocket> {
        self.socket.try_clone().map_err(|e| call_error("media socket", e))
    }

    /// Adds this side's candidates (the host candidate) and returns them as
    /// SDP `candidate:` lines for the peer. Call after the offer or answer.
    pub fn gather(&mut self) -> Result<Vec<String>> {
        let candidate = Candidate::host(self.local, "udp").map_err(|e| call_error("host candidate", e))?;
        let line = candidate.to_sdp_string();
        self.rtc
            .add_local_candidate(candidate)
            .ok_or_else(|| ClientError::Call("the host candidate was refused".into()))?;
        Ok(vec![line])
    }

    /// Starts allocating a relay on the TURN server `server` with a
    /// credential the API issued; its candidate comes from
    /// [`MediaSession::take_relay_candidate`] once granted.
    pub fn start_relay(&mut self, server: SocketAddr, username: &str, credential: &str, now: Instant) {
        let mut turn = TurnClient::new(server, username, credential, now);
        // The peer's candidates so far, let in as soon as the relay is granted.
        for ip in &self.remote_ips {
            turn.permit(*ip, now);
        }
        to_turn(&self.socket, &mut turn);
        self.turn = Some(turn);
    }

    /// The relayed candidate (an SDP `candidate:` line), once, when the
    /// relay has been granted; added to this side's candidates.
    pub fn take_relay_candidate(&mut self) -> Result<Option<String>> {
        let Some(relayed) = self.turn.as_ref().and_then(TurnClient::relayed).filter(|_| !self.relay_offered) else {
            return Ok(None);
        };
        self.relay_offered = true;
        let candidate = Candidate::relayed(relayed, self.local, "udp").map_err(|e| call_error("relay candidate", e))?;
        let line = candidate.to_sdp_string();
        self.rtc
            .add_local_candidate(candidate)
            .ok_or_else(|| ClientError::Call("the relay candidate was refused".into()))?;
        Ok(Some(line))
    }

    /// Where the relay is (`None` if none was asked for).
    pub fn relay_state(&self) -> Option<TurnState> {
        self.turn.as_ref().map(|turn| turn.state().clone())
    }

    /// Adds a candidate of the peer (an SDP `candidate:` line).
    pub fn add_remote_candidate(&mut self, line: &str) -> Result<()> {
        let line = line.trim().trim_start_matches("a=");
        let candidate = Candidate::from_sdp_string(line).map_err(|e| call_error("a candidate", e))?;
        let ip = candidate.addr().ip();
        if !self.remote_ips.contains(&ip) {
            self.remote_ips.push(ip);
            if let Some(turn) = &mut self.turn {
                turn.permit(ip, Instant::now());
                to_turn(&self.socket, turn);
            }
        }
        self.rtc.add_remote_candidate(candidate);
        Ok(())
    }

    /// How long since a datagram last arrived (since `since` if none ever did).
    pub fn quiet_for(&self, since: Instant, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_received.unwrap_or(since).max(since))
    }

    /// This side's DTLS fingerprint as the offer or answer carries it
    /// (`sha-256 AB:CD:…`): what the peer's Signal-authenticated copy is checked against.
    pub fn local_fingerprint(&mut self) -> String {
        self.rtc.direct_api().local_dtls_fingerprint().to_string()
    }

    /// An offer (SDP) with one send-and-receive audio track.
    pub fn create_offer(&mut self) -> Result<String> {
        let mut change = self.rtc.sdp_api();
        let mid = change.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = change.apply().ok_or_else(|| ClientError::Call("nothing to offer".into()))?;
        self.mid = Some(mid);
        self.pending_offer = Some(pending);
        Ok(offer.to_sdp_string())
    }

    /// Accepts the caller's offer; returns the answer (SDP).
    pub fn accept_offer(&mut self, sdp: &str) -> Result<String> {
        let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| call_error("the offer", e))?;
        let answer = self.rtc.sdp_api().accept_offer(offer).map_err(|e| call_error("the offer", e))?;
        Ok(answer.to_sdp_string())
    }

    /// Accepts the callee's answer to [`MediaSession::create_offer`].
    pub fn accept_answer(&mut self, sdp: &str) -> Result<()> {
        let pending = self.pending_offer.take().ok_or_else(|| ClientError::Call("no offer is waiting".into()))?;
        let answer = SdpAnswer::from_sdp_string(sdp).map_err(|e| call_error("the answer", e))?;
        self.rtc.sdp_api().accept_answer(pending, answer).map_err(|e| call_error("the answer", e))
    }

    /// Whether DTLS is up and media can flow.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The ICE connection state.
    pub fn ice_state(&self) -> IceConnectionState {
        self.ice
    }

    /// Sends silence instead of what is handed in while `muted`.
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    /// Encodes one 20 ms frame of PCM and sends it (once connected; before, it is dropped).
    pub fn send_frame(&mut self, pcm: &[i16], now: Instant) -> Result<()> {
        if pcm.len() != FRAME_SAMPLES {
            return Err(ClientError::Call(format!("a frame is {FRAME_SAMPLES} samples, not {}", pcm.len())));
        }
        let Some(mid) = self.mid.filter(|_| self.connected) else { return Ok(()) };
        let silence = [0i16; FRAME_SAMPLES];
        let mut packet = [0u8; 1500];
        let input = if self.muted { &silence[..] } else { pcm };
        let size = self.encoder.encode(input, &mut packet).map_err(|e| call_error("Opus encoding", e))?;
        let writer = self.rtc.writer(mid).ok_or_else(|| ClientError::Call("no audio track".into()))?;
        let pt = writer.payload_params().next().map(|p| p.pt()).ok_or_else(|| ClientError::Call("no Opus".into()))?;
        let time = MediaTime::new(self.sent_samples, Frequency::FORTY_EIGHT_KHZ);
        writer.write(pt, now, time, &packet[..size]).map_err(|e| call_error("sending audio", e))?;
        self.sent_samples += FRAME_SAMPLES as u64;
        Ok(())
    }

    /// The next 20 ms frame to play (silence before anything arrived, the
    /// decoder's concealment for a lost or late packet).
    pub fn pull_frame(&mut self) -> Result<Vec<i16>> {
        let mut pcm = vec![0i16; FRAME_SAMPLES * 6];
        let samples = match self.jitter.pop() {
            Playout::Packet(packet) => {
                self.decoder.decode(&packet, &mut pcm, false).map_err(|e| call_error("Opus decoding", e))?
            }
            Playout::Conceal => self
                .decoder
                .decode(&[], &mut pcm[..FRAME_SAMPLES], false)
                .map_err(|e| call_error("Opus concealment", e))?,
            Playout::Silence => FRAME_SAMPLES,
        };
        pcm.truncate(samples);
        Ok(pcm)
    }

    /// What playout has done so far (frames played, concealed, late, skipped).
    pub fn jitter_stats(&self) -> JitterStats {
        self.jitter.stats()
    }

    /// The frames received so far, decoded (for tests that do not play at a
    /// real-time pace; like playout, it skips what lies more than the jitter
    /// buffer's depth behind the newest frame).
    pub fn drain_received(&mut self) -> Result<Vec<i16>> {
        let mut out = Vec::new();
        while !self.jitter.is_empty() {
            out.extend(self.pull_frame()?);
        }
        Ok(out)
    }

    /// Feeds the packets that arrived and the time to the engine, sends what
    /// it wants sent, handles its events; returns when to drive it next.
    pub fn drive(&mut self, now: Instant) -> Result<Instant> {
        // As str0m wants it driven: after every input, its output until it
        // asks for a timeout — so a packet is handled in the state the
        // previous one left (a DTLS hello right behind the ICE nomination
        // that enables DTLS is not dropped).
        self.rtc.handle_input(Input::Timeout(now)).map_err(|e| call_error("media", e))?;
        if let Some(turn) = &mut self.turn {
            turn.handle_timeout(now);
            to_turn(&self.socket, turn);
        }
        let mut deadline = self.poll(now)?;
        let mut buffer = [0u8; 2000];
        loop {
            match self.socket.recv_from(&mut buffer) {
                Ok((size, source)) => {
                    let (mut source, mut destination, mut datagram) = (source, self.local, &buffer[..size]);
                    let relayed;
                    if let Some(turn) = self.turn.as_mut().filter(|t| t.server() == source && is_stun(datagram)) {
                        // From the TURN server: its answer, or a peer's packet through the relay.
                        let data = turn.handle(datagram, now);
                        let relay = turn.relayed();
                        to_turn(&self.socket, turn);
                        let (Some((peer, data)), Some(relay)) = (data, relay) else { continue };
                        relayed = data;
                        (source, destination, datagram) = (peer, relay, &relayed[..]);
                    }
                    self.last_received = Some(now);
                    let Ok(contents) = datagram.try_into() else { continue };
                    let receive = Receive { proto: Protocol::Udp, source, destination, contents };
                    let input = Input::Receive(now, receive);
                    // Anything that is not this call's STUN, DTLS or SRTP is dropped.
                    if self.rtc.accepts(&input) {
                        self.rtc.handle_input(input).map_err(|e| call_error("media", e))?;
                        deadline = self.poll(now)?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(deadline),
                Err(e) => return Err(call_error("receiving media", e)),
            }
        }
    }

    /// Sends what the engine wants sent and handles its events, until it
    /// asks to be woken (at most 20 ms from `now`).
    fn poll(&mut self, now: Instant) -> Result<Instant> {
        loop {
            match self.rtc.poll_output().map_err(|e| call_error("media", e))? {
                Output::Timeout(at) => {
                    let turn = self.turn.as_ref().and_then(TurnClient::next_timeout);
                    return Ok(turn.map_or(at, |turn| turn.min(at)).min(now + Duration::from_millis(20)));
                }
                Output::Transmit(transmit) => {
                    // A lost datagram is what UDP does; ICE and RTP cope.
                    match self.turn.as_mut().filter(|t| t.relayed() == Some(transmit.source)) {
                        Some(turn) => {
                            let wrapped = turn.wrap(transmit.destination, &transmit.contents, now);
                            // A new permission's request goes first.
                            to_turn(&self.socket, turn);
                            if let Some(wrapped) = wrapped {
                                let _ = self.socket.send_to(&wrapped, turn.server());
                            }
                        }
                        None => {
                            let _ = self.socket.send_to(&transmit.contents, transmit.destination);
                        }
                    }
                }
                Output::Event(event) => self.on_event(event)?,
            }
        }
    }

    fn on_event(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Connected => self.connected = true,
            Event::IceConnectionStateChange(state) => self.ice = state,
            Event::MediaAdded(added) => self.mid = Some(added.mid),
            Event::MediaData(data) => self.jitter.insert(data.time.numer(), data.data.to_vec()),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::tone::{Tone, dominant, rms};

    /// Drives `a` and `b` until `done` or `limit` passes; every 20 ms of a
    /// connected call, each sends the next frame of its tone.
    fn run(
        a: &mut MediaSession,
        b: &mut MediaSession,
        tones: &mut (Tone, Tone),
        limit: Duration,
        mut done: impl FnMut(&mut MediaSession, &mut MediaSession) -> bool,
    ) -> Result<bool> {
        let started = Instant::now();
        let mut next_frame = started;
        while started.elapsed() < limit {
            let now = Instant::now();
            let deadline = a.drive(now)?.min(b.drive(now)?);
            if a.is_connected() && b.is_connected() && now >= next_frame {
                a.send_frame(&tones.0.next_frame(FRAME_SAMPLES), now)?;
                b.send_frame(&tones.1.next_frame(FRAME_SAMPLES), now)?;
                next_frame += Duration::from_millis(20);
            }
            if done(a, b) {
                return Ok(true);
            }
            let wake = deadline.min(next_frame).max(Instant::now() + Duration::from_millis(1));
            std::thread::sleep(wake.saturating_duration_since(Instant::now()).min(Duration::from_millis(5)));
        }
        Ok(false)
    }

    /// Two sessions on loopback that exchanged offer (passed through
    /// `on_the_way` to bob), answer and candidates, as the signalling does.
    fn negotiated(on_the_way: impl Fn(&str) -> String) -> Result<(MediaSession, MediaSession, String)> {
        let now = Instant::now();
        let loopback: IpAddr = "127.0.0.1".parse().map_err(|e| call_error("address", e))?;
        let (mut alice, mut bob) = (MediaSession::new(loopback, now)?, MediaSession::new(loopback, now)?);
        let offer = alice.create_offer()?;
        let answer = bob.accept_offer(&on_the_way(&offer))?;
        alice.accept_answer(&answer)?;
        for line in alice.gather()? {
            bob.add_remote_candidate(&line)?;
        }
        for line in bob.gather()? {
            alice.add_remote_candidate(&line)?;
        }
        Ok((alice, bob, offer))
    }

    #[test]
    fn two_sessions_on_loopback_connect_and_each_hears_the_others_tone_and_silence_when_muted() -> Result<()> {
        let (mut alice, mut bob, offer) = negotiated(str::to_owned)?;
        assert!(offer.contains("a=fingerprint:"), "the offer carries the DTLS fingerprint");
        assert!(!offer.contains("a=candidate"), "candidates are trickled, not in the offer");
        let mut tones = (Tone::new(440.0, SAMPLE_RATE), Tone::new(660.0, SAMPLE_RATE));
        let second = SAMPLE_RATE as usize;
        let (mut at_alice, mut at_bob) = (Vec::new(), Vec::new());
        let heard = run(&mut alice, &mut bob, &mut tones, Duration::from_secs(10), |a, b| {
            at_alice.extend(a.drain_received().expect("decodes"));
            at_bob.extend(b.drain_received().expect("decodes"));
            at_alice.len() >= second && at_bob.len() >= second
        })?;
        assert!(
            heard,
            "no second of audio both ways within 10 s (connected: {}, {})",
            alice.is_connected(),
            bob.is_connected()
        );
        // The codec's first frames ramp up: judge the last half second.
        let tail = |pcm: &[i16]| pcm[pcm.len() - second / 2..].to_vec();
        assert!(dominant(&tail(&at_bob), 400, 700, SAMPLE_RATE).abs_diff(440) <= 5, "bob did not hear 440 Hz");
        assert!(dominant(&tail(&at_alice), 400, 700, SAMPLE_RATE).abs_diff(660) <= 5, "alice did not hear 660 Hz");
        assert!(rms(&tail(&at_bob)) > 3_000.0);

        alice.set_muted(true);
        let mut muted = Vec::new();
        run(&mut alice, &mut bob, &mut tones, Duration::from_millis(600), |_, b| {
            muted.extend(b.drain_received().expect("decodes"));
            false
        })?;
        assert!(alice.is_connected() && bob.is_connected(), "muting ended the call");
        assert!(rms(&muted[muted.len() - second / 5..]) < 50.0, "bob still hears alice while she is muted");
        alice.set_muted(false);
        let mut back = Vec::new();
        run(&mut alice, &mut bob, &mut tones, Duration::from_millis(600), |_, b| {
            back.extend(b.drain_received().expect("decodes"));
            false
        })?;
        assert!(
            dominant(&back[back.len() - second / 5..], 400, 700, SAMPLE_RATE).abs_diff(440) <= 5,
            "unmuting did not bring the tone back"
        );
        Ok(())
    }

    #[test]
    fn a_peer_whose_certificate_does_not_match_the_signalled_fingerprint_is_refused() -> Result<()> {
        // Someone between them swapped the fingerprint bob is told to expect.
        let forged = format!("sha-256 {}", vec!["AB"; 32].join(":"));
        let swap = |offer: &str| {
            let genuine = offer.lines().find_map(|l| l.strip_prefix("a=fingerprint:")).expect("a fingerprint");
            offer.replace(genuine, &forged)
        };
        let (mut alice, mut bob, offer) = negotiated(swap)?;
        assert!(offer.contains(&format!("a=fingerprint:{}", alice.local_fingerprint())));
        assert!(!swap(&offer).contains(&alice.local_fingerprint()), "nothing was forged");
        let started = Instant::now();
        let mut refused = None;
        while started.elapsed() < Duration::from_secs(5) && refused.is_none() {
            let now = Instant::now();
            let _ = alice.drive(now);
            if let Err(error) = bob.drive(now) {
                refused = Some(error);
            }
            assert!(!bob.is_connected(), "bob connected to a certificate he was not told about");
            std::thread::sleep(Duration::from_millis(2));
        }
        let refused =
            refused.ok_or_else(|| ClientError::Call("the forged fingerprint went unnoticed for 5 s".into()))?;
        assert!(refused.to_string().contains("fingerprint"), "{refused}");
        Ok(())
    }
}
