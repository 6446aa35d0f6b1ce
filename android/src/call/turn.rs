//! A TURN client (RFC 8656, over UDP) for one relay allocation, Sans-IO: it
//! shares the call's media socket (an allocation belongs to the socket that
//! asked for it), the owner hands it the datagrams that came from the TURN
//! server and sends the ones it returns.
//!
//! It allocates with the long-term credential the API issued (`GET
//! /v1/calls/turn`, ADR 0018): a first request without credentials draws a
//! 401 with the realm and a nonce, the second carries `MESSAGE-INTEGRITY`.
//! Every success response must carry a valid `MESSAGE-INTEGRITY` for our
//! key and match a request we sent, or it is ignored. It keeps the
//! allocation and the peers' permissions alive while the call lasts, sends
//! to peers in Send indications and unwraps Data indications.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;

const ALLOCATE: u16 = 0x003;
const REFRESH: u16 = 0x004;
const SEND: u16 = 0x006;
const DATA: u16 = 0x007;
const CREATE_PERMISSION: u16 = 0x008;

const REQUEST: u16 = 0x0000;
const INDICATION: u16 = 0x0010;
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;
const CLASS_MASK: u16 = 0x0110;

const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_DATA: u16 = 0x0013;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;

/// UDP, in `REQUESTED-TRANSPORT`.
const UDP: u8 = 17;
/// Requests are sent again after 500 ms, 1 s, 2 s… and given up after this many.
const ATTEMPTS: u32 = 6;
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Permissions last 300 s on the server; refreshed well before.
const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
/// Packets held per peer while its permission is on its way (more are dropped).
const HELD_PER_PEER: usize = 32;

/// A credential for the TURN servers, as `GET /v1/calls/turn` issues it.
#[derive(Clone, serde::Deserialize)]
pub struct TurnCredential {
    /// `turn:host:port?transport=udp` and the like.
    pub urls: Vec<String>,
    /// `<expiry>:<user id>`.
    pub username: String,
    /// The password that goes with it.
    pub credential: String,
    /// Seconds it stays valid.
    pub ttl: u64,
}

impl std::fmt::Debug for TurnCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnCredential").field("urls", &self.urls).field("ttl", &self.ttl).finish()
    }
}

impl TurnCredential {
    /// The first TURN server reachable over UDP (`turn:` URL without another
    /// transport), resolved; `None` if there is none.
    pub async fn udp_server(&self) -> Option<SocketAddr> {
        for url in &self.urls {
            let Some(rest) = url.strip_prefix("turn:") else { continue };
            let (address, query) = rest.split_once('?').unwrap_or((rest, ""));
            if query.split('&').any(|p| p.starts_with("transport=") && p != "transport=udp") {
                continue;
            }
            let with_port = match address.rsplit_once(':') {
                Some((_, port)) if port.parse::<u16>().is_ok() && !address.ends_with(']') => address.to_owned(),
                _ => format!("{address}:3478"),
            };
            match tokio::net::lookup_host(&with_port).await {
                Ok(mut found) => {
                    if let Some(server) = found.next() {
                        return Some(server);
                    }
                }
                Err(error) => tracing::info!(%url, %error, "a TURN server could not be resolved"),
            }
        }
        None
    }
}

/// Whether `datagram` looks like a STUN message (first two bits zero, the magic cookie).
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER
        && datagram[0] & 0xC0 == 0
        && u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]) == MAGIC_COOKIE
}

/// Where the allocation is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TurnState {
    /// Asking for it.
    Allocating,
    /// Granted: peers reach us at this relayed address.
    Allocated(SocketAddr),
    /// Refused or unanswered (why).
    Failed(String),
    /// Given back.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Allocate,
    Refresh,
    Permission(IpAddr),
}

/// A peer IP's permission.
#[derive(Default)]
struct Peer {
    /// When it is asked for again (`None`: not asked yet, waiting for the allocation).
    refresh_at: Option<Instant>,
    /// The server granted it.
    granted: bool,
    /// Send indications waiting for it: sent once granted, rather than
    /// dropped by the server (and ICE left to retry).
    held: Vec<Vec<u8>>,
}

struct Pending {
    purpose: Purpose,
    message: Vec<u8>,
    attempts: u32,
    retry_at: Instant,
}

