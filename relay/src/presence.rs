//! What crosses nodes: doorbells and presence.
//!
//! **Doorbells.** Every node follows the event bus; for each
//! `MessageAccepted` whose recipient is connected here, it wakes that
//! connection, which then reads its mailbox from the store. The bus only
//! rings: what is delivered always comes from the mailbox aggregate, so a
//! missed or repeated doorbell cannot lose or duplicate a message (ADR 0006).
//!
//! **Presence.** Nodes tell each other who is connected where ([`Signal`]):
//! a new connection (user, connection id) is announced, and a node holding
//! an older connection of that user closes it with 4409 — connection ids are
//! UUIDv7, so "older" is well defined. Ended connections are announced too,
//! and every node says it is alive every few seconds; a node not heard from
//! within the lease (a crashed one says nothing) is taken to hold no one.
//! A node that starts says hello, and the others re-announce their
//! connections to it. The resulting [`Roster`] answers "is this user online
//! anywhere?", which decides whether a message needs an offline push
//! (ADR 0007). Presence is advisory: it only decides who gets a push and
//! which connection closes; delivery never depends on it.

use crate::hub::Hub;
use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use privcomm_domain::events::DomainEvent;
use privcomm_domain::{EventBus, Position, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

/// What nodes tell each other about connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Signal {
    /// `user` connected to `node` as `connection`.
    Connected {
        /// The announcing node.
        node: Uuid,
        /// The user.
        user: UserId,
        /// The connection id (UUIDv7).
        connection: Uuid,
    },
    /// That connection ended.
    Disconnected {
        /// The announcing node.
        node: Uuid,
        /// The user.
        user: UserId,
        /// The connection id.
        connection: Uuid,
    },
    /// `node` is running (sent every [`PresenceTiming::alive_every`]).
    Alive {
        /// The node.
        node: Uuid,
    },
    /// `node` just started: everyone re-announce your connections.
    Hello {
        /// The node.
        node: Uuid,
    },
    /// `node` is shutting down and holds no one any more.
    Gone {
        /// The node.
        node: Uuid,
    },
}

impl Signal {
    /// The node the signal comes from.
    pub fn node(&self) -> Uuid {
        match *self {
            Signal::Connected { node, .. }
            | Signal::Disconnected { node, .. }
            | Signal::Alive { node }
            | Signal::Hello { node }
            | Signal::Gone { node } => node,
        }
    }
}

/// Presence signals shared by every relay node.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Tells every node (this one included).
    async fn publish(&self, signal: Signal);
    /// Every node's signals, from now on.
    async fn signals(&self) -> Result<BoxStream<'static, Signal>, String>;
}

/// How often nodes say they are alive, and how long silence is trusted.
#[derive(Clone, Copy, Debug)]
pub struct PresenceTiming {
    /// Interval of `alive` signals (5 s).
    pub alive_every: Duration,
    /// A node not heard from for this long holds no one (15 s).
    pub lease: Duration,
}

impl Default for PresenceTiming {
    fn default() -> Self {
        PresenceTiming { alive_every: Duration::from_secs(5), lease: Duration::from_secs(15) }
    }
}

#[derive(Default)]
struct RosterInner {
    users: HashMap<UserId, (Uuid, Uuid)>,
    nodes: HashMap<Uuid, Instant>,
}

/// Who is connected on the other nodes, as their signals tell it.
pub struct Roster {
    node: Uuid,
    lease: Duration,
    inner: Mutex<RosterInner>,
}

impl Roster {
    /// An empty roster for node `node`.
    pub fn new(node: Uuid, lease: Duration) -> Roster {
        Roster { node, lease, inner: Mutex::default() }
    }

