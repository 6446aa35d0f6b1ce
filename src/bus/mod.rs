//! Event-bus adapters: in-process (embedded mode) and NATS JetStream
//! (cluster mode). Both implement `privcomm_domain::EventBus` with the same
//! rule: the bus holds the log's events in position order, each once.

pub mod inprocess;
pub mod nats;
