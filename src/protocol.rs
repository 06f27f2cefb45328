//! The Appwrite Realtime protocol (generations A, B and C) for one connection.
//!
//! Owns a connection's session (project, roles, subscriptions), the handling of every client
//! message (`ping`, `subscribe`, `unsubscribe`, `authentication`, ...) and the JSON of every
//! server message except events (see `event.rs`). Pure: text in, text out; it must not touch
//! sockets, the shard's channel index or the bus. It takes shared names and routes through
//! [`Intern`] (the registry's interning, not its index); the caller updates the index when
//! [`Reply::subscriptions_changed`] says so.

use std::sync::Arc;

use compact_str::CompactString;
use rustc_hash::FxHashSet;
use serde_json::{Value, json};

use crate::distinct::Distinct;
use crate::event::EncodedEvent;
use crate::filter::{Filter, FilterLimits};
use crate::identity::{Identity, JwtVerifier};
use crate::registry::{Registry, Route};

/// Limits a client cannot exceed through subscribe messages.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub max_subscriptions: usize,
    /// Per subscription (and in the URL).
    pub max_channels: usize,
    /// Distinct channels over all of a connection's subscriptions.
    pub max_total_channels: usize,
    /// Queries and values over all of a connection's subscriptions ([`Filter::weight`]): what
    /// every event on its channels costs to judge, and what the filters hold.
    pub max_query_weight: usize,
    pub max_channel_len: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_subscriptions: 100,
            max_channels: 100,
            max_total_channels: 1000,
            max_query_weight: 1000,
            max_channel_len: 256,
        }
    }
}

/// A subscription id: up to 36 characters, stored inline when short (ids minted by herald and the
/// SDK are 20 characters).
pub type SubscriptionId = CompactString;

/// One subscription of a connection: an id and the channels it listens to.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub id: SubscriptionId,
    pub channels: Box<[Arc<str>]>,
    /// Its queries, compiled; `None` when it takes every event of its channels.
    pub filter: Option<Box<Filter>>,
}

/// One subscription as a session holds it (see [`Session::subscriptions`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubscriptionView<'a> {
    pub id: &'a str,
    pub channels: &'a [Arc<str>],
    pub filter: Option<&'a Filter>,
}

impl<'a> From<&'a Subscription> for SubscriptionView<'a> {
    fn from(s: &'a Subscription) -> Self {
        Self {
            id: &s.id,
            channels: &s.channels,
            filter: s.filter.as_deref(),
        }
    }
}

/// The id of the subscription a connection's URL makes. Derived, not stored: from the shard's
/// random key and the connection's serial, so that it differs between connections and is the
/// same for the whole life of one. 20 hex characters, like a minted id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UrlId([u8; 20]);

impl UrlId {
    pub fn new(key: u64, serial: u32) -> Self {
        // Bijections of the 64 bits (SplitMix64's finaliser), so distinct serials give distinct
        // ids, keyed on both sides so that an id reveals neither the serial nor how far apart
        // two connections' serials are.
        let v = mix(mix(key ^ u64::from(serial)) ^ mix(!key));
        let hi = mix(v) >> 48;
        let mut out = [0u8; 20];
        let digits = b"0123456789abcdef";
        for (i, b) in out.iter_mut().enumerate() {
            let nibble = if i < 16 {
                (v >> (60 - 4 * i)) & 0xF
            } else {
                (hi >> (12 - 4 * (i - 16))) & 0xF
            };
            *b = digits[nibble as usize];
        }
        Self(out)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where a session takes the shard's shared copies of names and routes from.
pub trait Intern {
    fn name(&mut self, name: &str) -> Arc<str>;
    fn route(&mut self, route: Route) -> Arc<Route>;
}

impl Intern for Registry {
    fn name(&mut self, name: &str) -> Arc<str> {
        self.intern(name)
    }

    fn route(&mut self, route: Route) -> Arc<Route> {
        self.intern_route(route)
    }
}

/// The realtime state of one connection. Lean on purpose (two pointers and an identity): a
/// million idle connections each hold one. What the URL asked for is a [`Route`] shared by
/// every session of the shard that asked alike, and the URL's subscription id is the
/// connection's [`UrlId`], which callers pass in.
#[derive(Debug)]
pub struct Session {
    /// The project and the URL's channels (converted for the identity).
    route: Arc<Route>,
    /// Guest or user; replaced by a successful `authentication`.
    pub identity: Arc<Identity>,
    /// The subscriptions once they are not just the URL's (a `subscribe` or `unsubscribe`
    /// changed them, or the URL had query slots): all of them, the URL's with its id. `None`:
    /// the URL's channels, if any, are the one subscription.
    /// Boxed: one pointer in every session instead of a 24-byte `Vec` most never use.
    #[allow(clippy::box_collection)]
    own: Option<Box<Vec<Subscription>>>,
}

/// What the connection must do after a client message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// A text frame to send back.
    pub frame: Option<String>,
    /// Close the connection with this code after sending `frame`.
    pub close: Option<u16>,
    /// The set of channels the session listens to changed; the caller must re-index it.
    pub subscriptions_changed: bool,
    /// A `subscribe` was applied (changed or not).
    pub subscribed: bool,
    /// A successful `subscribe` carried `lastEventId` (unvalidated): replay what was missed.
    pub resume_after: Option<String>,
    /// The message was an `authentication` (whatever its outcome).
    pub authentication: bool,
    /// An `authentication` carried this Appwrite session: the caller has it resolved and
    /// answers once it is (the session stays as it is meanwhile).
    pub resolve_session: Option<String>,
}

/// What can check the credentials of an `authentication` message.
#[derive(Clone, Copy)]
pub struct Verifiers<'a> {
    pub jwt: &'a JwtVerifier,
    /// A session resolver is configured.
    pub sessions: bool,
}

