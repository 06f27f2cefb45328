//! Resolving Appwrite sessions into users, off the shards.
//!
//! Owns the control-plane side of a session: it takes shards' [`IdentityRequest`]s (never
//! blocking them), asks a [`Backend`] (the application's `--auth-url`, or Appwrite itself with
//! `--appwrite-endpoint`) with bounded concurrency and a timeout, on a thread and runtime of its
//! own, caches answers by a hash of (project, session) for a TTL, and hands each answer back to
//! the shard that asked. A cached answer for a user whose permissions changed after it was
//! fetched is stale ([`Hub::permissions_changed_at`]). It must not touch connections; the shard
//! matches answers to connections by key and serial.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::doorbell::{Bell, next_request};
use crate::hub::Hub;
use crate::identity::{MAX_EXTRA_ROLES, Resolved};
use crate::mailbox::{
    Answer, AnswerRefused, IdentityAnswer, IdentityRequest, ResolveError, ResolveReceiver,
};
use crate::metrics::Metrics;

/// Longest a cached answer may live (`--auth-cache-ttl` is capped to it): well within how long
/// the hub remembers a permission change, so no answer outlives the memory of one.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// Bytes of answers cached at once (an answer weighs its Account object and roles).
const CACHE_BYTES: u64 = 64 << 20;
/// Largest Account object kept for clients; a bigger one (large `prefs`) is cut to its `$id`
/// and name, so that neither the cache nor a connection's answer holds it.
const MAX_ACCOUNT_BYTES: usize = 16 * 1024;
/// Membership lists read at once for one user.
const TEAM_LOOKUPS: usize = 8;
/// Fetches of one answer when permission changes keep making the fetched one stale.
const FETCH_ATTEMPTS: usize = 3;
/// Largest answer body read from a resolver.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Most teams whose memberships are read for one Appwrite user.
const MAX_TEAMS: usize = 100;
/// Pause before offering an answer again to a shard whose answer queue is full.
const RETRY: Duration = Duration::from_millis(2);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who says what a session is.
pub trait Backend: Send + Sync + 'static {
    /// For logs and the startup line.
    fn name(&self) -> &'static str;

    /// The user `session` belongs to in `project`, [`ResolveError::Denied`] when the answer is
    /// 401 or 403.
    fn resolve<'a>(
        &'a self,
        project: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<Resolved, ResolveError>>;
}

fn unavailable(e: impl std::fmt::Display) -> ResolveError {
    ResolveError::Unavailable(e.to_string())
}

/// A request that got no answer, said plainly (reqwest's own words hide a timeout).
fn transport(what: &str, e: &reqwest::Error) -> ResolveError {
    if e.is_timeout() {
        unavailable(format!("{what}: no answer in time (--auth-timeout)"))
    } else if e.is_connect() {
        unavailable(format!("{what}: cannot connect"))
    } else {
        unavailable(format!("{what}: {e}"))
    }
}

/// Reads a JSON answer of at most [`MAX_ANSWER_BYTES`]; 401 and 403 are a refusal.
async fn json_answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
    what: &str,
) -> Result<T, ResolveError> {
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(ResolveError::Denied);
    }
    if !status.is_success() {
        return Err(unavailable(format!("{what} answered HTTP {status}")));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(unavailable(format!("{what} answered more than 256 KiB")));
    }
    let body = response.bytes().await.map_err(unavailable)?;
    if body.len() > MAX_ANSWER_BYTES {
        return Err(unavailable(format!("{what} answered more than 256 KiB")));
    }
    serde_json::from_slice(&body).map_err(|e| unavailable(format!("{what} answered {e}")))
}

fn checked_user(id: String, what: &str) -> Result<String, ResolveError> {
    if crate::names::is_valid_id(&id) {
        Ok(id)
    } else {
        Err(unavailable(format!(
            "{what} answered a user id that is not {}",
            crate::names::ID_RULE
        )))
    }
}

/// `--auth-url`: the application's own endpoint. herald POSTs
/// `{"project": "...", "session": "..."}` and expects `200 {"userId": "...", "roles": [...],
/// "verified": true|false, "user": {...}}` (all but `userId` optional), or 401/403.
pub struct AuthUrl {
    client: reqwest::Client,
    url: String,
}

#[derive(Deserialize)]
struct AuthUrlAnswer {
    #[serde(rename = "userId")]
    user_id: String,
    #[serde(default)]
    roles: Vec<String>,
    verified: Option<bool>,
    user: Option<Value>,
}

