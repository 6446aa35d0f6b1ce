//! Test tones and their detection: a sine generator for PCM frames and the
//! Goertzel algorithm to find which frequency a recording carries.

use std::f64::consts::PI;

/// A sine of `frequency` Hz at `sample_rate`, as 16-bit PCM, continuing where it left off.
#[derive(Debug, Clone)]
pub struct Tone {
    frequency: f64,
    sample_rate: f64,
    phase: f64,
}

impl Tone {
    /// A tone of `frequency` Hz.
    pub fn new(frequency: f64, sample_rate: u32) -> Tone {
        Tone { frequency, sample_rate: f64::from(sample_rate), phase: 0.0 }
    }

    /// The next `samples` samples at half of full scale.
    pub fn next_frame(&mut self, samples: usize) -> Vec<i16> {
        let step = 2.0 * PI * self.frequency / self.sample_rate;
        (0..samples)
            .map(|_| {
                let value = (self.phase.sin() * 16_000.0) as i16;
                self.phase = (self.phase + step) % (2.0 * PI);
                value
            })
            .collect()
    }
}

/// The power of `frequency` in `samples` (Goertzel).
pub fn power_at(samples: &[i16], frequency: f64, sample_rate: u32) -> f64 {
    let coefficient = 2.0 * (2.0 * PI * frequency / f64::from(sample_rate)).cos();
    let (mut previous, mut before) = (0.0f64, 0.0f64);
    for &sample in samples {
        let current = f64::from(sample) + coefficient * previous - before;
        before = previous;
        previous = current;
    }
    previous * previous + before * before - coefficient * previous * before
}

/// The frequency in `from..=to` (1 Hz steps) with the most power in `samples`.
pub fn dominant(samples: &[i16], from: u32, to: u32, sample_rate: u32) -> u32 {
    (from..=to)
        .max_by(|a, b| {
            power_at(samples, f64::from(*a), sample_rate).total_cmp(&power_at(samples, f64::from(*b), sample_rate))
        })
        .unwrap_or(from)
}

/// Root-mean-square level of `samples` (0 for silence, ~11,300 for the tone above).
pub fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|s| f64::from(*s).powi(2)).sum::<f64>() / samples.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goertzel_finds_the_tone_to_the_hertz() {
        let mut tone = Tone::new(440.0, 48_000);
        let samples: Vec<i16> = (0..50).flat_map(|_| tone.next_frame(960)).collect();
        assert_eq!(dominant(&samples, 300, 800, 48_000), 440);
        assert!(rms(&samples) > 10_000.0);
        assert_eq!(rms(&[0; 960]), 0.0);
    }
}