/// One TURN allocation on one socket.
pub struct TurnClient {
    server: SocketAddr,
    username: String,
    password: String,
    /// Realm and nonce from the server's 401, and the key they give.
    realm: Option<Vec<u8>>,
    nonce: Option<Vec<u8>>,
    key: Option<[u8; 16]>,
    state: TurnState,
    pending: HashMap<[u8; 12], Pending>,
    /// The peers' IPs to let in, and where each one's permission is.
    peers: HashMap<IpAddr, Peer>,
    refresh_at: Option<Instant>,
    outgoing: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TurnClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password or the key.
        f.debug_struct("TurnClient").field("server", &self.server).field("state", &self.state).finish()
    }
}

impl TurnClient {
    /// Starts allocating a relay on `server` with a credential from the API.
    pub fn new(server: SocketAddr, username: &str, password: &str, now: Instant) -> TurnClient {
        let mut client = TurnClient {
            server,
            username: username.to_owned(),
            password: password.to_owned(),
            realm: None,
            nonce: None,
            key: None,
            state: TurnState::Allocating,
            pending: HashMap::new(),
            peers: HashMap::new(),
            refresh_at: None,
            outgoing: Vec::new(),
        };
        client.request(Purpose::Allocate, now);
        client
    }

    /// The TURN server's address (datagrams from it are for [`TurnClient::handle`]).
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// Where the allocation is.
    pub fn state(&self) -> &TurnState {
        &self.state
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            TurnState::Allocated(relayed) => Some(relayed),
            _ => None,
        }
    }

    /// The datagrams to send to the server now.
    pub fn take_outgoing(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.outgoing)
    }

    /// When [`TurnClient::handle_timeout`] is next due.
    pub fn next_timeout(&self) -> Option<Instant> {
        let retries = self.pending.values().map(|p| p.retry_at).min();
        let refreshes = self.peers.values().filter_map(|p| p.refresh_at).min();
        [retries, refreshes, self.refresh_at].into_iter().flatten().min()
    }

    /// Sends requests again, refreshes the allocation and permissions when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if !matches!(self.state, TurnState::Allocating | TurnState::Allocated(_)) {
            return;
        }
        let due: Vec<[u8; 12]> = self.pending.iter().filter(|(_, p)| p.retry_at <= now).map(|(id, _)| *id).collect();
        for id in due {
            let Some(pending) = self.pending.get_mut(&id) else { continue };
            if pending.attempts >= ATTEMPTS {
                let purpose = pending.purpose;
                self.pending.remove(&id);
                match purpose {
                    Purpose::Permission(ip) => {
                        // Unanswered: forgotten, and asked again when next needed.
                        self.peers.remove(&ip);
                    }
                    Purpose::Allocate | Purpose::Refresh => {
                        self.fail("the TURN server did not answer");
                        return;
                    }
                }
                continue;
            }
            pending.attempts += 1;
            pending.retry_at = now + FIRST_RETRY * 2u32.pow(pending.attempts - 1);
            self.outgoing.push(pending.message.clone());
        }
        if self.refresh_at.is_some_and(|at| at <= now) {
            self.refresh_at = None;
            self.request(Purpose::Refresh, now);
        }
        let stale: Vec<IpAddr> =
            self.peers.iter().filter(|(_, p)| p.refresh_at.is_some_and(|at| at <= now)).map(|(ip, _)| *ip).collect();
        for ip in stale {
            self.ask_permission(ip, now);
        }
    }

    /// Lets `peer`'s IP send to and receive from the relay: asked for now,
    /// or as soon as the relay is allocated.
    pub fn permit(&mut self, peer: IpAddr, now: Instant) {
        let asked = self.peers.entry(peer).or_default().refresh_at.is_some();
        if !asked && self.relayed().is_some() {
            self.ask_permission(peer, now);
        }
    }

    fn ask_permission(&mut self, peer: IpAddr, now: Instant) {
        self.peers.entry(peer).or_default().refresh_at = Some(now + PERMISSION_REFRESH);
        self.request(Purpose::Permission(peer), now);
    }

    /// Whether the server granted `peer`'s IP a permission.
    pub fn permitted(&self, peer: IpAddr) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.granted)
    }

    /// A Send indication carrying `data` to `peer` through the relay. Until
    /// the peer's permission is granted (asked for here if it was not) it is
    /// held and comes out of [`TurnClient::take_outgoing`] once granted.
    pub fn wrap(&mut self, peer: SocketAddr, data: &[u8], now: Instant) -> Option<Vec<u8>> {
        self.relayed()?;
        self.permit(peer.ip(), now);
        let mut message = Message::new(SEND | INDICATION, random_id());
        message.xor_address(ATTR_XOR_PEER_ADDRESS, peer);
        message.attribute(ATTR_DATA, data);
        let message = message.finish(None);
        let waiting = self.peers.entry(peer.ip()).or_default();
        if waiting.granted {
            return Some(message);
        }
        if waiting.held.len() < HELD_PER_PEER {
            waiting.held.push(message);
        }
        None
    }

    /// Gives the allocation back (a Refresh with lifetime 0, sent once).
    pub fn close(&mut self) {
        if self.relayed().is_some() {
            let mut message = Message::new(REFRESH | REQUEST, random_id());
            message.attribute(ATTR_LIFETIME, &0u32.to_be_bytes());
            let message = self.authenticated(message);
            self.outgoing.push(message);
        }
        self.state = TurnState::Closed;
        self.pending.clear();
        self.peers.clear();
        self.refresh_at = None;
    }

    /// Handles a datagram from the server; returns what a peer sent through
    /// the relay (a Data indication's peer and data), if that is what it was.
    pub fn handle(&mut self, datagram: &[u8], now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let message = Parsed::parse(datagram)?;
        match message.kind & CLASS_MASK {
            INDICATION if message.kind & !CLASS_MASK == DATA => {
                let peer = message.xor_address(ATTR_XOR_PEER_ADDRESS)?;
                let data = message.attribute(ATTR_DATA)?;
                Some((peer, data.to_vec()))
            }
            SUCCESS | ERROR => {
                self.on_response(&message, datagram, now);
                None
            }
            _ => None,
        }
    }

    fn on_response(&mut self, message: &Parsed<'_>, datagram: &[u8], now: Instant) {
        let Some(pending) = self.pending.get(&message.id) else { return };
        let purpose = pending.purpose;
        if message.kind & CLASS_MASK == SUCCESS {
            // A success must carry our key's integrity, or anyone who saw the
            // request could hand us a relay of their choosing.
            if !self.key.is_some_and(|key| message.integrity_holds(datagram, &key)) {
                tracing::debug!(?purpose, "ignored a TURN success without valid integrity");
                return;
            }
            self.pending.remove(&message.id);
            match purpose {
                Purpose::Allocate => match message.xor_address(ATTR_XOR_RELAYED_ADDRESS) {
                    Some(relayed) => {
                        self.state = TurnState::Allocated(relayed);
                        self.refresh_at = Some(now + lifetime(message) / 2);
                        // The peer's relay most likely lives on the same TURN
                        // server: let it in now, before its candidate arrives,
                        // so its first checks are not dropped; and the peers
                        // known before the allocation.
                        self.permit(self.server.ip(), now);
                        self.permit(relayed.ip(), now);
                        let waiting: Vec<IpAddr> =
                            self.peers.iter().filter(|(_, p)| p.refresh_at.is_none()).map(|(ip, _)| *ip).collect();
                        for ip in waiting {
                            self.ask_permission(ip, now);
                        }
                    }
                    None => self.fail("the TURN server granted no relayed address"),
                },
                Purpose::Refresh => self.refresh_at = Some(now + lifetime(message) / 2),
                Purpose::Permission(ip) => {
                    let peer = self.peers.entry(ip).or_default();
                    peer.granted = true;
                    peer.refresh_at.get_or_insert(now + PERMISSION_REFRESH);
                    self.outgoing.append(&mut peer.held);
                }
            }
            return;
        }
        self.pending.remove(&message.id);
        let code = message.attribute(ATTR_ERROR_CODE).and_then(error_code).unwrap_or(0);
        let challenge = (message.attribute(ATTR_REALM), message.attribute(ATTR_NONCE));
        match (code, challenge) {
            // The first request draws the realm and a nonce; a stale nonce a new one.
            (401, (Some(realm), Some(nonce))) if self.key.is_none() => {
                self.key = Some(long_term_key(&self.username, realm, &self.password));
                self.realm = Some(realm.to_vec());
                self.nonce = Some(nonce.to_vec());
                self.request(purpose, now);
            }
            (438, (realm, Some(nonce))) if self.key.is_some() => {
                if let Some(realm) = realm {
                    self.realm = Some(realm.to_vec());
                }
                self.nonce = Some(nonce.to_vec());
                self.request(purpose, now);
            }
            (code, _) => match purpose {
                Purpose::Permission(ip) => {
                    // Asked again when it is due for refreshing; what waited for it is dropped.
                    if let Some(peer) = self.peers.get_mut(&ip) {
                        peer.held.clear();
                    }
                    tracing::info!(%ip, code, "the TURN server refused a permission");
                }
                Purpose::Allocate | Purpose::Refresh if code == 401 => {
                    self.fail("the TURN server refused the credential (401)")
                }
                Purpose::Allocate | Purpose::Refresh => self.fail(&format!("the TURN server refused: error {code}")),
            },
        }
    }

    fn fail(&mut self, why: &str) {
        tracing::info!(server = %self.server, why, "TURN allocation failed");
        self.state = TurnState::Failed(why.to_owned());
        self.pending.clear();
        self.peers.clear();
        self.refresh_at = None;
    }

    /// Sends a new request for `purpose` (authenticated once a key is known).
    fn request(&mut self, purpose: Purpose, now: Instant) {
        let id = random_id();
        let message = match purpose {
            Purpose::Allocate => {
                let mut message = Message::new(ALLOCATE | REQUEST, id);
                message.attribute(ATTR_REQUESTED_TRANSPORT, &[UDP, 0, 0, 0]);
                message
            }
            Purpose::Refresh => Message::new(REFRESH | REQUEST, id),
            Purpose::Permission(ip) => {
                let mut message = Message::new(CREATE_PERMISSION | REQUEST, id);
                message.xor_address(ATTR_XOR_PEER_ADDRESS, SocketAddr::new(ip, 0));
                message
            }
        };
        let message = if self.key.is_some() { self.authenticated(message) } else { message.finish(None) };
        self.outgoing.push(message.clone());
        self.pending.insert(id, Pending { purpose, message, attempts: 1, retry_at: now + FIRST_RETRY });
    }

    fn authenticated(&self, mut message: Message) -> Vec<u8> {
        message.attribute(ATTR_USERNAME, self.username.as_bytes());
        if let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
            message.attribute(ATTR_REALM, realm);
            message.attribute(ATTR_NONCE, nonce);
        }
        message.finish(self.key.as_ref())
    }
}