/// The `response` to a successful `authentication`, with `user` (an Account object, or
/// `{"$id"}` when only the id is known).
pub fn authentication_response(user: &Value) -> String {
    json!({"type": "response", "data": {
        "to": "authentication", "success": true, "user": user,
    }})
    .to_string()
}

impl Reply {
    fn frame(s: String) -> Self {
        Self {
            frame: Some(s),
            ..Self::default()
        }
    }
}

/// Error codes and messages clients see, as Appwrite words them where it has an equivalent.
pub mod errors {
    pub const MESSAGE_FORMAT: &str = "Message format is not valid.";
    pub const MESSAGE_TYPE: &str = "Message type is not valid.";
    pub const TOO_MANY_MESSAGES: &str = "Too many messages.";
    pub const TOO_MANY_MESSAGE_BYTES: &str =
        "Too many messages: over this connection's message bytes for the current window.";
    pub const BINARY: &str = "Binary messages are not supported: send JSON text frames.";
}

/// The JSON of an `error` message.
pub fn error_message(code: u16, message: &str) -> String {
    json!({"type": "error", "data": {"code": code, "message": message}}).to_string()
}

/// Mints an id like the SDK's `ID.unique()`: hex seconds, 5 hex digits of sub-second time and
/// 7 random hex digits (20 characters).
pub fn mint_id() -> SubscriptionId {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let random: u32 = rand::random::<u32>() & 0x0FFF_FFFF;
    compact_str::format_compact!(
        "{:08x}{:05x}{:07x}",
        now.as_secs() as u32,
        now.subsec_micros() & 0xFFFFF,
        random
    )
}

/// Appwrite's `CustomId` rule: at most 36 of `[A-Za-z0-9._-]`, not starting with `.`, `-` or `_`.
pub fn is_valid_subscription_id(id: &str) -> bool {
    crate::event::is_valid_id(id)
}

impl Session {
    /// A session of `identity`. `url_channels` (generations A and B) form one subscription with
    /// a minted id, converted for the user ([`crate::identity::convert_channel`]); `intern`
    /// returns the shard's shared copy of a channel name.
    pub fn new(
        project: Arc<str>,
        identity: Arc<Identity>,
        url_channels: &[String],
        intern: &mut dyn Intern,
    ) -> Self {
        let channels = convert_channels(&identity, url_channels.iter(), intern);
        let subscribed = !url_channels.is_empty();
        Self {
            route: intern.route(Route {
                project,
                channels,
                subscribed,
            }),
            identity,
            own: None,
        }
    }

    /// A session whose URL carried Gen B query slots: one subscription per slot, in `slots`
    /// order, each of its channels (converted for the user) and its compiled queries.
    pub fn with_slots(
        project: Arc<str>,
        identity: Arc<Identity>,
        slots: Vec<(Vec<String>, Option<Filter>)>,
        intern: &mut dyn Intern,
    ) -> Self {
        let subscriptions = slots
            .into_iter()
            .map(|(channels, filter)| Subscription {
                id: mint_id(),
                channels: convert_channels(&identity, channels.iter(), intern),
                filter: filter.filter(|f| !f.is_select_all()).map(Box::new),
            })
            .collect();
        let route = intern.route(Route {
            project,
            channels: Box::new([]),
            subscribed: false,
        });
        Self {
            route,
            identity,
            own: Some(Box::new(subscriptions)),
        }
    }

    pub fn project(&self) -> &Arc<str> {
        &self.route.project
    }

