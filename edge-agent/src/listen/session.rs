//! One device connection of listen mode, and the sessions kept for disconnected devices.
//! Pure: no sockets, no clock (time comes in as `now_ms`), no codec (the shell turns
//! rumqttc's packets into these calls and [`Out`] back into packets).
//!
//! Invariants:
//! - A QoS 1/2 PUBLISH goes to the writer once per packet id in flight; its PUBACK / PUBREC
//!   leaves only when the writer says the record is durable ([`ConnSession::handle_durable`]),
//!   in the order the writer releases them (receive order).
//! - QoS 2 is exactly-once per packet id within a session: from the PUBREC until the PUBREL,
//!   a PUBLISH with that packet id is answered with PUBREC again and never taken; the held
//!   packet ids move with the session to the next connection of the same client id.
//! - At most `inflight_max` QoS 1/2 PUBLISHes wait for their ack: MQTT 5 devices are told it
//!   (receive maximum) and one above it closes the connection (0x93); for 3.1.1 the shell stops
//!   reading the socket while [`ConnSession::reading_paused`].
//! - Every refusal carries its MQTT 5 reason code ([`Reason`]); the shell maps it to 3.1.1's
//!   few return codes, or closes the connection where 3.1.1 has none.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use crate::ingest::session::Outcome;
use crate::route::Router;

/// MQTT protocol version of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// 3.1.1 (protocol level 4).
    V311,
    /// 5.
    V5,
}

/// MQTT 5 reason codes the agent sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// 0x00
    Success = 0x00,
    /// 0x10: accepted, but no route takes the topic (counted, not stored); not an error.
    NoMatchingSubscribers = 0x10,
    /// 0x81
    MalformedPacket = 0x81,
    /// 0x82
    ProtocolError = 0x82,
    /// 0x83: valid, but this agent does not do it (e.g. a record above `record_bytes_max`).
    ImplementationSpecificError = 0x83,
    /// 0x84
    UnsupportedProtocolVersion = 0x84,
    /// 0x85
    ClientIdentifierNotValid = 0x85,
    /// 0x86
    BadUserNameOrPassword = 0x86,
    /// 0x87: no credentials where they are required; a topic outside the user's filters;
    /// any SUBSCRIBE (the agent ingests, it is not a broker).
    NotAuthorized = 0x87,
    /// 0x8B
    ServerShuttingDown = 0x8B,
    /// 0x8D
    KeepAliveTimeout = 0x8D,
    /// 0x8E
    SessionTakenOver = 0x8E,
    /// 0x90
    TopicNameInvalid = 0x90,
    /// 0x92: a PUBREL for a packet id not held.
    PacketIdentifierNotFound = 0x92,
    /// 0x93
    ReceiveMaximumExceeded = 0x93,
    /// 0x94: topic aliases are not offered (topic alias maximum 0).
    TopicAliasInvalid = 0x94,
    /// 0x95
    PacketTooLarge = 0x95,
    /// 0x97: `connections_max` reached; a stream full under `backpressure`.
    QuotaExceeded = 0x97,
    /// 0x99: the payload is not what its stream's format says.
    PayloadFormatInvalid = 0x99,
}

impl Reason {
    /// The reason code byte.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The listener's limits and policy, from `[listen]`.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Receive maximum per connection.
    pub inflight_max: u16,
    /// Longest keep-alive granted, s.
    pub keep_alive_max_s: u16,
    /// Longest session expiry, s.
    pub session_expiry_max_s: u32,
    /// Whether a device may connect without credentials.
    pub allow_anonymous: bool,
}

/// How the device proved who it is (the shell checked it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// Nothing.
    None,
    /// A user name and password; `ok` says whether they matched.
    Password {
        /// The user.
        user: String,
        /// Whether the password matched its hash.
        ok: bool,
    },
    /// A client certificate the TLS handshake verified against `client_ca_file`.
    Certificate,
}

/// What a CONNECT asked for.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// Protocol version.
    pub version: Version,
    /// Client id; empty asks the agent to assign one.
    pub client_id: String,
    /// Clean start (3.1.1: clean session).
    pub clean_start: bool,
    /// Keep-alive asked for, s (0: none).
    pub keep_alive_s: u16,
    /// MQTT 5 session expiry interval, s (absent: 0).
    pub session_expiry_s: Option<u32>,
    /// The Will, if the CONNECT carries one.
    pub will: Option<Will>,
}

