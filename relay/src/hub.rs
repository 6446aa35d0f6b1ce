//! Who is connected to this node: one live connection per user. A new
//! connection displaces the old one, which is told to close with 4409; so
//! does an announcement of a newer connection on another node.
//! Connections are woken when their mailbox may have something new.

use privcomm_domain::UserId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, oneshot};
use uuid::Uuid;

struct Registration {
    id: Uuid,
    wake: Arc<Notify>,
    displace: Option<oneshot::Sender<()>>,
}

/// The connections of this node.
#[derive(Default)]
pub struct Hub {
    connections: Mutex<HashMap<UserId, Registration>>,
}

/// A connection's side of its registration.
pub struct Connected {
    /// This connection's id (UUIDv7: later connections sort after earlier ones).
    pub id: Uuid,
    /// Notified when the mailbox may have new messages.
    pub wake: Arc<Notify>,
    /// Resolves when a newer connection of the same user displaces this one.
    pub displaced: oneshot::Receiver<()>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Registration>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection for `user`, displacing any older one here.
    pub fn connect(&self, user: UserId) -> Connected {
        let id = Uuid::now_v7();
        let wake = Arc::new(Notify::new());
        let (displace, displaced) = oneshot::channel();
        let old = self.lock().insert(user, Registration { id, wake: wake.clone(), displace: Some(displace) });
        if let Some(mut old) = old
            && let Some(displace) = old.displace.take()
        {
            let _ = displace.send(());
        }
        Connected { id, wake, displaced }
    }

    /// `user` connected as `newer` somewhere: close the connection here if it is older.
    pub fn displace_older(&self, user: UserId, newer: Uuid) {
        let mut connections = self.lock();
        if let Some(registration) = connections.get_mut(&user)
            && registration.id < newer
            && let Some(displace) = registration.displace.take()
        {
            let _ = displace.send(());
        }
    }

    /// Removes `user`'s registration if it is still connection `id`.
    pub fn disconnect(&self, user: UserId, id: Uuid) {
        let mut connections = self.lock();
        if connections.get(&user).is_some_and(|r| r.id == id) {
            connections.remove(&user);
        }
    }

    /// Wakes `user`'s connection, if it is on this node.
    pub fn wake(&self, user: UserId) {
        if let Some(registration) = self.lock().get(&user) {
            registration.wake.notify_one();
        }
    }

    /// Wakes every connection here (after doorbells may have been missed).
    pub fn wake_all(&self) {
        for registration in self.lock().values() {
            registration.wake.notify_one();
        }
    }

    /// Is `user` connected here?
    pub fn contains(&self, user: UserId) -> bool {
        self.lock().contains_key(&user)
    }

    /// Every connection here, as (user, connection id).
    pub fn connections(&self) -> Vec<(UserId, Uuid)> {
        self.lock().iter().map(|(user, r)| (*user, r.id)).collect()
    }

    /// How many users are connected here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No one connected here?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
