//! Offline push: when a message is accepted for a user who is connected
//! nowhere and has a push token, a push request — no content, only "you have
//! mail" and the device token — is published for a push gateway to forward
//! (NATS subject `privcomm.push.<stream>.<platform>` in cluster mode, the
//! in-process push feed in embedded mode; docs/PROTOCOL.md).
//!
//! The node that accepted the message decides, from its own connections and
//! the cluster [`Roster`](crate::presence::Roster). Requests for one user are
//! coalesced: at most one per window per node, since one wake-up fetches the
//! whole mailbox.

use async_trait::async_trait;
use privcomm_domain::UserId;
use privcomm_domain::user::PushTarget;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What a push gateway receives.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct PushRequest {
    /// Wire version (1).
    pub v: u8,
    /// Always `mail`: the app should connect and fetch its mailbox.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `fcm` or `apns`.
    pub platform: String,
    /// The device token to address.
    pub token: String,
}

impl PushRequest {
    /// "You have mail" for `target`.
    pub fn mail(target: &PushTarget) -> PushRequest {
        PushRequest { v: 1, kind: "mail", platform: target.platform.clone(), token: target.token.clone() }
    }
}

impl std::fmt::Debug for PushRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushRequest").field("platform", &self.platform).field("token", &"…").finish()
    }
}

/// Where push requests go.
#[async_trait]
pub trait PushSink: Send + Sync + 'static {
    /// Publishes one request.
    async fn publish(&self, request: &PushRequest) -> Result<(), String>;
}

/// Publishes "you have mail", at most once per window per user.
pub struct Pusher {
    sink: Arc<dyn PushSink>,
    window: Duration,
    recent: Mutex<HashMap<UserId, Instant>>,
}

impl Pusher {
    /// A pusher over `sink` that coalesces requests per user within `window`.
    pub fn new(sink: Arc<dyn PushSink>, window: Duration) -> Pusher {
        Pusher { sink, window, recent: Mutex::default() }
    }

    /// Should `user` be pushed now? Records the push if so.
    fn due(&self, user: UserId) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if recent.len() >= 10_000 {
            let window = self.window;
            recent.retain(|_, at| now.duration_since(*at) < window);
        }
        match recent.get(&user) {
            Some(at) if now.duration_since(*at) < self.window => false,
            _ => {
                recent.insert(user, now);
                true
            }
        }
    }

    /// Was `user` pushed within the window? (Lets callers skip looking up a token.)
    pub fn recently_pushed(&self, user: UserId) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.get(&user).is_some_and(|at| at.elapsed() < self.window)
    }

    /// Tells `user`'s device it has mail, unless it was told within the window.
    pub async fn mail(&self, user: UserId, target: &PushTarget) {
        if !self.due(user) {
            return;
        }
        if let Err(error) = self.sink.publish(&PushRequest::mail(target)).await {
            tracing::warn!(%error, platform = %target.platform, "cannot publish a push request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<PushRequest>>);

    #[async_trait]
    impl PushSink for Collect {
        async fn publish(&self, request: &PushRequest) -> Result<(), String> {
            self.0.lock().expect("lock").push(request.clone());
            Ok(())
        }
    }

    #[tokio::test]
    async fn requests_for_one_user_are_coalesced_within_the_window() {
        let sink = Arc::new(Collect::default());
        let pusher = Pusher::new(sink.clone(), Duration::from_secs(60));
        let target = PushTarget { platform: "fcm".into(), token: "device-token".into() };
        let (a, b) = (UserId(uuid::Uuid::from_u128(1)), UserId(uuid::Uuid::from_u128(2)));
        for _ in 0..3 {
            pusher.mail(a, &target).await;
        }
        pusher.mail(b, &target).await;
        let sent = sink.0.lock().expect("lock").clone();
        assert_eq!(sent.len(), 2, "one per user within the window");
        let json = serde_json::to_value(&sent[0]).expect("serializes");
        assert_eq!(json, serde_json::json!({ "v": 1, "type": "mail", "platform": "fcm", "token": "device-token" }));
        assert!(!format!("{:?}", sent[0]).contains("device-token"));
    }

    #[tokio::test]
    async fn a_zero_window_pushes_every_time() {
        let sink = Arc::new(Collect::default());
        let pusher = Pusher::new(sink.clone(), Duration::ZERO);
        let target = PushTarget { platform: "apns".into(), token: "t".into() };
        let a = UserId(uuid::Uuid::from_u128(1));
        pusher.mail(a, &target).await;
        pusher.mail(a, &target).await;
        assert_eq!(sink.0.lock().expect("lock").len(), 2);
    }
}
