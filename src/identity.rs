//! Who a connection is: a guest or a user, and the roles that decide which events reach it.
//!
//! Owns Appwrite's role model (guests have `guests`; a user has `users`, `user:<id>`, the
//! `verified`/`unverified` variants when known, and extra roles such as `team:<t>` or
//! `label:<l>`), verifying JWTs into an [`Identity`], and the `account` channel conversion that
//! depends on the user. It must not know sockets, connections, messages or the bus.

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;

/// Longest JWT accepted (Appwrite's are about 300 bytes; one with a roles claim a few KiB).
pub const MAX_JWT_BYTES: usize = 8192;
/// Most roles one identity may carry beyond those derived from its user id.
pub const MAX_EXTRA_ROLES: usize = 100;

/// A set of extra roles: a thin pointer (the identity of every signed-in connection holds
/// one), shared per shard by every identity with the same set.
pub type RoleSet = Arc<Box<[Arc<str>]>>;

/// A connection's identity. Guests share one; a user's is built when its credential is
/// verified. Kept small: an authenticated idle connection pays for it. Connections with the
/// same credential share one per shard (`Registry::share_identity`).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Inline up to 24 bytes (Appwrite's ids are 20): no allocation of its own.
    user: Option<compact_str::CompactString>,
    /// Whether the user's email or phone is verified, when the credential says so.
    verified: Option<bool>,
    /// Roles beyond the derived ones (teams, memberships, labels).
    /// Shared by every identity of a shard with the same set ([`Identity::share_roles`]).
    extra: RoleSet,
    /// The Appwrite session this identity was resolved from, kept so that a permission change
    /// can resolve it again; `None` for guests and JWTs (whose roles are the token's).
    session: Option<SessionSecret>,
}

/// An Appwrite session value: shown in no log or debug output. A thin pointer: the identity
/// of every session-signed-in connection holds one.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionSecret(Arc<Box<str>>);