/// A CONNECT's Will message. The agent is not a broker: when the connection ends without a
/// DISCONNECT (MQTT 3.1.1 3.1.2.5, 5 3.1.3.2), the Will is stored as a PUBLISH of the device
/// would be, routed by its topic, so a device's going away reaches the core as a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// MQTT 5 Will Delay Interval, s (3.1.1: 0): stored only if the device has not
    /// reconnected by then (nor its session ended first).
    pub delay_s: u32,
}

/// Whether the device ends its connection so that its Will is due (MQTT 5 3.1.2.5): not after
/// a DISCONNECT (unless with reason 0x04), nor when the agent shuts down; when a new connection
/// takes the session over, only a Will without delay (the session goes on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// DISCONNECT; `with_will`: MQTT 5 reason 0x04 "disconnect with Will Message".
    Disconnect {
        /// Reason 0x04.
        with_will: bool,
    },
    /// A new connection with the same client id took the session over.
    TakenOver,
    /// The agent is shutting down.
    Shutdown,
    /// Anything else: closed without DISCONNECT, I/O error, keep-alive timeout, protocol error.
    Failed,
}

/// The Will to store, and after how long, once a connection ended as `ending`.
pub fn will_due(will: Option<Will>, ending: Ending, session_expiry_s: u32) -> Option<Will> {
    let will = will?;
    let due = match ending {
        Ending::Disconnect { with_will } => with_will,
        Ending::TakenOver => will.delay_s == 0,
        Ending::Shutdown => false,
        Ending::Failed => true,
    };
    // The delay ends with the session at the latest (MQTT 5 3.1.3.2.2).
    due.then(|| Will { delay_s: will.delay_s.min(session_expiry_s), ..will })
}

/// The user's publish filters as a router; `None`: any topic.
fn publish_acl(publish_filters: Option<&[String]>) -> Option<Router> {
    publish_filters.map(|f| {
        let rules: Vec<(String, usize)> = f.iter().map(|f| (f.clone(), 0)).collect();
        Router::new(&rules, None)
    })
}

/// Whether `topic` names a topic a PUBLISH may go to (no wildcards, not empty).
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// An accepted CONNECT: what the CONNACK says and how the connection runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The client id in force (assigned when the device sent none).
    pub client_id: String,
    /// Whether the id was assigned (MQTT 5 tells it in the CONNACK).
    pub assigned: bool,
    /// Whether a stored session was resumed.
    pub session_present: bool,
    /// Keep-alive in force, s; differs from the request when capped.
    pub keep_alive_s: u16,
    /// Session expiry in force, s (3.1.1 without clean session: `session_expiry_max`).
    pub session_expiry_s: u32,
}

/// Decides a CONNECT. `stored`: a session kept for this client id (from an earlier
/// connection, or known from the log after a restart). `nonce` names an assigned client id.
/// `publish_filters`: the user's (`None`: any topic); a Will must go to one of them.
pub fn handle_connect(
    req: &ConnectRequest,
    cred: &Credential,
    limits: &Limits,
    connections_full: bool,
    stored: bool,
    nonce: u64,
    publish_filters: Option<&[String]>,
) -> Result<Accepted, Reason> {
    match cred {
        Credential::Password { ok: false, .. } => return Err(Reason::BadUserNameOrPassword),
        Credential::None if !limits.allow_anonymous => return Err(Reason::NotAuthorized),
        _ => {}
    }
    if connections_full {
        return Err(Reason::QuotaExceeded);
    }
    let (client_id, assigned) = if req.client_id.is_empty() {
        // 3.1.1 assigns an id only to a clean session: nobody could resume it.
        if req.version == Version::V311 && !req.clean_start {
            return Err(Reason::ClientIdentifierNotValid);
        }
        (format!("auto-{nonce:016x}"), true)
    } else {
        (req.client_id.clone(), false)
    };
    if client_id.len() > 256 || client_id.chars().any(char::is_control) {
        return Err(Reason::ClientIdentifierNotValid);
    }
    if let Some(will) = &req.will {
        if !valid_topic(&will.topic) {
            return Err(Reason::TopicNameInvalid);
        }
        if publish_acl(publish_filters).is_some_and(|acl| acl.route(&will.topic).is_none()) {
            return Err(Reason::NotAuthorized);
        }
    }
    let keep_alive_s = match req.keep_alive_s {
        0 => limits.keep_alive_max_s,
        k => k.min(limits.keep_alive_max_s),
    };
    let session_expiry_s = match req.version {
        Version::V5 => req.session_expiry_s.unwrap_or(0).min(limits.session_expiry_max_s),
        Version::V311 if req.clean_start => 0,
        Version::V311 => limits.session_expiry_max_s,
    };
    Ok(Accepted { client_id, assigned, session_present: stored && !req.clean_start, keep_alive_s, session_expiry_s })
}