impl AuthUrl {
    pub fn new(client: reqwest::Client, url: String) -> Self {
        Self { client, url }
    }
}

impl Backend for AuthUrl {
    fn name(&self) -> &'static str {
        "auth-url"
    }

    fn resolve<'a>(
        &'a self,
        project: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<Resolved, ResolveError>> {
        Box::pin(async move {
            let response = self
                .client
                .post(&self.url)
                .json(&json!({"project": project, "session": session}))
                .send()
                .await
                .map_err(|e| transport("--auth-url", &e))?;
            let a: AuthUrlAnswer = json_answer(response, "--auth-url").await?;
            let user = a.user.filter(Value::is_object).map(bounded_account);
            Ok(Resolved {
                user_id: checked_user(a.user_id, "--auth-url")?,
                verified: a.verified,
                roles: a.roles,
                account: user,
            })
        })
    }
}

/// `--appwrite-endpoint`: Appwrite's REST API, asked with the client's session as Appwrite's
/// own realtime does: `GET /account` for the user, `GET /teams` and each team's memberships
/// for `team:<t>`, `team:<t>/<role>` and `member:<m>` (confirmed memberships only), and the
/// user's labels for `label:<l>`.
pub struct AppwriteEndpoint {
    client: reqwest::Client,
    /// Without the trailing slash: `https://appwrite.example.com/v1`.
    endpoint: String,
}

#[derive(Deserialize)]
struct Account {
    #[serde(rename = "$id")]
    id: String,
    #[serde(default, rename = "emailVerification")]
    email_verification: bool,
    #[serde(default, rename = "phoneVerification")]
    phone_verification: bool,
    #[serde(default)]
    labels: Vec<String>,
}

#[derive(Deserialize)]
struct TeamList {
    #[serde(default)]
    teams: Vec<Team>,
}

#[derive(Deserialize)]
struct Team {
    #[serde(rename = "$id")]
    id: String,
}

#[derive(Deserialize)]
struct MembershipList {
    #[serde(default)]
    memberships: Vec<Membership>,
}

#[derive(Deserialize)]
struct Membership {
    #[serde(rename = "$id")]
    id: String,
    #[serde(default, rename = "userId")]
    user_id: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    confirm: bool,
}

impl AppwriteEndpoint {
    pub fn new(client: reqwest::Client, endpoint: &str) -> Self {
        Self {
            client,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: Option<Value>,
        project: &str,
        session: &str,
    ) -> Result<T, ResolveError> {
        let mut request = self
            .client
            .get(format!("{}{path}", self.endpoint))
            .header("X-Appwrite-Project", project)
            .header("X-Appwrite-Session", session)
            .header("X-Appwrite-Response-Format", "1.6.0");
        if let Some(q) = query {
            request = request.query(&[("queries[]", q.to_string())]);
        }
        let what = format!("Appwrite GET {path}");
        let response = request.send().await.map_err(|e| transport(&what, &e))?;
        json_answer(response, &what).await
    }

    /// The membership roles of `user` in one team.
    async fn team_roles(
        &self,
        team: &str,
        user: &str,
        project: &str,
        session: &str,
    ) -> Result<Vec<String>, ResolveError> {
        if !crate::names::is_valid_id(team) {
            return Err(unavailable(format!(
                "Appwrite GET /teams answered a team id that is not {}",
                crate::names::ID_RULE
            )));
        }
        let query = json!({"method": "equal", "attribute": "userId", "values": [user]});
        let path = format!("/teams/{team}/memberships");
        let list: MembershipList = self.get(&path, Some(query), project, session).await?;
        let mut roles = Vec::new();
        for m in list.memberships {
            if m.user_id != user || !m.confirm {
                continue;
            }
            roles.push(format!("team:{team}"));
            roles.push(format!("member:{}", m.id));
            roles.extend(m.roles.iter().map(|r| format!("team:{team}/{r}")));
        }
        Ok(roles)
    }
}

impl Backend for AppwriteEndpoint {
    fn name(&self) -> &'static str {
        "appwrite"
    }

