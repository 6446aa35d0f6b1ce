//! The receive side's jitter buffer: Opus packets by RTP time, taken out one
//! 20 ms frame at a time at the platform's playback pace.
//!
//! Playout starts with the first packet. A frame that is missing while a
//! later one is already here is lost: the decoder conceals it. A frame that
//! is missing with nothing after it is late: the decoder conceals the gap
//! and the frame is still waited for (it plays one frame later).
//!
//! The delay adapts downwards: when a frame was always waiting beyond the
//! one played for a whole [`WINDOW`] of frames (one second), one frame is
//! skipped — the delay a late packet added is given back once the network
//! is steady again. And the buffer never holds more than [`MAX_DEPTH`]
//! frames ahead of playout: beyond that the oldest are skipped at once.
//! Packets older than the playout point are dropped.

use std::collections::BTreeMap;

/// Frames the buffer may hold ahead of playout (60 ms).
pub const MAX_DEPTH: u64 = 3;
/// Frames over which the spare frames are watched before shrinking the delay (1 s).
pub const WINDOW: u32 = 50;

/// What to play next.
#[derive(Debug, PartialEq, Eq)]
pub enum Playout {
    /// The next frame's packet.
    Packet(Vec<u8>),
    /// The next frame is lost or late: conceal the gap.
    Conceal,
    /// Nothing to play yet (before the first packet).
    Silence,
}

/// What playout has done so far, in frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitterStats {
    /// Played from a packet.
    pub played: u64,
    /// Concealed: lost (a later frame was already here).
    pub lost: u64,
    /// Concealed: late (nothing after it was here yet; waited for).
    pub late: u64,
    /// Skipped to keep the delay bounded.
    pub skipped: u64,
    /// Arrived after their turn (dropped).
    pub too_late: u64,
}

impl std::ops::AddAssign for JitterStats {
    fn add_assign(&mut self, other: JitterStats) {
        self.played += other.played;
        self.lost += other.lost;
        self.late += other.late;
        self.skipped += other.skipped;
        self.too_late += other.too_late;
    }
}

/// Packets waiting to be played, keyed by RTP time in samples.
#[derive(Debug)]
pub struct JitterBuffer {
    frame: u64,
    packets: BTreeMap<u64, Vec<u8>>,
    /// RTP time of the next frame to play; `None` before the first packet.
    next: Option<u64>,
    stats: JitterStats,
    /// Frames played in the current window, and the fewest spare frames (beyond the played one) seen in it.
    window: (u32, u64),
}

impl JitterBuffer {
    /// An empty buffer for frames of `frame` samples.
    pub fn new(frame: u64) -> JitterBuffer {
        JitterBuffer {
            frame,
            packets: BTreeMap::new(),
            next: None,
            stats: JitterStats::default(),
            window: (0, u64::MAX),
        }
    }

    /// What playout has done so far.
    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Adds a packet received for RTP time `time` (a late or repeated one is dropped).
    pub fn insert(&mut self, time: u64, packet: Vec<u8>) {
        if self.next.is_some_and(|next| time < next) {
            self.stats.too_late += 1;
            return;
        }
        self.packets.entry(time).or_insert(packet);
    }

    /// The next frame to play.
    pub fn pop(&mut self) -> Playout {
        let Some(&newest) = self.packets.keys().next_back() else {
            if self.next.is_some() {
                self.stats.late += 1;
                return Playout::Conceal;
            }
            return Playout::Silence;
        };
        let mut next = match self.next {
            Some(next) => next,
            None => *self.packets.keys().next().expect("not empty"),
        };
        // Bounded delay: skip what is more than MAX_DEPTH frames behind the newest.
        let floor = newest.saturating_sub((MAX_DEPTH - 1) * self.frame);
        if next < floor {
            self.stats.skipped += (floor - next) / self.frame;
            next = floor;
            self.packets = self.packets.split_off(&floor);
        }
        if let Some(packet) = self.packets.remove(&next) {
            self.next = Some(next + self.frame);
            self.stats.played += 1;
            self.watch_spare(newest);
            return Playout::Packet(packet);
        }
        if newest > next {
            self.next = Some(next + self.frame);
            self.stats.lost += 1;
            return Playout::Conceal;
        }
        self.next = Some(next);
        self.stats.late += 1;
        self.window = (0, u64::MAX);
        Playout::Conceal
    }