/// A packet the shell is to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// PUBACK with a reason (3.1.1: the reason is not sent).
    PubAck(u16, Reason),
    /// PUBREC with a reason.
    PubRec(u16, Reason),
    /// PUBCOMP with a reason.
    PubComp(u16, Reason),
    /// SUBACK: each of the packet's filters (the count) refused with the reason.
    SubAck(u16, Reason, usize),
    /// UNSUBACK for that many filters (there is never a subscription to remove).
    UnsubAck(u16, usize),
    /// PINGRESP.
    PingResp,
}

/// What to do with a PUBLISH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishAction {
    /// Give it to the writer; `dup` marks a possible redelivery (the writer matches it by
    /// packet id and content).
    Take {
        /// DUP as the writer is to see it.
        dup: bool,
    },
    /// Nothing to do: the ack of this packet id is already on its way.
    Ignore,
    /// Answer at once (a refusal, or a QoS 2 packet id already held).
    Answer(Out),
    /// Close the connection; MQTT 5 gets a DISCONNECT with the reason first.
    Close(Reason),
}

/// What a disconnected device leaves behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// QoS 2 packet ids PUBREC'd and not yet released.
    pub qos2_held: BTreeSet<u16>,
}

/// One connection after its CONNECT was accepted. See the module doc.
#[derive(Debug)]
pub struct ConnSession {
    version: Version,
    inflight_max: u16,
    /// Packet id → QoS of the PUBLISHes given to the writer and not yet acknowledged.
    inflight: HashMap<u16, u8>,
    qos2_held: BTreeSet<u16>,
    publish_acl: Option<Router>,
}

impl ConnSession {
    /// A connection of `version` resuming `stored` (empty on a clean start), publishing only
    /// to `publish_filters` when given (checked filters).
    pub fn new(version: Version, inflight_max: u16, stored: Stored, publish_filters: Option<&[String]>) -> Self {
        let publish_acl = publish_acl(publish_filters);
        ConnSession { version, inflight_max, inflight: HashMap::new(), qos2_held: stored.qos2_held, publish_acl }
    }

    /// A PUBLISH came in.
    pub fn handle_publish(&mut self, qos: u8, pkid: u16, dup: bool, topic: &str) -> PublishAction {
        if topic.is_empty() {
            // Only a topic alias could stand for it, and none is offered.
            return PublishAction::Close(Reason::TopicAliasInvalid);
        }
        if topic.contains(['+', '#', '\0']) {
            return PublishAction::Close(Reason::TopicNameInvalid);
        }
        if qos > 0 && pkid == 0 {
            return PublishAction::Close(Reason::ProtocolError);
        }
        if qos == 2 && self.qos2_held.contains(&pkid) {
            return PublishAction::Answer(Out::PubRec(pkid, Reason::Success));
        }
        if qos > 0 && self.inflight.contains_key(&pkid) {
            return PublishAction::Ignore;
        }
        if self.publish_acl.as_ref().is_some_and(|acl| acl.route(topic).is_none()) {
            return match (self.version, qos) {
                (Version::V311, _) => PublishAction::Close(Reason::NotAuthorized),
                (Version::V5, 0) => PublishAction::Ignore,
                (Version::V5, 1) => PublishAction::Answer(Out::PubAck(pkid, Reason::NotAuthorized)),
                (Version::V5, _) => PublishAction::Answer(Out::PubRec(pkid, Reason::NotAuthorized)),
            };
        }
        if qos == 0 {
            return PublishAction::Take { dup: false };
        }
        // MQTT 5 (4.9): QoS 2 counts until its PUBCOMP, so the ids held count too.
        if self.inflight.len() + self.qos2_held.len() >= usize::from(self.inflight_max) && self.version == Version::V5 {
            return PublishAction::Close(Reason::ReceiveMaximumExceeded);
        }
        self.inflight.insert(pkid, qos);
        PublishAction::Take { dup }
    }