    fn resolve<'a>(
        &'a self,
        project: &'a str,
        session: &'a str,
    ) -> BoxFuture<'a, Result<Resolved, ResolveError>> {
        Box::pin(async move {
            let user: Value = self.get("/account", None, project, session).await?;
            let account = Account::deserialize(&user)
                .map_err(|e| unavailable(format!("Appwrite GET /account answered {e}")))?;
            let id = checked_user(account.id, "Appwrite GET /account")?;
            let limit = json!({"method": "limit", "values": [MAX_TEAMS]});
            let teams: TeamList = self.get("/teams", Some(limit), project, session).await?;
            let ids: Vec<String> = teams
                .teams
                .into_iter()
                .take(MAX_TEAMS)
                .map(|t| t.id)
                .collect();
            let mut roles: Vec<String> = Vec::new();
            for chunk in ids.chunks(TEAM_LOOKUPS) {
                let mut lookups = Vec::with_capacity(chunk.len());
                for team in chunk {
                    lookups.push(self.team_roles(team, &id, project, session));
                }
                for team in futures_util::future::join_all(lookups).await {
                    roles.extend(team?);
                }
            }
            roles.extend(account.labels.iter().map(|l| format!("label:{l}")));
            roles.truncate(MAX_EXTRA_ROLES);
            Ok(Resolved {
                user_id: id,
                verified: Some(account.email_verification || account.phone_verification),
                roles,
                account: Some(bounded_account(user)),
            })
        })
    }
}

/// The Account object as clients get it, cut to `$id` and `name` beyond [`MAX_ACCOUNT_BYTES`].
fn bounded_account(account: Value) -> Value {
    if account.to_string().len() <= MAX_ACCOUNT_BYTES {
        return account;
    }
    json!({"$id": account["$id"], "name": account["name"]})
}