    /// Every subscription in order; `url_id` names the URL's.
    pub fn subscriptions<'a>(
        &'a self,
        url_id: &'a UrlId,
    ) -> impl Iterator<Item = SubscriptionView<'a>> + 'a {
        let url = (self.own.is_none() && self.route.subscribed).then(|| SubscriptionView {
            id: url_id.as_str(),
            channels: &self.route.channels,
            filter: None,
        });
        let own = self
            .own
            .iter()
            .flat_map(|v| v.iter().map(SubscriptionView::from));
        url.into_iter().chain(own)
    }

    /// The subscriptions as a list of their own, to change.
    fn owned(&self, url_id: &UrlId) -> Vec<Subscription> {
        match &self.own {
            Some(v) => (**v).clone(),
            None => self
                .subscriptions(url_id)
                .map(|s| Subscription {
                    id: s.id.into(),
                    channels: s.channels.into(),
                    filter: None,
                })
                .collect(),
        }
    }

    /// The `connected` message sent right after the upgrade. `slots`: the Gen B slot number of
    /// each subscription, when they are not simply 0, 1, 2... (then `subscriptions` is an
    /// object from slot to id, as Appwrite's PHP encodes it).
    /// `user`: the Account object a resolver returned, instead of what the identity knows.
    pub fn connected_message(
        &self,
        slots: Option<&[u32]>,
        user: Option<&Value>,
        url_id: &UrlId,
    ) -> String {
        let ids = self.subscriptions(url_id).map(|s| s.id);
        let subscriptions = match slots {
            Some(slots) if slots.iter().enumerate().any(|(i, &s)| s as usize != i) => {
                SubscriptionIds::BySlot(slots.iter().copied().zip(ids).collect())
            }
            _ => SubscriptionIds::List(ids.collect()),
        };
        let channels = self.channels();
        let message = Connected {
            data: ConnectedData {
                channels: channels.iter().map(|c| &**c).collect(),
                subscriptions,
                user: match user {
                    Some(account) => UserJson::Account(account),
                    None => UserJson::Id(self.identity.user_id()),
                },
            },
            kind: "connected",
        };
        // Serialising borrowed fields cannot fail: no map has a non-string key.
        serde_json::to_string(&message).unwrap_or_default()
    }

    /// Becomes `identity` (a verified `authentication`): every subscription keeps its id and
    /// the project stays; `account` channels are bound to the new user. The caller re-indexes.
    pub fn authenticate(&mut self, identity: Arc<Identity>, intern: &mut dyn Intern) {
        let old = self.identity.clone();
        // Back to what the client asked for (`account.<old>.update` was `account.update`), then
        // bound to the new user.
        let mut rebind = |channels: &[Arc<str>]| {
            let asked = channels
                .iter()
                .map(|c| crate::identity::unbind_channel(&old, c));
            convert_channels(&identity, asked, intern)
        };
        match &mut self.own {
            Some(list) => {
                for s in list.iter_mut() {
                    s.channels = rebind(&s.channels);
                }
            }
            None if self.route.subscribed => {
                let channels = rebind(&self.route.channels);
                let project = self.route.project.clone();
                self.route = intern.route(Route {
                    project,
                    channels,
                    subscribed: true,
                });
            }
            None => {}
        }
        self.identity = identity;
    }

    /// Each subscription's channel list.
    fn channel_lists(&self) -> impl Iterator<Item = &[Arc<str>]> {
        let url = self
            .own
            .is_none()
            .then_some(&*self.route.channels)
            .filter(|c| !c.is_empty());
        let own = self.own.iter().flat_map(|v| v.iter().map(|s| &*s.channels));
        url.into_iter().chain(own)
    }

    /// Every distinct channel of every subscription, in first-seen order (linear: a session may
    /// hold 100 subscriptions of 100 channels).
    pub fn channels(&self) -> Vec<Arc<str>> {
        let mut seen = Distinct::default();
        for c in self.channel_lists().flat_map(|c| c.iter()) {
            seen.push(c.clone());
        }
        seen.into_vec()
    }

    /// Ids of the subscriptions that listen to any of `channels` (in subscription order) and
    /// whose queries match the payload, for an event the session's roles allow.
    pub fn matching<'a>(
        &'a self,
        event: &'a EncodedEvent,
        url_id: &'a UrlId,
    ) -> impl Iterator<Item = &'a str> + 'a {
        let allowed = event.allows(&self.identity);
        self.subscriptions(url_id)
            .filter(move |s| {
                allowed
                    && s.channels
                        .iter()
                        .any(|c| event.channels.iter().any(|e| **e == **c))
                    && s.filter.is_none_or(|f| f.matches(event.payload()))
            })
            .map(|s| s.id)
    }

    /// Whether some subscription has queries: then two events of the same route may match
    /// differently, and each is judged on its own.
    pub fn has_filters(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|v| v.iter().any(|s| s.filter.is_some()))
    }

    /// Handles one client text message; `jwt` verifies `authentication` tokens.
    /// `url_id`: the connection's id for the URL's subscription.
    pub fn handle_text(
        &mut self,
        text: &str,
        limits: &SessionLimits,
        verifiers: Verifiers<'_>,
        intern: &mut dyn Intern,
        url_id: &UrlId,
    ) -> Reply {
        let Ok(Value::Object(mut msg)) = serde_json::from_str::<Value>(text) else {
            return Reply::frame(error_message(1003, errors::MESSAGE_FORMAT));
        };
        if !msg.contains_key("type") && !msg.contains_key("data") {
            return Reply::frame(error_message(1003, errors::MESSAGE_FORMAT));
        }
        let data = msg.remove("data").unwrap_or(Value::Null);
        match msg.get("type").and_then(Value::as_str) {
            Some("ping") => Reply::frame(r#"{"type":"pong"}"#.to_owned()),
            Some("subscribe") => {
                let mut reply = self.subscribe(data, limits, intern, url_id);
                if reply.subscribed {
                    reply.resume_after = msg.get("lastEventId").map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    });
                }
                reply
            }
            Some("unsubscribe") => self.unsubscribe(data, url_id),
            Some("authentication") => Reply {
                authentication: true,
                ..self.authentication(&data, verifiers, intern)
            },
            Some("presence") => Reply::frame(error_message(
                1003,
                "Presence is not supported by this gateway.",
            )),
            _ => Reply::frame(error_message(1003, errors::MESSAGE_TYPE)),
        }
    }

    /// `authentication` with a `jwt`: verified here, and the session becomes its user. A
    /// refused token leaves the session as it was.
    fn authentication(
        &mut self,
        data: &Value,
        verifiers: Verifiers<'_>,
        intern: &mut dyn Intern,
    ) -> Reply {
        let Some(token) = data.get("jwt") else {
            return session_authentication(data, verifiers.sessions);
        };
        let Some(token) = token.as_str() else {
            return Reply::frame(error_message(
                1003,
                "Payload is not valid. jwt must be a string",
            ));
        };
        let project = self.route.project.clone();
        match verifiers
            .jwt
            .verify(token, &project, &mut |n| intern.name(n))
        {
            Ok(identity) => {
                self.authenticate(Arc::new(identity), intern);
                Reply {
                    frame: Some(authentication_response(&self.identity.user_json())),
                    subscriptions_changed: true,
                    ..Reply::default()
                }
            }
            Err(e) => Reply::frame(error_message(1003, &e.to_string())),
        }
    }

    fn subscribe(
        &mut self,
        data: Value,
        limits: &SessionLimits,
        intern: &mut dyn Intern,
        url_id: &UrlId,
    ) -> Reply {
        let mut rows = match parse_subscribe(data, limits) {
            Ok(rows) => rows,
            Err(e) => {
                return Reply::frame(error_message(
                    1003,
                    &format!("Invalid subscribe payload: {e}"),
                ));
            }
        };
        for row in &mut rows {
            if let Some(queries) = row.queries.take() {
                match Filter::compile_values(&queries, &FilterLimits::default()) {
                    Ok(f) => row.filter = Some(f),
                    Err(e) => {
                        return Reply::frame(error_message(1003, &format!("Invalid query: {e}")));
                    }
                }
            }
        }
        let current = self.owned(url_id);
        // A row repeating an id (Appwrite: the last one wins) adds one subscription, not two.
        let new_ids = rows
            .iter()
            .filter_map(|r| r.id.as_ref())
            .filter(|id| !current.iter().any(|s| s.id == **id))
            .collect::<FxHashSet<_>>()
            .len()
            + rows.iter().filter(|r| r.id.is_none()).count();
        if current.len() + new_ids > limits.max_subscriptions {
            return Reply::frame(error_message(
                1003,
                &format!(
                    "Invalid subscribe payload: a connection may hold at most {} subscriptions",
                    limits.max_subscriptions
                ),
            ));
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut next = current.clone();
        for row in rows {
            let id = row.id.unwrap_or_else(mint_id);
            let channels = convert_channels(&self.identity, row.channels.iter(), intern);
            out.push(json!({
                "subscriptionId": id.as_str(),
                "channels": channels.iter().map(|c| &**c).collect::<Vec<_>>(),
                "queries": row.filter.as_ref().map_or_else(Vec::new, |f| f.canonical()),
            }));
            let filter = row.filter.filter(|f| !f.is_select_all()).map(Box::new);
            // Upsert with replace semantics: the new channel list is the whole list.
            match next.iter_mut().find(|s| s.id == id) {
                Some(existing) => {
                    existing.channels = channels;
                    existing.filter = filter;
                }
                None => next.push(Subscription {
                    id,
                    channels,
                    filter,
                }),
            }
        }
        if distinct_channels(&next) > limits.max_total_channels {
            return Reply::frame(error_message(
                1003,
                &format!(
                    "Invalid subscribe payload: a connection may listen to at most {} distinct channels",
                    limits.max_total_channels
                ),
            ));
        }
        let weight: usize = next
            .iter()
            .filter_map(|s| s.filter.as_ref())
            .map(|f| f.weight())
            .sum();
        if weight > limits.max_query_weight {
            return Reply::frame(error_message(
                1003,
                &format!(
                    "Invalid query: a connection's subscriptions may carry at most {} queries and values in all",
                    limits.max_query_weight
                ),
            ));
        }
        // A repeated subscribe changes nothing and costs no re-indexing.
        let changed = next != current;
        if changed {
            self.own = Some(Box::new(next));
        }
        Reply {
            frame: Some(
                json!({"type": "response", "data": {"to": "subscribe", "success": true, "subscriptions": out}})
                    .to_string(),
            ),
            subscribed: true,
            subscriptions_changed: changed,
            ..Reply::default()
        }
    }

    fn unsubscribe(&mut self, data: Value, url_id: &UrlId) -> Reply {
        let ids = match parse_unsubscribe(data) {
            Ok(ids) => ids,
            Err(e) => {
                return Reply::frame(error_message(
                    1003,
                    &format!("Invalid unsubscribe payload: {e}"),
                ));
            }
        };
        // A list of its own only when the URL's subscription is among those removed.
        if self.own.is_none() && ids.iter().any(|id| **id == *url_id.as_str()) {
            self.own = Some(Box::new(self.owned(url_id)));
        }
        let mut changed = false;
        let rows: Vec<Value> = ids
            .into_iter()
            .map(|id| {
                let removed = self.own.as_mut().is_some_and(|list| {
                    let before = list.len();
                    list.retain(|s| s.id != id);
                    list.len() != before
                });
                changed |= removed;
                json!({"subscriptionId": id, "removed": removed})
            })
            .collect();
        Reply {
            frame: Some(
                json!({"type": "response", "data": {"to": "unsubscribe", "success": true, "subscriptions": rows}})
                    .to_string(),
            ),
            subscriptions_changed: changed,
            ..Reply::default()
        }
    }
}