    /// The writer released the ack of `pkid` with `outcome`: what to send.
    pub fn handle_durable(&mut self, pkid: u16, outcome: Outcome) -> Option<Out> {
        let qos = self.inflight.remove(&pkid)?;
        let reason = match outcome {
            Outcome::Stored | Outcome::Duplicate => Reason::Success,
            Outcome::Unrouted => Reason::NoMatchingSubscribers,
            Outcome::QuotaExceeded => Reason::QuotaExceeded,
            Outcome::PayloadInvalid => Reason::PayloadFormatInvalid,
            Outcome::TooLarge => Reason::ImplementationSpecificError,
        };
        Some(if qos == 1 {
            Out::PubAck(pkid, reason)
        } else {
            // A refused QoS 2 exchange ends at the PUBREC (reason ≥ 0x80): nothing is held.
            if reason.code() < 0x80 {
                self.qos2_held.insert(pkid);
            }
            Out::PubRec(pkid, reason)
        })
    }

    /// A PUBREL: the device releases a QoS 2 packet id.
    pub fn handle_pubrel(&mut self, pkid: u16) -> Out {
        if self.qos2_held.remove(&pkid) {
            Out::PubComp(pkid, Reason::Success)
        } else {
            Out::PubComp(pkid, Reason::PacketIdentifierNotFound)
        }
    }

    /// A SUBSCRIBE of `filters` topic filters: always refused, the agent ingests and
    /// delivers nothing.
    pub fn handle_subscribe(&self, pkid: u16, filters: usize) -> Out {
        Out::SubAck(pkid, Reason::NotAuthorized, filters.max(1))
    }

    /// Whether the shell should stop reading: a 3.1.1 device at its inflight limit waits for
    /// acks in TCP's window instead.
    pub fn reading_paused(&self) -> bool {
        self.version == Version::V311 && self.inflight.len() >= usize::from(self.inflight_max)
    }

    /// QoS 1/2 PUBLISHes waiting for their ack.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// What the session leaves for the next connection of its client id.
    pub fn into_stored(self) -> Stored {
        Stored { qos2_held: self.qos2_held }
    }
}

/// Sessions of disconnected devices (those without clean start and with an expiry),
/// bounded by `sessions_max`: past it, the one expiring first goes.
#[derive(Debug)]
pub struct SessionStore {
    sessions_max: usize,
    parked: HashMap<String, (Stored, u64)>,
    /// Client ids whose records the log holds from before a restart: their session is
    /// present (the redelivery memory came back from the log), with nothing held.
    known: HashMap<String, u64>,
}

impl SessionStore {
    /// An empty store.
    pub fn new(sessions_max: usize) -> Self {
        SessionStore { sessions_max, parked: HashMap::new(), known: HashMap::new() }
    }

    /// Client ids found in the log at start, kept until `expires_ms`.
    pub fn remember_known(&mut self, client_ids: impl IntoIterator<Item = String>, expires_ms: u64) {
        for id in client_ids {
            if self.known.len() >= self.sessions_max {
                break;
            }
            self.known.insert(id, expires_ms);
        }
    }

    /// Takes the session of `client_id`, if one is kept and not expired: `(found, stored)`.
    pub fn take(&mut self, client_id: &str, now_ms: u64) -> (bool, Stored) {
        let known = self.known.remove(client_id).is_some_and(|exp| exp > now_ms);
        match self.parked.remove(client_id) {
            Some((s, exp)) if exp > now_ms => (true, s),
            _ => (known, Stored::default()),
        }
    }

    /// Keeps `stored` for `client_id` until `now_ms + expiry_s`; an expiry of 0 keeps nothing.
    pub fn park(&mut self, client_id: String, stored: Stored, expiry_s: u32, now_ms: u64) {
        if expiry_s == 0 {
            return;
        }
        self.expire(now_ms);
        if self.parked.len() >= self.sessions_max
            && let Some(first) = self.parked.iter().min_by_key(|(_, (_, exp))| *exp).map(|(k, _)| k.clone())
        {
            self.parked.remove(&first);
        }
        self.parked.insert(client_id, (stored, now_ms.saturating_add(u64::from(expiry_s) * 1000)));
    }

    /// Drops expired sessions.
    pub fn expire(&mut self, now_ms: u64) {
        self.parked.retain(|_, (_, exp)| *exp > now_ms);
        self.known.retain(|_, exp| *exp > now_ms);
    }

