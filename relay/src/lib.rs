//! privcomm's WebSocket relay nodes.
//!
//! A relay authenticates a connection with a login token, drains the
//! recipient's backlog in log order, then pushes live messages; a client's
//! `send` is acknowledged (`sent`) only after `MessageAccepted` is committed,
//! and its `ack` appends `MessageDelivered`. Relays scale horizontally over
//! NATS: a message for a user connected elsewhere reaches that node through
//! JetStream, and a new connection displaces an older one on any node (close
//! code 4409). Architecture invariant: the relay never holds plaintext —
//! bodies are Signal ciphertext it cannot read.
//!
//! Parts so far: [`frames`], the versioned wire protocol and its strict
//! parser (docs/PROTOCOL.md); the mailbox rules live in
//! `privcomm_domain::mailbox`. The WebSocket endpoint, delivery and cluster
//! fan-out land with the rest of the "Relay cluster" issue.

pub mod frames;