/// Distinct channels over `subscriptions`.
fn distinct_channels(subscriptions: &[Subscription]) -> usize {
    let mut seen = FxHashSet::default();
    for s in subscriptions {
        seen.extend(s.channels.iter().map(|c| &**c));
    }
    seen.len()
}

/// Channels as `identity` listens to them (the `account` conversion), interned, each once.
/// The `connected` message, written straight from the session: one is sent per upgrade, so it
/// builds no JSON tree. Fields in the order a `json!` object writes them (sorted).
#[derive(serde::Serialize)]
struct Connected<'a> {
    data: ConnectedData<'a>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(serde::Serialize)]
struct ConnectedData<'a> {
    channels: Vec<&'a str>,
    subscriptions: SubscriptionIds<'a>,
    user: UserJson<'a>,
}

/// Subscription ids: a list, or an object from Gen B slot number to id when the slots are not
/// simply 0, 1, 2...
enum SubscriptionIds<'a> {
    List(Vec<&'a str>),
    BySlot(Vec<(u32, &'a str)>),
}

impl serde::Serialize for SubscriptionIds<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::List(ids) => s.collect_seq(ids),
            Self::BySlot(pairs) => s.collect_map(pairs.iter().map(|(slot, id)| (slot, id))),
        }
    }
}