    /// Sessions kept.
    pub fn len(&self) -> usize {
        self.parked.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { inflight_max: 2, keep_alive_max_s: 60, session_expiry_max_s: 3600, allow_anonymous: false }
    }

    fn req(version: Version, client_id: &str, clean_start: bool) -> ConnectRequest {
        ConnectRequest {
            version,
            client_id: client_id.into(),
            clean_start,
            keep_alive_s: 0,
            session_expiry_s: None,
            will: None,
        }
    }

    fn pw(ok: bool) -> Credential {
        Credential::Password { user: "u".into(), ok }
    }

    #[test]
    fn connect_refusals_carry_their_reason() {
        let l = limits();
        let r = req(Version::V5, "d1", true);
        assert_eq!(handle_connect(&r, &pw(false), &l, false, false, 1, None), Err(Reason::BadUserNameOrPassword));
        assert_eq!(handle_connect(&r, &Credential::None, &l, false, false, 1, None), Err(Reason::NotAuthorized));
        assert_eq!(handle_connect(&r, &pw(true), &l, true, false, 1, None), Err(Reason::QuotaExceeded));
        let anon = Limits { allow_anonymous: true, ..limits() };
        assert!(handle_connect(&r, &Credential::None, &anon, false, false, 1, None).is_ok());
        assert!(handle_connect(&r, &Credential::Certificate, &l, false, false, 1, None).is_ok());
        let bad_id = req(Version::V5, "a\nb", true);
        assert_eq!(
            handle_connect(&bad_id, &pw(true), &l, false, false, 1, None),
            Err(Reason::ClientIdentifierNotValid)
        );
        let no_id_311 = req(Version::V311, "", false);
        assert_eq!(
            handle_connect(&no_id_311, &pw(true), &l, false, false, 1, None),
            Err(Reason::ClientIdentifierNotValid)
        );
    }

    #[test]
    fn a_will_must_name_a_topic_the_user_may_publish_to() {
        let l = limits();
        let with_will = |topic: &str| ConnectRequest {
            will: Some(Will { topic: topic.into(), payload: Bytes::from_static(b"gone"), delay_s: 0 }),
            ..req(Version::V5, "d", true)
        };
        let filters = ["cdr/#".to_string()];
        assert!(
            handle_connect(&with_will("cdr/site-1/status"), &pw(true), &l, false, false, 0, Some(&filters)).is_ok()
        );
        assert!(handle_connect(&with_will("other/x"), &pw(true), &l, false, false, 0, None).is_ok(), "no filters: any");
        for (topic, reason) in [
            ("other/x", Reason::NotAuthorized),
            ("cdr/+", Reason::TopicNameInvalid),
            ("cdr/#", Reason::TopicNameInvalid),
            ("", Reason::TopicNameInvalid),
        ] {
            assert_eq!(
                handle_connect(&with_will(topic), &pw(true), &l, false, false, 0, Some(&filters)),
                Err(reason),
                "{topic:?}"
            );
        }
    }

    #[test]
    fn a_will_is_due_when_the_connection_fails_not_after_disconnect() {
        let will = |delay_s| Some(Will { topic: "cdr/s".into(), payload: Bytes::from_static(b"x"), delay_s });
        let due = |w, e, expiry| will_due(w, e, expiry).map(|w: Will| w.delay_s);
        assert_eq!(due(will(0), Ending::Failed, 0), Some(0));
        assert_eq!(due(will(0), Ending::Disconnect { with_will: false }, 0), None);
        assert_eq!(due(will(0), Ending::Disconnect { with_will: true }, 0), Some(0));
        assert_eq!(due(will(0), Ending::Shutdown, 0), None);
        // Taken over: the session goes on, so a delayed Will is not due; one without delay is.
        assert_eq!(due(will(0), Ending::TakenOver, 600), Some(0));
        assert_eq!(due(will(30), Ending::TakenOver, 600), None);
        // The delay ends with the session at the latest.
        assert_eq!(due(will(30), Ending::Failed, 600), Some(30));
        assert_eq!(due(will(30), Ending::Failed, 5), Some(5));
        assert_eq!(due(None, Ending::Failed, 5), None);
    }

