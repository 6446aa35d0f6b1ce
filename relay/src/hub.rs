//! Who is connected to this node: one live connection per user. A new
//! connection displaces the old one, which is told to close with 4409.
//! Connections are woken when their mailbox may have something new.

use privcomm_domain::UserId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, oneshot};

struct Registration {
    id: u64,
    wake: Arc<Notify>,
    displace: oneshot::Sender<()>,
}

/// The connections of this node.
#[derive(Default)]
pub struct Hub {
    connections: Mutex<HashMap<UserId, Registration>>,
    next_id: AtomicU64,
}

/// A connection's side of its registration.
pub struct Connected {
    /// Identifies this connection among the user's successive ones.
    pub id: u64,
    /// Notified when the mailbox may have new messages.
    pub wake: Arc<Notify>,
    /// Resolves when a newer connection of the same user displaces this one.
    pub displaced: oneshot::Receiver<()>,
}

impl Hub {
    /// Registers a connection for `user`, displacing any older one.
    pub fn connect(&self, user: UserId) -> Connected {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        let (displace, displaced) = oneshot::channel();
        let old = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user, Registration { id, wake: wake.clone(), displace });
        if let Some(old) = old {
            let _ = old.displace.send(());
        }
        Connected { id, wake, displaced }
    }

    /// Removes `user`'s registration if it is still connection `id`.
    pub fn disconnect(&self, user: UserId, id: u64) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if connections.get(&user).is_some_and(|r| r.id == id) {
            connections.remove(&user);
        }
    }

    /// Wakes `user`'s connection, if it is on this node.
    pub fn wake(&self, user: UserId) {
        if let Some(registration) = self.connections.lock().unwrap_or_else(|p| p.into_inner()).get(&user) {
            registration.wake.notify_one();
        }
    }

    /// How many users are connected here.
    pub fn len(&self) -> usize {
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// No one connected here?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