/// The `user` of a `connected` message: the Account object a resolver returned, `{"$id"}` when
/// only the id is known, `null` for a guest.
enum UserJson<'a> {
    Account(&'a Value),
    Id(Option<&'a str>),
}

impl serde::Serialize for UserJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Self::Account(v) => v.serialize(s),
            Self::Id(None) => s.serialize_none(),
            Self::Id(Some(id)) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("$id", id)?;
                map.end()
            }
        }
    }
}

fn convert_channels<S: AsRef<str>>(
    identity: &Identity,
    channels: impl Iterator<Item = S>,
    intern: &mut dyn Intern,
) -> Box<[Arc<str>]> {
    let mut out: Distinct<Arc<str>> = Distinct::default();
    for c in channels {
        crate::identity::convert_channel(identity, c.as_ref(), |name| {
            if !out.contains(name) {
                out.push(intern.name(name));
            }
        });
    }
    out.into_vec().into_boxed_slice()
}

/// An `authentication` with an Appwrite session: handed to the resolver when there is one;
/// without one it cannot be checked. Either way the connection keeps its project, identity and
/// subscriptions for now.
fn session_authentication(data: &Value, resolver: bool) -> Reply {
    match data.get("session").and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s.len() <= crate::identity::MAX_SESSION_BYTES => {
            if resolver {
                return Reply {
                    resolve_session: Some(s.to_owned()),
                    ..Reply::default()
                };
            }
            Reply::frame(error_message(
                1003,
                "Session is not valid. This server verifies JWTs (`{\"jwt\": ...}`), not session secrets (no --auth-url or --appwrite-endpoint); the connection keeps its identity.",
            ))
        }
        _ => Reply::frame(error_message(
            1003,
            "Payload is not valid. Session is required",
        )),
    }
}

