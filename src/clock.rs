//! The wall clock, for production. Tests use `privcomm_domain::clock::ManualClock`.

use privcomm_domain::{Clock, Timestamp};
use std::time::{SystemTime, UNIX_EPOCH};

/// Reads the system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Timestamp(i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX))
    }
}