    #[test]
    fn connect_grants_capped_keep_alive_expiry_and_assigned_ids() {
        let l = limits();
        let mut r = req(Version::V5, "", false);
        r.keep_alive_s = 600;
        r.session_expiry_s = Some(86_400);
        let a = handle_connect(&r, &pw(true), &l, false, true, 0xab, None).unwrap();
        assert_eq!(a.client_id, "auto-00000000000000ab");
        assert!(a.assigned);
        assert!(a.session_present);
        assert_eq!((a.keep_alive_s, a.session_expiry_s), (60, 3600));
        let a = handle_connect(&req(Version::V311, "d", true), &pw(true), &l, false, true, 0, None).unwrap();
        assert!(!a.session_present, "clean start discards the stored session");
        assert_eq!((a.keep_alive_s, a.session_expiry_s), (60, 0), "no keep-alive asked: the maximum");
        let a = handle_connect(&req(Version::V311, "d", false), &pw(true), &l, false, false, 0, None).unwrap();
        assert_eq!(a.session_expiry_s, 3600, "3.1.1 persistent sessions last session_expiry_max");
    }

    #[test]
    fn qos1_ack_waits_for_the_writer_and_carries_its_outcome() {
        let mut s = ConnSession::new(Version::V5, 10, Stored::default(), None);
        assert_eq!(s.handle_publish(1, 5, false, "cdr/a"), PublishAction::Take { dup: false });
        assert_eq!(s.handle_publish(1, 5, true, "cdr/a"), PublishAction::Ignore, "its ack is on the way");
        assert_eq!(s.handle_publish(1, 6, false, "cdr/a"), PublishAction::Take { dup: false });
        assert_eq!(s.inflight(), 2);
        assert_eq!(s.handle_durable(5, Outcome::Stored), Some(Out::PubAck(5, Reason::Success)));
        assert_eq!(s.handle_durable(6, Outcome::QuotaExceeded), Some(Out::PubAck(6, Reason::QuotaExceeded)));
        assert_eq!(s.handle_durable(6, Outcome::Stored), None, "not in flight any more");
        assert_eq!(s.handle_publish(1, 7, false, "x"), PublishAction::Take { dup: false });
        assert_eq!(s.handle_durable(7, Outcome::PayloadInvalid), Some(Out::PubAck(7, Reason::PayloadFormatInvalid)));
        assert_eq!(s.handle_publish(2, 8, false, "nowhere"), PublishAction::Take { dup: false });
        assert_eq!(s.handle_durable(8, Outcome::Unrouted), Some(Out::PubRec(8, Reason::NoMatchingSubscribers)));
        assert_eq!(s.handle_pubrel(8), Out::PubComp(8, Reason::Success), "0x10 is a success: the id is held");
        assert_eq!(s.handle_publish(0, 0, false, "x"), PublishAction::Take { dup: false });
        assert_eq!(s.inflight(), 0, "QoS 0 waits for nothing");
    }

    #[test]
    fn qos2_is_exactly_once_per_packet_id_across_connections() {
        let mut s = ConnSession::new(Version::V5, 10, Stored::default(), None);
        assert_eq!(s.handle_publish(2, 9, false, "cdr/a"), PublishAction::Take { dup: false });
        assert_eq!(s.handle_durable(9, Outcome::Stored), Some(Out::PubRec(9, Reason::Success)));
        // Resent before PUBREL, with or without DUP: answered, never taken again.
        assert_eq!(s.handle_publish(2, 9, true, "cdr/a"), PublishAction::Answer(Out::PubRec(9, Reason::Success)));
        assert_eq!(s.handle_publish(2, 9, false, "cdr/a"), PublishAction::Answer(Out::PubRec(9, Reason::Success)));
        // The connection drops; the next one resumes the session.
        let stored = s.into_stored();
        let mut s = ConnSession::new(Version::V5, 10, stored, None);
        assert_eq!(s.handle_publish(2, 9, true, "cdr/a"), PublishAction::Answer(Out::PubRec(9, Reason::Success)));
        assert_eq!(s.handle_pubrel(9), Out::PubComp(9, Reason::Success));
        assert_eq!(s.handle_pubrel(9), Out::PubComp(9, Reason::PacketIdentifierNotFound));
        assert_eq!(s.handle_publish(2, 9, false, "cdr/b"), PublishAction::Take { dup: false }, "released: reusable");
        assert_eq!(s.handle_durable(9, Outcome::QuotaExceeded), Some(Out::PubRec(9, Reason::QuotaExceeded)));
        assert_eq!(s.handle_pubrel(9), Out::PubComp(9, Reason::PacketIdentifierNotFound), "a refusal holds nothing");
    }