struct SubscribeRow {
    id: Option<SubscriptionId>,
    channels: Vec<String>,
    queries: Option<Vec<Value>>,
    /// `queries` compiled; `None` when none were given.
    filter: Option<Filter>,
}

/// Validates a whole subscribe batch before anything is applied.
fn parse_subscribe(data: Value, limits: &SessionLimits) -> Result<Vec<SubscribeRow>, String> {
    let Value::Array(rows) = data else {
        return Err("data must be a list of subscriptions".into());
    };
    if rows.is_empty() {
        return Err("data must hold at least one subscription".into());
    }
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Value::Object(mut row) = row else {
            return Err("every subscription must be an object".into());
        };
        let id = match row.remove("subscriptionId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "unique()" => None,
            Some(Value::String(s)) if is_valid_subscription_id(&s) => Some(SubscriptionId::from(s)),
            Some(_) => return Err(format!("subscriptionId must be {}", crate::event::ID_RULE)),
        };
        let Some(Value::Array(chans)) = row.remove("channels") else {
            return Err("channels must be a list of strings".into());
        };
        if chans.len() > limits.max_channels {
            return Err(format!(
                "a subscription may list at most {} channels",
                limits.max_channels
            ));
        }
        let mut channels = Vec::with_capacity(chans.len());
        let mut seen = FxHashSet::default();
        for c in chans {
            match c {
                Value::String(s)
                    if s.len() <= limits.max_channel_len && crate::event::is_valid_name(&s) =>
                {
                    if seen.insert(s.clone()) {
                        channels.push(s);
                    }
                }
                _ => {
                    return Err(format!(
                        "channels must be names of {} (at most {} bytes here)",
                        crate::event::NAME_RULE,
                        limits.max_channel_len
                    ));
                }
            }
        }
        let queries = match row.remove("queries") {
            None | Some(Value::Null) => None,
            Some(Value::Array(q)) => Some(q),
            Some(_) => return Err("queries must be a list".into()),
        };
        out.push(SubscribeRow {
            id,
            channels,
            queries,
            filter: None,
        });
    }
    Ok(out)
}