impl SessionSecret {
    pub fn new(value: &str) -> Self {
        Self(Arc::new(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

/// Longest Appwrite session value accepted (Appwrite's own limit, `Text(2048)`).
pub const MAX_SESSION_BYTES: usize = 2048;

/// What the application's resolver said a session is (see `resolver`): the user, whether it
/// is verified, extra roles, and the Account object clients get as `user`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub user_id: String,
    pub verified: Option<bool>,
    pub roles: Vec<String>,
    pub account: Option<serde_json::Value>,
}

impl Identity {
    pub fn guest() -> Self {
        Self {
            user: None,
            verified: None,
            extra: Arc::new(Box::new([])),
            session: None,
        }
    }

    /// The user a resolver answered for `session`; its roles (at most [`MAX_EXTRA_ROLES`],
    /// valid names only) go through `intern`.
    pub fn resolved(
        r: &Resolved,
        session: SessionSecret,
        intern: &mut dyn FnMut(&str) -> Arc<str>,
    ) -> Self {
        let extra = r
            .roles
            .iter()
            .filter(|role| crate::names::is_valid_name(role))
            .take(MAX_EXTRA_ROLES)
            .map(|role| intern(role))
            .collect();
        let mut identity = Self::user(&r.user_id, r.verified, extra);
        identity.session = Some(session);
        identity
    }

    /// The session to resolve again when this user's permissions change.
    pub fn session(&self) -> Option<&SessionSecret> {
        self.session.as_ref()
    }

    /// A user with `extra` roles; `extra` names that are derived ones anyway are dropped.
    pub fn user(id: &str, verified: Option<bool>, extra: Vec<Arc<str>>) -> Self {
        let mut identity = Self {
            user: Some(compact_str::CompactString::from(id)),
            verified,
            extra: Arc::new(Box::new([])),
            session: None,
        };
        let mut kept: Vec<Arc<str>> = Vec::with_capacity(extra.len());
        for role in extra {
            if !identity.has_role(&role) && !kept.contains(&role) {
                kept.push(role);
            }
        }
        identity.extra = Arc::new(kept.into_boxed_slice());
        identity
    }

    /// Swaps this identity's extra roles for the shard's shared copy of the same set, so that
    /// the connections of users with the same teams and labels hold one list between them.
    pub fn share_roles(mut self, intern: impl FnOnce(&RoleSet) -> RoleSet) -> Self {
        self.share_roles_in_place(intern);
        self
    }

    /// [`Identity::share_roles`] on an identity held in place.
    pub fn share_roles_in_place(&mut self, intern: impl FnOnce(&RoleSet) -> RoleSet) {
        if !self.extra.is_empty() {
            self.extra = intern(&self.extra);
        }
    }

    pub fn user_id(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Whether this identity holds `role` (an event's role, as Appwrite writes them).
    pub fn has_role(&self, role: &str) -> bool {
        let Some(id) = self.user.as_deref() else {
            return role == "guests";
        };
        let derived = match role {
            "users" => true,
            "users/verified" => self.verified == Some(true),
            "users/unverified" => self.verified == Some(false),
            _ => match role.strip_prefix("user:") {
                Some(rest) => match rest.strip_prefix(id) {
                    Some("") => true,
                    Some("/verified") => self.verified == Some(true),
                    Some("/unverified") => self.verified == Some(false),
                    _ => false,
                },
                None => false,
            },
        };
        derived || self.extra.iter().any(|r| &**r == role)
    }

    /// Every role, derived ones first (for logs, replays and tests).
    pub fn roles(&self) -> Vec<String> {
        let Some(id) = self.user.as_deref() else {
            return vec!["guests".to_owned()];
        };
        let mut roles = vec![format!("user:{id}"), "users".to_owned()];
        if let Some(v) = self.verified {
            let state = if v { "verified" } else { "unverified" };
            roles.push(format!("user:{id}/{state}"));
            roles.push(format!("users/{state}"));
        }
        roles.extend(self.extra.iter().map(|r| r.to_string()));
        roles
    }

    /// The `user` of `connected` and of the `authentication` response when all herald knows is
    /// the id (a JWT): an object with `$id`, or `null` for a guest.
    pub fn user_json(&self) -> serde_json::Value {
        match self.user.as_deref() {
            Some(id) => serde_json::json!({ "$id": id }),
            None => serde_json::Value::Null,
        }
    }
}

/// Appwrite's channel conversion for a user (`account` and its actions): `account` also listens
/// to `account.<id>`; `account.<action>` becomes `account.<id>.<action>`; another user's
/// `account.<x>...` is dropped. A guest's channels stay as they are. Calls `emit` per channel.
pub fn convert_channel(identity: &Identity, channel: &str, mut emit: impl FnMut(&str)) {
    let Some(id) = identity.user_id() else {
        return emit(channel);
    };
    if channel == "account" {
        emit("account");
        return emit(&format!("account.{id}"));
    }
    let Some(rest) = channel.strip_prefix("account.") else {
        return emit(channel);
    };
    match rest {
        "create" | "update" | "upsert" | "delete" => emit(&format!("account.{id}.{rest}")),
        _ if rest == id || rest.strip_prefix(id).is_some_and(|a| a.starts_with('.')) => {
            emit(channel)
        }
        _ => {}
    }
}

/// The channel a client asked for, from one [`convert_channel`] made for `identity`:
/// `account.<id>` and `account.<id>.<action>` go back to `account` and `account.<action>`.
pub fn unbind_channel<'a>(identity: &Identity, channel: &'a str) -> std::borrow::Cow<'a, str> {
    let bound = identity.user_id().and_then(|id| {
        let rest = channel.strip_prefix("account.")?.strip_prefix(id)?;
        match rest {
            "" => Some("account".into()),
            _ => rest
                .strip_prefix('.')
                .map(|action| format!("account.{action}").into()),
        }
    });
    bound.unwrap_or(std::borrow::Cow::Borrowed(channel))
}

/// The Appwrite session an upgrade request carries for `project`, as Appwrite reads it: the
/// `a_session_<project>` cookie (or its `_legacy` twin), else the `x-appwrite-session` header,
/// else the `a_session_<project>` entry of the `x-fallback-cookies` JSON. Values longer than
/// [`MAX_SESSION_BYTES`] or empty are ignored.
pub fn request_session(
    cookie: Option<&str>,
    header: Option<&str>,
    fallback: Option<&str>,
    project: &str,
) -> Option<String> {
    let name = format!("a_session_{project}");
    let legacy = format!("{name}_legacy");
    let usable = |v: &str| !v.is_empty() && v.len() <= MAX_SESSION_BYTES;
    let from_cookie = cookie.and_then(|c| {
        let pairs = || c.split(';').filter_map(|kv| kv.trim().split_once('='));
        pairs()
            .find(|(k, _)| *k == name)
            .or_else(|| pairs().find(|(k, _)| *k == legacy))
            // Appwrite's cookies are set URL-encoded (`%3D` for `=`) and read decoded.
            .map(|(_, v)| {
                let v = v.trim_matches('"');
                percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .map_or_else(|_| v.to_owned(), |d| d.into_owned())
            })
    });
    let from_fallback = || {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(fallback?).ok()?;
        map.get(&name)?.as_str().map(str::to_owned)
    };
    from_cookie
        .filter(|v| usable(v))
        .or_else(|| header.filter(|v| usable(v)).map(str::to_owned))
        .or_else(|| from_fallback().filter(|v| usable(v)))
}

/// Why a credential was refused. The text is what the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Failed to verify JWT. {0}")]
    InvalidJwt(String),
    #[error("Failed to verify JWT. This server has no --jwt-secret or --jwt-public-key.")]
    JwtNotConfigured,
}

/// A startup problem with the JWT settings.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read --jwt-public-key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("--jwt-public-key {path} is not an RSA, EC or Ed25519 public key in PEM")]
    Format { path: String },
    #[error("--jwt-secret must not be empty")]
    EmptySecret,
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(rename = "userId")]
    user_id: Option<String>,
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    /// The project the token is for, when it says (`projectId`, or `aud`).
    #[serde(rename = "projectId")]
    project_id: Option<String>,
    aud: Option<serde_json::Value>,
}