    /// This node's id.
    pub fn node(&self) -> Uuid {
        self.node
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RosterInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Is `user` connected to another node that is still alive?
    pub fn online_elsewhere(&self, user: UserId) -> bool {
        let inner = self.lock();
        inner
            .users
            .get(&user)
            .is_some_and(|(_, node)| inner.nodes.get(node).is_some_and(|heard| heard.elapsed() < self.lease))
    }

    /// Takes in another node's signal (this node's own are ignored).
    pub fn apply(&self, signal: Signal) {
        let node = signal.node();
        if node == self.node {
            return;
        }
        let mut inner = self.lock();
        match signal {
            Signal::Connected { user, connection, .. } => {
                inner.nodes.insert(node, Instant::now());
                let newer = inner.users.get(&user).is_none_or(|(held, _)| *held < connection);
                if newer {
                    inner.users.insert(user, (connection, node));
                }
            }
            Signal::Disconnected { user, connection, .. } => {
                if inner.users.get(&user).is_some_and(|(held, _)| *held == connection) {
                    inner.users.remove(&user);
                }
            }
            Signal::Alive { .. } | Signal::Hello { .. } => {
                inner.nodes.insert(node, Instant::now());
            }
            Signal::Gone { .. } => {
                inner.nodes.remove(&node);
                inner.users.retain(|_, (_, held_by)| *held_by != node);
            }
        }
    }

    /// Forgets nodes whose lease ran out, and their users.
    pub fn prune(&self) {
        let mut inner = self.lock();
        let lease = self.lease;
        inner.nodes.retain(|_, heard| heard.elapsed() < lease);
        let RosterInner { users, nodes } = &mut *inner;
        users.retain(|_, (_, node)| nodes.contains_key(node));
    }

    /// Users known to be connected elsewhere.
    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    /// No one known elsewhere?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

/// Follows other nodes' signals until `stop`: keeps the roster, closes
/// local connections that a newer one elsewhere displaced, says this node is
/// alive, re-announces local connections to nodes that say hello, and says
/// gone when stopping.
pub async fn follow_presence(
    presence: Arc<dyn Presence>,
    hub: Arc<Hub>,
    roster: Arc<Roster>,
    timing: PresenceTiming,
    mut stop: watch::Receiver<bool>,
) {
    let node = roster.node();
    let mut alive = tokio::time::interval(timing.alive_every);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match presence.signals().await {
            Ok(mut signals) => {
                presence.publish(Signal::Hello { node }).await;
                loop {
                    tokio::select! {
                        () = stopped(&mut stop) => {
                            presence.publish(Signal::Gone { node }).await;
                            return;
                        }
                        _ = alive.tick() => {
                            presence.publish(Signal::Alive { node }).await;
                            roster.prune();
                        }
                        next = signals.next() => match next {
                            Some(signal) => {
                                if signal.node() == node {
                                    continue;
                                }
                                roster.apply(signal);
                                match signal {
                                    Signal::Connected { user, connection, .. } => hub.displace_older(user, connection),
                                    Signal::Hello { .. } => {
                                        for (user, connection) in hub.connections() {
                                            presence.publish(Signal::Connected { node, user, connection }).await;
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            None => break,
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot follow presence signals; retrying in 1 s"),
        }
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: u128) -> UserId {
        UserId(Uuid::from_u128(n))
    }

    #[test]
    fn signals_have_a_stable_json_form() {
        let signal = Signal::Connected { node: Uuid::from_u128(1), user: user(2), connection: Uuid::from_u128(3) };
        let text = serde_json::to_string(&signal).expect("serializes");
        assert!(text.starts_with(r#"{"type":"connected","node":"#), "{text}");
        assert_eq!(serde_json::from_str::<Signal>(&text).expect("parses"), signal);
        assert!(serde_json::from_str::<Signal>(r#"{"type":"alive"}"#).is_err());
    }

    #[test]
    fn a_user_is_online_elsewhere_while_the_newest_connection_lives_on_a_live_node() {
        let (me, a, b) = (Uuid::from_u128(100), Uuid::from_u128(101), Uuid::from_u128(102));
        let roster = Roster::new(me, Duration::from_secs(60));
        assert!(!roster.online_elsewhere(user(1)));
        roster.apply(Signal::Connected { node: a, user: user(1), connection: Uuid::from_u128(10) });
        assert!(roster.online_elsewhere(user(1)));
        // A newer connection on b, then the late end of the older one on a: still online.
        roster.apply(Signal::Connected { node: b, user: user(1), connection: Uuid::from_u128(11) });
        roster.apply(Signal::Disconnected { node: a, user: user(1), connection: Uuid::from_u128(10) });
        assert!(roster.online_elsewhere(user(1)));
        // An older announcement arriving late does not win.
        roster.apply(Signal::Connected { node: a, user: user(1), connection: Uuid::from_u128(9) });
        roster.apply(Signal::Disconnected { node: b, user: user(1), connection: Uuid::from_u128(11) });
        assert!(!roster.online_elsewhere(user(1)));
        // Our own signals are not "elsewhere".
        roster.apply(Signal::Connected { node: me, user: user(2), connection: Uuid::from_u128(12) });
        assert!(!roster.online_elsewhere(user(2)));
        // A node that says gone holds no one.
        roster.apply(Signal::Connected { node: b, user: user(3), connection: Uuid::from_u128(13) });
        roster.apply(Signal::Gone { node: b });
        assert!(!roster.online_elsewhere(user(3)));
    }

    #[test]
    fn a_silent_node_holds_no_one_after_its_lease() {
        let roster = Roster::new(Uuid::from_u128(100), Duration::ZERO);
        roster.apply(Signal::Connected { node: Uuid::from_u128(1), user: user(1), connection: Uuid::from_u128(10) });
        assert!(!roster.online_elsewhere(user(1)));
        roster.prune();
        assert!(roster.is_empty());
    }
}