fn parse_unsubscribe(data: Value) -> Result<Vec<String>, String> {
    let Value::Array(rows) = data else {
        return Err("data must be a list of {\"subscriptionId\": ...} objects".into());
    };
    if rows.is_empty() {
        return Err("data must hold at least one subscriptionId".into());
    }
    rows.into_iter()
        .map(|row| match row.get("subscriptionId") {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err("every row needs a non-empty string subscriptionId".into()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL_ID: UrlId = UrlId(*b"0123456789abcdef0123");

    fn session(channels: &[&str]) -> Session {
        let chans: Vec<String> = channels.iter().map(|s| s.to_string()).collect();
        Session::new(
            "p".into(),
            Arc::new(crate::identity::Identity::guest()),
            &chans,
            &mut Registry::default(),
        )
    }

    fn subs(s: &Session) -> Vec<SubscriptionView<'_>> {
        s.subscriptions(&URL_ID).collect()
    }

    #[test]
    fn url_ids_are_distinct_hex_and_stable() {
        let ids: FxHashSet<_> = (0..10_000).map(|n| UrlId::new(7, n)).collect();
        assert_eq!(ids.len(), 10_000);
        let id = UrlId::new(7, 3);
        assert_eq!(id, UrlId::new(7, 3));
        assert_ne!(id, UrlId::new(8, 3));
        assert_eq!(id.as_str().len(), 20);
        assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_url_subscription_stays_when_none_of_its_channels_is_left() {
        let ann = Arc::new(crate::identity::Identity::user("ann", None, Vec::new()));
        let chans = vec!["account.bob".to_owned()];
        let mut s = Session::new("p".into(), ann, &chans, &mut Registry::default());
        assert!(
            s.channels().is_empty(),
            "another user's account channel is dropped"
        );
        let v: Value = serde_json::from_str(&s.connected_message(None, None, &URL_ID)).unwrap();
        assert_eq!(v["data"]["subscriptions"], json!([URL_ID.as_str()]));
        let (v, changed) = handle(
            &mut s,
            &format!(
                r#"{{"type":"unsubscribe","data":[{{"subscriptionId":"{}"}}]}}"#,
                URL_ID.as_str()
            ),
        );
        assert!(changed);
        assert_eq!(v["data"]["subscriptions"][0]["removed"], true);
        assert!(subs(&s).is_empty());
    }

    #[test]
    fn unsubscribing_ids_that_are_not_there_makes_no_list() {
        let mut s = session(&["files"]);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"unsubscribe","data":[{"subscriptionId":"nope"}]}"#,
        );
        assert!(!changed);
        assert_eq!(v["data"]["subscriptions"][0]["removed"], false);
        assert!(s.own.is_none(), "still only the shared route");
        assert_eq!(subs(&s).len(), 1);
    }

    #[test]
    fn sessions_that_asked_alike_share_one_route() {
        let mut registry = Registry::default();
        let guest = Arc::new(crate::identity::Identity::guest());
        let chans = vec!["files".to_owned()];
        let a = Session::new("p".into(), guest.clone(), &chans, &mut registry);
        let b = Session::new("p".into(), guest, &chans, &mut registry);
        assert!(Arc::ptr_eq(&a.route, &b.route));
        assert!(a.own.is_none(), "no list of its own");
    }

    fn handle(s: &mut Session, text: &str) -> (Value, bool) {
        let r = s.handle_text(
            text,
            &SessionLimits::default(),
            Verifiers {
                jwt: &crate::identity::JwtVerifier::none(),
                sessions: false,
            },
            &mut Registry::default(),
            &URL_ID,
        );
        (
            serde_json::from_str(&r.frame.unwrap()).unwrap(),
            r.subscriptions_changed,
        )
    }

    #[test]
    fn connected_lists_url_channels_and_one_minted_id() {
        let s = session(&["files", "documents"]);
        let v: Value = serde_json::from_str(&s.connected_message(None, None, &URL_ID)).unwrap();
        assert_eq!(v["data"]["channels"], json!(["files", "documents"]));
        let id = v["data"]["subscriptions"][0].as_str().unwrap();
        assert_eq!(id, URL_ID.as_str());
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(v["data"]["user"], Value::Null);
    }

    #[test]
    fn malformed_and_unknown_messages() {
        let mut s = session(&[]);
        for bad in ["nope", "[1]", "{}", "5"] {
            let (v, _) = handle(&mut s, bad);
            assert_eq!(v["data"]["message"], errors::MESSAGE_FORMAT, "{bad}");
        }
        let (v, _) = handle(&mut s, r#"{"type":"dance"}"#);
        assert_eq!(v["data"]["code"], 1003);
        assert_eq!(v["data"]["message"], errors::MESSAGE_TYPE);
        let (v, _) = handle(&mut s, r#"{"type":"ping"}"#);
        assert_eq!(v, json!({"type":"pong"}));
    }

    #[test]
    fn subscribe_upserts_and_replaces() {
        let mut s = session(&[]);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"subscribe","data":[{"subscriptionId":"a1","channels":["x","y"]},{"channels":["z"],"queries":[]}]}"#,
        );
        assert!(changed);
        assert_eq!(v["data"]["to"], "subscribe");
        assert_eq!(v["data"]["subscriptions"][0]["subscriptionId"], "a1");
        assert_eq!(subs(&s).len(), 2);
        handle(
            &mut s,
            r#"{"type":"subscribe","data":[{"subscriptionId":"a1","channels":["q"]}]}"#,
        );
        assert_eq!(subs(&s).len(), 2);
        assert_eq!(&*subs(&s)[0].channels[0], "q");
        assert_eq!(subs(&s)[0].channels.len(), 1);
    }

    #[test]
    fn a_repeated_subscribe_changes_nothing_and_the_channel_total_is_bounded() {
        let mut s = session(&[]);
        let msg = r#"{"type":"subscribe","data":[{"subscriptionId":"a1","channels":["x","y"]}]}"#;
        assert!(handle(&mut s, msg).1);
        let (v, changed) = handle(&mut s, msg);
        assert_eq!(v["data"]["success"], true);
        assert!(!changed, "nothing to re-index");
        // 11 subscriptions of 100 distinct channels would be 1,100 channels: refused whole.
        for n in 0..10 {
            let channels: Vec<String> = (0..100).map(|c| format!("{n}.{c}")).collect();
            let row = json!({"type": "subscribe", "data": [{"subscriptionId": format!("s{n}"), "channels": channels}]});
            let (v, _) = handle(&mut s, &row.to_string());
            let ok = n < 9;
            assert_eq!(v["type"] == "response", ok, "{n}: {v}");
            if !ok {
                assert!(
                    v["data"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("1000 distinct channels")
                );
            }
        }
        assert_eq!(subs(&s).len(), 10);
        assert_eq!(s.channels().len(), 902);
        // One id repeated in a message is one subscription (the last row wins).
        let mut s = session(&[]);
        let rows: Vec<Value> = (0..150)
            .map(|n| json!({"subscriptionId": "same", "channels": [format!("c{}", n % 3)]}))
            .collect();
        let (v, _) = handle(
            &mut s,
            &json!({"type": "subscribe", "data": rows}).to_string(),
        );
        assert_eq!(v["type"], "response", "{v}");
        assert_eq!(subs(&s).len(), 1);
        assert_eq!(&*subs(&s)[0].channels[0], "c2");
    }

    #[test]
    fn subscribe_rejects_bad_ids_atomically() {
        let mut s = session(&[]);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"subscribe","data":[{"subscriptionId":"ok","channels":["x"]},{"subscriptionId":"-bad!","channels":["y"]}]}"#,
        );
        assert!(!changed);
        assert_eq!(v["data"]["code"], 1003);
        assert!(subs(&s).is_empty());
        let long = "a".repeat(37);
        let (v, _) = handle(
            &mut s,
            &format!(
                r#"{{"type":"subscribe","data":[{{"subscriptionId":"{long}","channels":["x"]}}]}}"#
            ),
        );
        assert_eq!(v["data"]["code"], 1003);
    }

    #[test]
    fn unsubscribe_reports_per_row_and_rejects_bad_batches() {
        let mut s = session(&[]);
        handle(
            &mut s,
            r#"{"type":"subscribe","data":[{"subscriptionId":"a","channels":["x"]},{"subscriptionId":"b","channels":["y"]}]}"#,
        );
        let (v, _) = handle(
            &mut s,
            r#"{"type":"unsubscribe","data":[{"subscriptionId":"a"},{}]}"#,
        );
        assert_eq!(v["data"]["code"], 1003);
        assert_eq!(subs(&s).len(), 2);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"unsubscribe","data":[{"subscriptionId":"a"},{"subscriptionId":"zz"}]}"#,
        );
        assert!(changed);
        assert_eq!(
            v["data"]["subscriptions"],
            json!([{"subscriptionId":"a","removed":true},{"subscriptionId":"zz","removed":false}])
        );
    }

    #[test]
    fn authentication_keeps_the_session() {
        let mut s = session(&["files"]);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"authentication","data":{"session":"abc"}}"#,
        );
        assert_eq!(v["type"], "error");
        assert!(!changed);
        assert_eq!(&**s.project(), "p");
        assert_eq!(subs(&s).len(), 1);
    }

    #[test]
    fn queries_filter_events_per_subscription_and_bad_ones_are_refused() {
        let mut s = session(&[]);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"subscribe","data":[{"subscriptionId":"hot","channels":["x"],"queries":["{\"method\":\"greaterThan\",\"attribute\":\"t\",\"values\":[30]}"]},{"subscriptionId":"all","channels":["x"],"queries":["{\"method\":\"select\",\"values\":[\"*\"]}"]}]}"#,
        );
        assert!(changed, "{v}");
        assert_eq!(
            v["data"]["subscriptions"][0]["queries"],
            json!([r#"{"method":"greaterThan","attribute":"t","values":[30]}"#])
        );
        assert!(s.has_filters());
        let ev = |t: i64| {
            EncodedEvent::encode(&crate::event::Event {
                id: "1-0".into(),
                project: "p".into(),
                channels: vec!["x".into()],
                events: vec![],
                roles: vec![],
                timestamp: "t".into(),
                payload: json!({ "t": t }),
            })
        };
        assert_eq!(
            s.matching(&ev(31), &URL_ID).collect::<Vec<_>>(),
            ["hot", "all"]
        );
        assert_eq!(s.matching(&ev(30), &URL_ID).collect::<Vec<_>>(), ["all"]);
        let (v, changed) = handle(
            &mut s,
            r#"{"type":"subscribe","data":[{"channels":["y"],"queries":["{\"method\":\"contains\",\"attribute\":\"a\",\"values\":[1]}"]}]}"#,
        );
        assert!(!changed);
        assert_eq!(v["data"]["code"], 1003);
        let message = v["data"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("Invalid query: Query method 'contains' is not supported"),
            "{message}"
        );
        assert_eq!(subs(&s).len(), 2, "nothing applied");
    }
}