impl Claims {
    /// Whether the token may be used on `project`: a token that names a project is valid
    /// only there.
    fn allows_project(&self, project: &str) -> bool {
        let aud_ok = match &self.aud {
            None => true,
            Some(serde_json::Value::String(a)) => a == project,
            Some(serde_json::Value::Array(list)) => list.iter().any(|a| a == project),
            Some(_) => false,
        };
        aud_ok && self.project_id.as_deref().is_none_or(|p| p == project)
    }
}

/// Verifies JWTs with the configured secret (HS256/384/512, what Appwrite signs with) and/or
/// public key (RSA, EC or Ed25519, for tokens minted by the application). `exp` is required
/// and, like `nbf`, checked with no leeway beyond 30 s of clock skew.
pub struct JwtVerifier {
    secret: Option<DecodingKey>,
    public: Option<(DecodingKey, AlgorithmFamily)>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("secret", &self.secret.is_some())
            .field("public", &self.public.as_ref().map(|(_, fam)| *fam))
            .finish()
    }
}

impl JwtVerifier {
    /// A verifier that refuses every token (no key configured).
    pub fn none() -> Self {
        Self {
            secret: None,
            public: None,
        }
    }

    pub fn new(secret: Option<&str>, public_key: Option<&Path>) -> Result<Self, KeyError> {
        let secret = match secret {
            Some("") => return Err(KeyError::EmptySecret),
            Some(s) => {
                Some(DecodingKey::from_secret(s.as_bytes()).map_err(|_| KeyError::EmptySecret)?)
            }
            None => None,
        };
        let public = match public_key {
            Some(path) => Some(read_public_key(path)?),
            None => None,
        };
        Ok(Self { secret, public })
    }

    pub fn is_configured(&self) -> bool {
        self.secret.is_some() || self.public.is_some()
    }