    #[test]
    fn inflight_limit_closes_v5_and_pauses_v311() {
        let mut s = ConnSession::new(Version::V5, 2, Stored::default(), None);
        assert!(matches!(s.handle_publish(1, 1, false, "t"), PublishAction::Take { .. }));
        assert!(matches!(s.handle_publish(2, 2, false, "t"), PublishAction::Take { .. }));
        assert!(!s.reading_paused());
        assert_eq!(s.handle_publish(1, 3, false, "t"), PublishAction::Close(Reason::ReceiveMaximumExceeded));
        // A QoS 2 id PUBREC'd and not yet released still counts (MQTT 5, 4.9).
        let mut s = ConnSession::new(Version::V5, 2, Stored::default(), None);
        assert!(matches!(s.handle_publish(2, 1, false, "t"), PublishAction::Take { .. }));
        s.handle_durable(1, Outcome::Stored);
        assert!(matches!(s.handle_publish(1, 2, false, "t"), PublishAction::Take { .. }));
        assert_eq!(s.handle_publish(1, 3, false, "t"), PublishAction::Close(Reason::ReceiveMaximumExceeded));
        s.handle_pubrel(1);
        s.handle_durable(2, Outcome::Stored);
        assert!(matches!(s.handle_publish(1, 3, false, "t"), PublishAction::Take { .. }));
        let mut s = ConnSession::new(Version::V311, 2, Stored::default(), None);
        s.handle_publish(1, 1, false, "t");
        assert!(!s.reading_paused());
        s.handle_publish(1, 2, false, "t");
        assert!(s.reading_paused());
        s.handle_durable(1, Outcome::Stored);
        assert!(!s.reading_paused());
    }

    #[test]
    fn bad_topics_acl_and_subscribe_are_refused() {
        let acl = ["cdr/#".to_string()];
        let mut s = ConnSession::new(Version::V5, 10, Stored::default(), Some(&acl));
        assert_eq!(s.handle_publish(1, 1, false, "cdr/+"), PublishAction::Close(Reason::TopicNameInvalid));
        assert_eq!(s.handle_publish(1, 1, false, ""), PublishAction::Close(Reason::TopicAliasInvalid));
        assert_eq!(s.handle_publish(1, 0, false, "cdr/a"), PublishAction::Close(Reason::ProtocolError));
        assert_eq!(
            s.handle_publish(1, 1, false, "other"),
            PublishAction::Answer(Out::PubAck(1, Reason::NotAuthorized))
        );
        assert_eq!(
            s.handle_publish(2, 2, false, "other"),
            PublishAction::Answer(Out::PubRec(2, Reason::NotAuthorized))
        );
        assert_eq!(s.handle_publish(1, 3, false, "cdr/a"), PublishAction::Take { dup: false });
        assert_eq!(s.handle_subscribe(4, 2), Out::SubAck(4, Reason::NotAuthorized, 2));
        let mut s = ConnSession::new(Version::V311, 10, Stored::default(), Some(&acl));
        assert_eq!(s.handle_publish(1, 1, false, "other"), PublishAction::Close(Reason::NotAuthorized));
    }

    #[test]
    fn store_keeps_sessions_until_expiry_and_within_its_bound() {
        let mut st = SessionStore::new(2);
        let held = Stored { qos2_held: [3].into() };
        st.park("a".into(), held.clone(), 10, 0);
        st.park("b".into(), Stored::default(), 0, 0);
        assert_eq!(st.len(), 1, "expiry 0 keeps nothing");
        assert_eq!(st.take("a", 5_000), (true, held.clone()));
        assert_eq!(st.take("a", 5_000), (false, Stored::default()), "taken once");
        st.park("a".into(), held.clone(), 10, 0);
        assert_eq!(st.take("a", 10_000), (false, Stored::default()), "expired");
        st.park("a".into(), Stored::default(), 100, 0);
        st.park("b".into(), Stored::default(), 50, 0);
        st.park("c".into(), Stored::default(), 200, 0);
        assert_eq!(st.len(), 2);
        assert!(!st.take("b", 1).0, "the one expiring first went");
        st.remember_known(["k".to_string()], 1000);
        assert_eq!(st.take("k", 10), (true, Stored::default()));
    }
}