/// The key of the long-term credential mechanism: MD5(username:realm:password).
fn long_term_key(username: &str, realm: &[u8], password: &str) -> [u8; 16] {
    use md5::Digest as _;
    let mut md5 = md5::Md5::new();
    md5.update(username.as_bytes());
    md5.update(b":");
    md5.update(realm);
    md5.update(b":");
    md5.update(password.as_bytes());
    md5.finalize().into()
}

fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn random_id() -> [u8; 12] {
    rand::random()
}

fn error_code(value: &[u8]) -> Option<u16> {
    (value.len() >= 4).then(|| u16::from(value[2] & 0x07) * 100 + u16::from(value[3]))
}

/// The granted lifetime (600 s if the server did not say).
fn lifetime(message: &Parsed<'_>) -> Duration {
    let seconds =
        message.attribute(ATTR_LIFETIME).and_then(|v| v.try_into().ok()).map(u32::from_be_bytes).unwrap_or(600);
    Duration::from_secs(u64::from(seconds.max(60)))
}

/// A STUN message being written.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(kind: u16, id: [u8; 12]) -> Message {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        bytes.extend_from_slice(&id);
        Message { bytes }
    }

    fn attribute(&mut self, kind: u16, value: &[u8]) {
        self.bytes.extend_from_slice(&kind.to_be_bytes());
        self.bytes.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
        self.set_length(self.bytes.len() - HEADER);
    }

    fn xor_address(&mut self, kind: u16, address: SocketAddr) {
        let id: [u8; 12] = self.bytes[8..HEADER].try_into().expect("a header is 20 bytes");
        self.attribute(kind, &xor(address, &id));
    }

    fn set_length(&mut self, length: usize) {
        self.bytes[2..4].copy_from_slice(&(length as u16).to_be_bytes());
    }

    /// The message, with `MESSAGE-INTEGRITY` under `key` if given.
    fn finish(mut self, key: Option<&[u8; 16]>) -> Vec<u8> {
        if let Some(key) = key {
            // The length covers the integrity attribute while it is computed.
            self.set_length(self.bytes.len() - HEADER + 24);
            let mac = hmac_sha1(key, &[&self.bytes]);
            self.attribute(ATTR_MESSAGE_INTEGRITY, &mac);
        }
        self.bytes
    }
}