    /// The identity `token` proves on a connection to `project`; its extra roles go through
    /// `intern`. A token naming another project (`projectId` or `aud`) is refused.
    pub fn verify(
        &self,
        token: &str,
        project: &str,
        intern: &mut dyn FnMut(&str) -> Arc<str>,
    ) -> Result<Identity, AuthError> {
        if !self.is_configured() {
            return Err(AuthError::JwtNotConfigured);
        }
        if token.len() > MAX_JWT_BYTES {
            return Err(AuthError::InvalidJwt(format!(
                "A token is at most {MAX_JWT_BYTES} bytes."
            )));
        }
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::InvalidJwt(describe(&e));
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let family = family_of(header.alg);
        let key = match (&self.secret, &self.public) {
            (Some(k), _) if family == AlgorithmFamily::Hmac => k,
            (_, Some((k, fam))) if *fam == family => k,
            _ => {
                return Err(AuthError::InvalidJwt(format!(
                    "Tokens signed with {:?} are not accepted here.",
                    header.alg
                )));
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = 30;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(invalid)?
            .claims;
        if !claims.allows_project(project) {
            return Err(AuthError::InvalidJwt(format!(
                "The token is for another project than {project}."
            )));
        }
        let id = claims
            .user_id
            .or(claims.sub)
            .filter(|id| crate::names::is_valid_id(id))
            .ok_or_else(|| {
                AuthError::InvalidJwt(format!(
                    "The token names no user: a userId or sub claim of {} is required.",
                    crate::names::ID_RULE
                ))
            })?;
        if claims.roles.len() > MAX_EXTRA_ROLES
            || !claims.roles.iter().all(|r| crate::names::is_valid_name(r))
        {
            return Err(AuthError::InvalidJwt(format!(
                "The roles claim must list at most {MAX_EXTRA_ROLES} names of {}.",
                crate::names::NAME_RULE
            )));
        }
        let extra = claims.roles.iter().map(|r| intern(r)).collect();
        Ok(Identity::user(&id, None, extra))
    }
}

fn family_of(alg: Algorithm) -> AlgorithmFamily {
    alg.family()
}

fn read_public_key(path: &Path) -> Result<(DecodingKey, AlgorithmFamily), KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((k, AlgorithmFamily::Rsa));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((k, AlgorithmFamily::Ec));
    }
    if let Ok(k) = DecodingKey::from_ed_pem(&pem) {
        return Ok((k, AlgorithmFamily::Ed));
    }
    Err(KeyError::Format {
        path: path.display().to_string(),
    })
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "The token has expired.".to_owned(),
        ErrorKind::ImmatureSignature => "The token is not valid yet (nbf).".to_owned(),
        ErrorKind::InvalidSignature => "The signature does not match.".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("The token has no {c} claim."),
        ErrorKind::InvalidAlgorithm => "The token's algorithm does not match the key.".to_owned(),
        _ => "The token is malformed.".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn intern(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs256(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn roles_follow_appwrite() {
        let guest = Identity::guest();
        assert!(guest.has_role("guests") && !guest.has_role("users"));
        let u = Identity::user("ann", Some(false), vec![intern("team:t1"), intern("users")]);
        for role in [
            "users",
            "user:ann",
            "user:ann/unverified",
            "users/unverified",
            "team:t1",
        ] {
            assert!(u.has_role(role), "{role}");
        }
        for role in [
            "guests",
            "user:bob",
            "user:an",
            "user:ann/verified",
            "team:t2",
            "any",
        ] {
            assert!(!u.has_role(role), "{role}");
        }
        assert_eq!(
            u.roles(),
            [
                "user:ann",
                "users",
                "user:ann/unverified",
                "users/unverified",
                "team:t1"
            ]
        );
        let unknown = Identity::user("ann", None, vec![]);
        assert!(!unknown.has_role("users/verified") && !unknown.has_role("users/unverified"));
    }

    #[test]
    fn the_account_channel_is_bound_to_the_user() {
        let convert = |who: &Identity, c: &str| {
            let mut out = Vec::new();
            convert_channel(who, c, |x| out.push(x.to_owned()));
            out
        };
        let ann = Identity::user("ann", None, vec![]);
        assert_eq!(convert(&ann, "account"), ["account", "account.ann"]);
        assert_eq!(convert(&ann, "account.update"), ["account.ann.update"]);
        assert_eq!(convert(&ann, "account.ann"), ["account.ann"]);
        assert_eq!(convert(&ann, "account.ann.delete"), ["account.ann.delete"]);
        assert!(convert(&ann, "account.bob").is_empty());
        assert!(convert(&ann, "account.annex").is_empty());
        assert_eq!(convert(&ann, "documents"), ["documents"]);
        let guest = Identity::guest();
        assert_eq!(convert(&guest, "account.update"), ["account.update"]);
        // Undone before binding to another user.
        assert_eq!(unbind_channel(&ann, "account.ann.update"), "account.update");
        assert_eq!(unbind_channel(&ann, "account.ann"), "account");
        assert_eq!(unbind_channel(&ann, "account.annex"), "account.annex");
        assert_eq!(unbind_channel(&guest, "account.update"), "account.update");
    }

    #[test]
    fn hs256_tokens_carry_the_user_and_its_roles() {
        let v = JwtVerifier::new(Some("s3cret"), None).unwrap();
        let t = hs256(
            json!({"userId": "ann", "sessionId": "x", "exp": now() + 60, "roles": ["team:t1"]}),
            "s3cret",
        );
        let id = v.verify(&t, "p", &mut intern).unwrap();
        assert_eq!(id.user_id(), Some("ann"));
        assert!(id.has_role("team:t1") && id.has_role("user:ann"));
        let other = hs256(
            json!({"userId": "ann", "projectId": "q", "exp": now() + 60}),
            "s3cret",
        );
        let err = v.verify(&other, "p", &mut intern).unwrap_err().to_string();
        assert!(err.contains("another project"), "{err}");
        let aud = hs256(
            json!({"userId": "ann", "aud": ["p", "r"], "exp": now() + 60}),
            "s3cret",
        );
        assert!(v.verify(&aud, "p", &mut intern).is_ok());
        assert!(v.verify(&aud, "q", &mut intern).is_err());
        let sub = hs256(json!({"sub": "bob", "exp": now() + 60}), "s3cret");
        assert_eq!(
            v.verify(&sub, "p", &mut intern).unwrap().user_id(),
            Some("bob")
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let v = JwtVerifier::new(Some("s3cret"), None).unwrap();
        let cases = [
            (
                hs256(json!({"userId": "a", "exp": now() + 60}), "other"),
                "signature",
            ),
            (
                hs256(json!({"userId": "a", "exp": now() - 120}), "s3cret"),
                "expired",
            ),
            (hs256(json!({"userId": "a"}), "s3cret"), "exp claim"),
            (
                hs256(
                    json!({"userId": "a", "exp": now() + 600, "nbf": now() + 300}),
                    "s3cret",
                ),
                "not valid yet",
            ),
            (hs256(json!({"exp": now() + 60}), "s3cret"), "names no user"),
            (
                hs256(json!({"userId": "a b", "exp": now() + 60}), "s3cret"),
                "names no user",
            ),
            (
                hs256(
                    json!({"userId": "a", "exp": now() + 60, "roles": ["a b"]}),
                    "s3cret",
                ),
                "roles claim",
            ),
            ("not.a.jwt".to_owned(), "malformed"),
        ];
        for (token, words) in cases {
            let err = v.verify(&token, "p", &mut intern).unwrap_err().to_string();
            assert!(err.starts_with("Failed to verify JWT."), "{err}");
            assert!(err.contains(words), "{words}: {err}");
        }
        let none = JwtVerifier::new(None, None).unwrap();
        let t = hs256(json!({"userId": "a", "exp": now() + 60}), "s3cret");
        assert_eq!(
            none.verify(&t, "p", &mut intern),
            Err(AuthError::JwtNotConfigured)
        );
        assert!(JwtVerifier::new(Some(""), None).is_err());
    }
}