    /// After a frame was played: counts the frames waiting behind it; once a
    /// whole window had one to spare each time, skips the oldest waiting frame.
    fn watch_spare(&mut self, newest: u64) {
        let next = self.next.expect("set by the caller");
        let spare = if newest >= next { (newest - next) / self.frame + 1 } else { 0 };
        self.window = (self.window.0 + 1, self.window.1.min(spare));
        if self.window.0 < WINDOW {
            return;
        }
        if self.window.1 >= 1 && self.packets.remove(&next).is_some() {
            self.next = Some(next + self.frame);
            self.stats.skipped += 1;
        }
        self.window = (0, u64::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 960;

    fn packet(n: u8) -> Vec<u8> {
        vec![n]
    }

    #[test]
    fn frames_come_out_in_rtp_order_whatever_order_they_arrived_in() {
        let mut buffer = JitterBuffer::new(F);
        assert_eq!(buffer.pop(), Playout::Silence, "nothing yet");
        buffer.insert(1000 + F, packet(2));
        buffer.insert(1000, packet(1));
        assert_eq!(buffer.pop(), Playout::Packet(packet(1)));
        assert_eq!(buffer.pop(), Playout::Packet(packet(2)));
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_missing_frame_with_a_later_one_here_is_lost_and_without_one_is_waited_for() {
        let mut buffer = JitterBuffer::new(F);
        buffer.insert(0, packet(1));
        assert_eq!(buffer.pop(), Playout::Packet(packet(1)));
        // Frame F is late: concealed, and it is still expected.
        assert_eq!(buffer.pop(), Playout::Conceal);
        buffer.insert(F, packet(2));
        assert_eq!(buffer.pop(), Playout::Packet(packet(2)));
        // Frame 2F never comes, 3F does: 2F is concealed, then 3F plays.
        buffer.insert(3 * F, packet(4));
        assert_eq!(buffer.pop(), Playout::Conceal);
        assert_eq!(buffer.pop(), Playout::Packet(packet(4)));
        // 2F turning up now is too late.
        buffer.insert(2 * F, packet(3));
        assert!(buffer.is_empty());
        let stats = buffer.stats();
        assert_eq!((stats.played, stats.lost, stats.late, stats.too_late), (3, 1, 1, 1));
    }

    #[test]
    fn a_frame_of_delay_that_was_never_needed_for_a_second_is_given_back() {
        let mut buffer = JitterBuffer::new(F);
        // The first packet came alone, then every pull finds two waiting: one to spare.
        buffer.insert(0, packet(0));
        buffer.insert(F, packet(1));
        let mut played = Vec::new();
        for n in 2..(2 + u64::from(WINDOW) + 5) {
            buffer.insert(n * F, packet(n as u8));
            if let Playout::Packet(p) = buffer.pop() {
                played.push(p[0]);
            }
        }
        assert_eq!(buffer.stats().skipped, 1, "one frame skipped after a window with one to spare");
        assert_eq!(buffer.len(), 1, "the spare frame is gone");
        // Played in order, with exactly one frame left out.
        assert!(played.windows(2).all(|w| w[1] == w[0] + 1 || w[1] == w[0] + 2));
        assert_eq!(played.windows(2).filter(|w| w[1] == w[0] + 2).count(), 1);
    }

    #[test]
    fn a_steady_buffer_with_nothing_to_spare_keeps_every_frame() {
        let mut buffer = JitterBuffer::new(F);
        for n in 0..200u64 {
            buffer.insert(n * F, packet(n as u8));
            assert_eq!(buffer.pop(), Playout::Packet(packet(n as u8)));
        }
        assert_eq!(buffer.stats(), JitterStats { played: 200, ..JitterStats::default() });
    }

    #[test]
    fn the_delay_is_bounded_by_skipping_the_oldest_frames() {
        let mut buffer = JitterBuffer::new(F);
        for n in 0..10u8 {
            buffer.insert(u64::from(n) * F, packet(n));
        }
        // Ten frames arrived at once: playout jumps to the newest three.
        assert_eq!(buffer.pop(), Playout::Packet(packet(7)));
        assert_eq!(buffer.len(), 2);
        assert_eq!(buffer.pop(), Playout::Packet(packet(8)));
        assert_eq!(buffer.pop(), Playout::Packet(packet(9)));
        assert_eq!(buffer.pop(), Playout::Conceal);
        let stats = buffer.stats();
        assert_eq!((stats.played, stats.skipped, stats.late), (3, 7, 1));
    }
}