/// An address XORed with the magic cookie (and the transaction id, for IPv6).
fn xor(address: SocketAddr, id: &[u8; 12]) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = address.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut value = vec![0];
    match address.ip() {
        IpAddr::V4(ip) => {
            value.push(1);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(cookie).map(|(a, b)| a ^ b));
        }
        IpAddr::V6(ip) => {
            value.push(2);
            value.extend_from_slice(&port.to_be_bytes());
            let mask = cookie.iter().chain(id.iter());
            value.extend(ip.octets().iter().zip(mask).map(|(a, b)| a ^ b));
        }
    }
    value
}

fn unxor(value: &[u8], id: &[u8; 12]) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    let ip: IpAddr = match value.get(1)? {
        1 => {
            let octets: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            let octets: Vec<u8> = octets.iter().zip(cookie).map(|(a, b)| a ^ b).collect();
            <[u8; 4]>::try_from(octets).ok()?.into()
        }
        2 => {
            let mask = cookie.iter().chain(id.iter());
            let octets: Vec<u8> = value.get(4..20)?.iter().zip(mask).map(|(a, b)| a ^ b).collect();
            <[u8; 16]>::try_from(octets).ok()?.into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A received STUN message: its attributes as slices of the datagram.
struct Parsed<'a> {
    kind: u16,
    id: [u8; 12],
    attributes: Vec<(u16, usize, &'a [u8])>,
}

impl<'a> Parsed<'a> {
    fn parse(datagram: &'a [u8]) -> Option<Parsed<'a>> {
        if !is_stun(datagram) {
            return None;
        }
        let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
        let body = datagram.get(HEADER..HEADER + length)?;
        let mut attributes = Vec::new();
        let mut at = 0;
        while at + 4 <= body.len() {
            let kind = u16::from_be_bytes([body[at], body[at + 1]]);
            let size = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
            let value = body.get(at + 4..at + 4 + size)?;
            attributes.push((kind, HEADER + at, value));
            at += (4 + size).next_multiple_of(4);
        }
        Some(Parsed {
            kind: u16::from_be_bytes([datagram[0], datagram[1]]),
            id: datagram[8..HEADER].try_into().ok()?,
            attributes,
        })
    }

    fn attribute(&self, kind: u16) -> Option<&'a [u8]> {
        self.attributes.iter().find(|(k, _, _)| *k == kind).map(|(_, _, v)| *v)
    }

    fn xor_address(&self, kind: u16) -> Option<SocketAddr> {
        unxor(self.attribute(kind)?, &self.id)
    }

    /// Whether its `MESSAGE-INTEGRITY` is the HMAC of what precedes it under `key`.
    fn integrity_holds(&self, datagram: &[u8], key: &[u8; 16]) -> bool {
        let Some(&(_, offset, mac)) = self.attributes.iter().find(|(k, _, _)| *k == ATTR_MESSAGE_INTEGRITY) else {
            return false;
        };
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&datagram[..HEADER]);
        header[2..4].copy_from_slice(&((offset - HEADER + 24) as u16).to_be_bytes());
        let expected = hmac_sha1(key, &[&header, &datagram[HEADER..offset]]);
        // Not secret-dependent timing that matters here, but compare fully anyway.
        mac.len() == 20 && mac.iter().zip(expected).fold(0, |d, (a, b)| d | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_survive_xor_both_ways_for_ipv4_and_ipv6() {
        let id = random_id();
        for address in ["192.0.2.7:3478", "[2001:db8::1]:49152"] {
            let address: SocketAddr = address.parse().expect("an address");
            assert_eq!(unxor(&xor(address, &id), &id), Some(address));
        }
        // RFC 5769 2.2: 192.0.2.1:32853 is encoded as 0x0001 0xA147 0xE112A643.
        let encoded = xor("192.0.2.1:32853".parse().expect("an address"), &id);
        assert_eq!(encoded, [0x00, 0x01, 0xA1, 0x47, 0xE1, 0x12, 0xA6, 0x43]);
    }

    #[test]
    fn integrity_is_checked_and_a_changed_byte_breaks_it() {
        let key = long_term_key("user", b"realm", "pass");
        let mut message = Message::new(ALLOCATE | SUCCESS, random_id());
        message.xor_address(ATTR_XOR_RELAYED_ADDRESS, "192.0.2.9:50000".parse().expect("an address"));
        let bytes = message.finish(Some(&key));
        let parsed = Parsed::parse(&bytes).expect("parses");
        assert!(parsed.integrity_holds(&bytes, &key));
        assert!(!parsed.integrity_holds(&bytes, &long_term_key("user", b"realm", "other")));
        let mut changed = bytes.clone();
        changed[30] ^= 1;
        let parsed = Parsed::parse(&changed).expect("parses");
        assert!(!parsed.integrity_holds(&changed, &key));
    }

    /// The peer IPs of the CreatePermission requests among `datagrams`.
    fn permissions_asked(datagrams: &[Vec<u8>]) -> Vec<IpAddr> {
        let asked = datagrams.iter().filter_map(|d| Parsed::parse(d));
        asked
            .filter(|m| m.kind == CREATE_PERMISSION | REQUEST)
            .filter_map(|m| m.xor_address(ATTR_XOR_PEER_ADDRESS))
            .map(|a| a.ip())
            .collect()
    }

    #[test]
    fn peers_let_in_before_the_allocation_are_asked_for_once_it_is_granted() {
        let now = Instant::now();
        let (server, relayed, peer): (SocketAddr, SocketAddr, IpAddr) = (
            "192.0.2.1:3478".parse().expect("an address"),
            "192.0.2.2:50000".parse().expect("an address"),
            "198.51.100.7".parse().expect("an address"),
        );
        let mut turn = TurnClient::new(server, "user", "pass", now);
        turn.permit(peer, now);
        let first = turn.take_outgoing();
        assert!(permissions_asked(&first).is_empty(), "nothing to permit on before the allocation");
        // The server's challenge, then its grant under the key.
        let request = Parsed::parse(&first[0]).expect("parses");
        let mut challenge = Message::new(ALLOCATE | ERROR, request.id);
        challenge.attribute(ATTR_ERROR_CODE, &[0, 0, 4, 1]);
        challenge.attribute(ATTR_REALM, b"realm");
        challenge.attribute(ATTR_NONCE, b"nonce");
        turn.handle(&challenge.finish(None), now);
        let second = turn.take_outgoing();
        let request = Parsed::parse(&second[0]).expect("parses");
        let mut grant = Message::new(ALLOCATE | SUCCESS, request.id);
        grant.xor_address(ATTR_XOR_RELAYED_ADDRESS, relayed);
        turn.handle(&grant.finish(Some(&long_term_key("user", b"realm", "pass"))), now);
        assert_eq!(turn.relayed(), Some(relayed));
        let mut asked = permissions_asked(&turn.take_outgoing());
        asked.sort();
        assert_eq!(asked, [server.ip(), relayed.ip(), peer], "the TURN server's own addresses and the peer");
        assert!(!turn.permitted(peer), "asked for, not yet granted");
    }

    #[test]
    fn a_forged_success_is_ignored_and_silence_fails_the_allocation() {
        let now = Instant::now();
        let server: SocketAddr = "192.0.2.1:3478".parse().expect("an address");
        let mut turn = TurnClient::new(server, "1700000000:someone", "s3cret-credential", now);
        let first = turn.take_outgoing();
        assert_eq!(first.len(), 1);
        let request = Parsed::parse(&first[0]).expect("parses");
        // Someone who saw the request answers it without the key.
        let mut forged = Message::new(ALLOCATE | SUCCESS, request.id);
        forged.xor_address(ATTR_XOR_RELAYED_ADDRESS, "198.51.100.1:4000".parse().expect("an address"));
        turn.handle(&forged.finish(None), now);
        assert_eq!(turn.state(), &TurnState::Allocating);
        // Nobody answers: sent again with backoff, then given up.
        let mut at = now;
        for _ in 0..ATTEMPTS {
            at = turn.next_timeout().expect("a retry is due");
            turn.handle_timeout(at);
        }
        assert!(matches!(turn.state(), TurnState::Failed(_)), "{:?}", turn.state());
        assert!(at - now >= Duration::from_secs(15), "gave up after {:?}", at - now);
        assert_eq!(turn.take_outgoing().len(), usize::try_from(ATTEMPTS - 1).expect("small"));
        assert!(!format!("{turn:?}").contains("s3cret"), "the credential is not in Debug");
    }
}