/// What a cached answer costs, roughly, for the cache's byte budget.
fn weight(cached: &Cached) -> u32 {
    let bytes = match &cached.outcome {
        Ok(r) => {
            let account = r.account.as_ref().map_or(0, |a| a.to_string().len());
            128 + account + r.roles.iter().map(|x| x.len() + 24).sum::<usize>()
        }
        Err(_) => 128,
    };
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Settings of the resolver (from `--auth-*`).
#[derive(Debug, Clone, Copy)]
pub struct ResolverSettings {
    pub timeout: Duration,
    pub cache_ttl: Duration,
    pub concurrency: usize,
}

/// A cached answer and when it was fetched.
#[derive(Clone)]
struct Cached {
    outcome: Result<Arc<Resolved>, ResolveError>,
    fetched: Instant,
}

/// Wakes [`Resolver::serve`] when a shard queued a request.
pub type ResolveBell = Bell;

/// The resolver: a backend, its cache, and the way back to the shards.
pub struct Resolver {
    backend: Arc<dyn Backend>,
    cache: moka::future::Cache<[u8; 32], Cached>,
    settings: ResolverSettings,
    hub: Arc<Hub>,
    metrics: Metrics,
}

impl Resolver {
    pub fn new(
        backend: Arc<dyn Backend>,
        settings: ResolverSettings,
        hub: Arc<Hub>,
        metrics: Metrics,
    ) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(CACHE_BYTES)
            .weigher(|_, v: &Cached| weight(v))
            .time_to_live(
                settings
                    .cache_ttl
                    .clamp(Duration::from_millis(1), MAX_CACHE_TTL),
            )
            .build();
        Self {
            backend,
            cache,
            settings,
            hub,
            metrics,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Runs until every shard has dropped its sender.
    pub async fn serve(self: Arc<Self>, requests: ResolveReceiver, bell: Arc<ResolveBell>) {
        let permits = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        while let Some(req) = next_request(&requests, &bell).await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            tokio::spawn(async move { me.answer(req, permit).await });
        }
    }

    /// Runs [`Resolver::serve`] on a thread of its own with its own runtime.
    pub fn spawn(
        self: Arc<Self>,
        requests: ResolveReceiver,
        bell: Arc<ResolveBell>,
    ) -> std::io::Result<()> {
        crate::doorbell::serve_on_own_thread("herald-resolver", self.serve(requests, bell))
    }

    /// Resolves one request under its concurrency permit, then hands the answer back (the
    /// permit is let go first: a shard slow to take answers must not stall the others).
    async fn answer(&self, req: IdentityRequest, permit: tokio::sync::OwnedSemaphorePermit) {
        let (outcome, fetched) = self.resolve(&req.project, req.session.expose()).await;
        drop(permit);
        let mut answer = Answer::Identity(IdentityAnswer {
            key: req.key,
            serial: req.serial,
            purpose: req.purpose,
            project: req.project,
            session: req.session,
            fetched,
            outcome,
        });
        loop {
            match self.hub.send_answer(req.shard, answer) {
                Ok(()) | Err(AnswerRefused::Gone) => break,
                Err(AnswerRefused::Full(back)) => {
                    answer = back;
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// The user `session` is in `project`, and when that answer was fetched: from the cache
    /// unless stale, else from the backend (one call for concurrent requests of the same
    /// session, which may have begun before a permission change: then it is fetched again),
    /// within the timeout.
    pub async fn resolve(
        &self,
        project: &str,
        session: &str,
    ) -> (Result<Arc<Resolved>, ResolveError>, Instant) {
        let key = cache_key(project, session);
        if let Some(hit) = self.cache.get(&key).await {
            if !self.is_stale(project, &hit) {
                self.count(&hit.outcome, true);
                return (hit.outcome, hit.fetched);
            }
            self.cache.invalidate(&key).await;
        }
        for _ in 1..FETCH_ATTEMPTS {
            match self.fetch(key, project, session).await {
                Ok(c) if self.is_stale(project, &c) => self.cache.invalidate(&key).await,
                Ok(c) => return self.counted(c.outcome, c.fetched),
                Err(e) => return self.counted(Err(e), Instant::now()),
            }
        }
        match self.fetch(key, project, session).await {
            Ok(c) => self.counted(c.outcome, c.fetched),
            Err(e) => self.counted(Err(e), Instant::now()),
        }
    }

    fn counted(
        &self,
        outcome: Result<Arc<Resolved>, ResolveError>,
        fetched: Instant,
    ) -> (Result<Arc<Resolved>, ResolveError>, Instant) {
        self.count(&outcome, false);
        (outcome, fetched)
    }

    /// One answer through the cache: joins a call in flight for the same key, or makes one.
    async fn fetch(
        &self,
        key: [u8; 32],
        project: &str,
        session: &str,
    ) -> Result<Cached, ResolveError> {
        let fetch = async {
            let started = Instant::now();
            let called = self.backend.resolve(project, session);
            match tokio::time::timeout(self.settings.timeout, called).await {
                Ok(Err(ResolveError::Unavailable(e))) => Err(ResolveError::Unavailable(e)),
                Ok(outcome) => Ok(Cached {
                    outcome: outcome.map(Arc::new),
                    fetched: started,
                }),
                Err(_) => Err(unavailable(format!(
                    "no answer within {:?} (--auth-timeout)",
                    self.settings.timeout
                ))),
            }
        };
        // Refusals are cached like users; failures are not, so the next attempt asks again.
        self.cache
            .try_get_with(key, fetch)
            .await
            .map_err(|e| (*e).clone())
    }

    fn is_stale(&self, project: &str, hit: &Cached) -> bool {
        let Ok(user) = &hit.outcome else {
            return false;
        };
        self.hub
            .permissions_changed_at(project, &user.user_id)
            .is_some_and(|at| at >= hit.fetched)
    }

    fn count(&self, outcome: &Result<Arc<Resolved>, ResolveError>, cached: bool) {
        let label = match outcome {
            Ok(_) => "ok",
            Err(ResolveError::Denied) => "denied",
            Err(ResolveError::Unavailable(e)) => {
                if !cached {
                    tracing::warn!(backend = self.backend.name(), error = %e, "a session could not be resolved; the client stays a guest");
                }
                "unavailable"
            }
        };
        let cached = if cached { "true" } else { "false" };
        self.metrics
            .resolutions
            .with_label_values(&[label, cached])
            .inc();
    }
}

/// What the cache knows a session by: a hash, so that the cache holds no session secrets.
fn cache_key(project: &str, session: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(project.as_bytes());
    h.update([0]);
    h.update(session.as_bytes());
    h.finalize().into()
}

/// The backend the settings name, if any.
pub fn backend(
    auth_url: Option<&str>,
    appwrite_endpoint: Option<&str>,
    timeout: Duration,
) -> Result<Option<Arc<dyn Backend>>, reqwest::Error> {
    if auth_url.is_none() && appwrite_endpoint.is_none() {
        return Ok(None);
    }
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(Some(match (auth_url, appwrite_endpoint) {
        (Some(url), _) => Arc::new(AuthUrl::new(client, url.to_owned())),
        (None, Some(endpoint)) => Arc::new(AppwriteEndpoint::new(client, endpoint)),
        (None, None) => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_separates_project_and_session() {
        assert_ne!(cache_key("ab", "c"), cache_key("a", "bc"));
        assert_eq!(cache_key("p", "s"), cache_key("p", "s"));
    }
}
