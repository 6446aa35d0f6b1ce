//! What crosses nodes: doorbells and presence.
//!
//! **Doorbells.** Every node follows the event bus; for each
//! `MessageAccepted` whose recipient is connected here, it wakes that
//! connection, which then reads its mailbox from the store. The bus only
//! rings: what is delivered always comes from the mailbox aggregate, so a
//! missed or repeated doorbell cannot lose or duplicate a message (ADR 0006).
//!
//! **Presence.** A node announces each new connection (user, connection id)
//! to every node; a node holding an older connection of that user closes it
//! with 4409. Connection ids are UUIDv7, so "older" is well defined.

use crate::hub::Hub;
use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use privcomm_domain::events::DomainEvent;
use privcomm_domain::{EventBus, Position, UserId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Connection announcements shared by every relay node.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Tells every node that `user` connected as `connection`.
    async fn announce(&self, user: UserId, connection: Uuid);
    /// Every node's announcements, from now on.
    async fn announcements(&self) -> Result<BoxStream<'static, (UserId, Uuid)>, String>;
}

/// Resolves once the flag is true (never, if its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        let now = *stop.borrow_and_update();
        if now {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Wakes local recipients of every message accepted anywhere, until `stop`.
pub async fn ring_doorbells(bus: Arc<dyn EventBus>, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    let mut after: Option<Position> = None;
    loop {
        let from = match after {
            Some(position) => Ok(position),
            None => bus.last_published().await,
        };
        let subscription = match from {
            Ok(from) => {
                after = Some(from);
                bus.subscribe(from).await
            }
            Err(error) => Err(error),
        };
        match subscription {
            Ok(mut events) => loop {
                tokio::select! {
                    () = stopped(&mut stop) => return,
                    next = events.next() => match next {
                        Some(Ok(event)) => {
                            after = Some(event.position);
                            if event.event_type == "MessageAccepted"
                                && let Ok(DomainEvent::MessageAccepted { recipient, .. }) = DomainEvent::from_recorded(&event) {
                                    hub.wake(recipient);
                                }
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, "doorbell subscription failed; resubscribing");
                            break;
                        }
                        None => break,
                    }
                }
            },
            Err(error) => tracing::warn!(%error, "cannot follow the event bus; retrying in 1 s"),
        }
        // A resubscription may have missed doorbells: wake everyone here once.
        hub.wake_all();
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Closes local connections that a newer one elsewhere displaced, until `stop`.
pub async fn follow_presence(presence: Arc<dyn Presence>, hub: Arc<Hub>, mut stop: watch::Receiver<bool>) {
    loop {
        match presence.announcements().await {
            Ok(mut announcements) => loop {
                tokio::select! {
                    () = stopped(&mut stop) => return,
                    next = announcements.next() => match next {
                        Some((user, connection)) => hub.displace_older(user, connection),
                        None => break,
                    }
                }
            },
            Err(error) => tracing::warn!(%error, "cannot follow connection announcements; retrying in 1 s"),
        }
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
