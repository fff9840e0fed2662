//! Who is asking: reviewer tokens, web sessions, CSRF and the failure throttle.
//!
//! Tokens are random secrets that Airlock never stores: the tokens file holds their
//! SHA-256 with a name and a role. A presented token is hashed and compared against
//! every entry in constant time ([`subtle`]), so response timing says nothing about
//! how close a guess was. The file is reread (at most once a second) when its bytes
//! change, so adding or revoking a token needs no restart; a file that no longer
//! parses is refused and the last good one stays in force.
//!
//! The web page signs in once with a token and then holds a session cookie. A session
//! lives in memory (a restart signs everyone out), expires after the configured TTL,
//! and dies with its token: each request looks the token's entry up again. Requests
//! that change something and arrive with the cookie must carry the session's CSRF
//! token in `X-Airlock-CSRF` and, when the browser says where they come from
//! (`Origin`, `Sec-Fetch-Site`), come from the endpoint's own origin or `review.public_url`.
//!
//! Failed authentications are counted in a one-minute window. Past
//! [`FAILURES_BEFORE_THROTTLE`], each further failure waits before its answer (longer
//! as failures go on) and is answered `429` with `Retry-After`. A valid credential is
//! never delayed, so a hostile neighbour hammering the endpoint cannot lock approvers
//! out; tokens carry 256 random bits, so the throttle bounds noise and work, not the
//! odds of a guess.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::{error, info, warn};

/// Failed authentications per window before answers slow down.
pub const FAILURES_BEFORE_THROTTLE: u32 = 10;
/// The window failures are counted in.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// The longest a throttled failure waits.
const MAX_PENALTY: Duration = Duration::from_secs(2);
/// How often the tokens file is looked at again.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Prefix of tokens made by `airlock token add`, so a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "alr_";

/// What a reviewer may do. Each role may do everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read intents, runs and history.
    Viewer,
    /// Also approve and reject.
    Approver,
    /// Also undo runs.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }

    /// The role with its indefinite article, for messages: "a viewer", "an approver",
    /// "an admin".
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Viewer => "a viewer",
            Role::Approver => "an approver",
            Role::Admin => "an admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "approver" => Ok(Role::Approver),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: use viewer, approver or admin"
            )),
        }
    }
}

/// One entry of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

/// The parsed tokens file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    token: Vec<EntryFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    name: String,
    role: String,
    sha256: String,
}

impl Tokens {
    /// Parses a tokens file: `[[token]]` tables with `name`, `role` and `sha256`
    /// (64 hex digits). Names and hashes must be unique.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut entries: Vec<Entry> = Vec::with_capacity(file.token.len());
        for (index, entry) in file.token.into_iter().enumerate() {
            let at = format!("token {} ({:?})", index + 1, entry.name);
            let name = entry.name.trim();
            if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
                return Err(format!("{at}: name must be 1 to 256 printable characters"));
            }
            let role = entry
                .role
                .parse::<Role>()
                .map_err(|e| format!("{at}: {e}"))?;
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(entry.sha256.trim(), &mut sha256).map_err(|_| {
                format!("{at}: sha256 must be 64 hex digits (the SHA-256 of the token)")
            })?;
            if entries.iter().any(|e| e.name == name) {
                return Err(format!("{at}: the name {name:?} is used twice"));
            }
            if entries.iter().any(|e| e.sha256 == sha256) {
                return Err(format!("{at}: the same token hash is listed twice"));
            }
            entries.push(Entry {
                name: name.to_owned(),
                role,
                sha256,
            });
        }
        Ok(Self { entries })
    }

    /// The entry whose hash is `digest`, comparing against every entry in constant
    /// time.
    pub fn find(&self, digest: &[u8; 32]) -> Option<&Entry> {
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.sha256.ct_eq(digest)) {
                found = Some(entry);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The SHA-256 of a token as the tokens file lists it.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random token: [`TOKEN_PREFIX`] and 256 random bits, URL-safe base64.
pub fn new_token() -> Result<String, getrandom::Error> {
    Ok(format!("{TOKEN_PREFIX}{}", random_b64()?))
}

fn random_b64() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The tokens-file entry for `token`, as `airlock token add` appends it.
pub fn entry_toml(name: &str, role: Role, token: &str) -> String {
    let name = toml::Value::String(name.to_owned());
    format!(
        "\n[[token]]\nname = {name}\nrole = \"{role}\"\nsha256 = \"{}\"\n",
        hex::encode(token_hash(token))
    )
}

/// Who made a request, and how they proved it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
    pub via: Via,
}

/// How a request was authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// An `Authorization: Bearer` token: no ambient credential, no CSRF risk.
    Bearer,
    /// The session cookie, with the session's CSRF token.
    Session { csrf: String },
}

struct Session {
    name: String,
    token: [u8; 32],
    csrf: String,
    expires: Instant,
}

struct Loaded {
    tokens: Arc<Tokens>,
    file_digest: Option<[u8; 32]>,
    checked: Option<Instant>,
}

struct Failures {
    window_start: Instant,
    count: u32,
}

/// Tokens, sessions and the failure throttle of one endpoint.
pub struct Auth {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<Failures>,
    session_ttl: Duration,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("path", &self.path).finish()
    }
}

/// A started session: the cookie value to set and the CSRF token to hand out.
#[derive(Debug)]
pub struct NewSession {
    pub id: String,
    pub csrf: String,
    pub name: String,
    pub role: Role,
}

impl Auth {
    /// Tokens from `path` (read now and whenever it changes).
    pub fn new(path: PathBuf, session_ttl: Duration) -> Self {
        let auth = Self {
            path,
            loaded: RwLock::new(Loaded {
                tokens: Arc::new(Tokens::default()),
                file_digest: None,
                checked: None,
            }),
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(Failures {
                window_start: Instant::now(),
                count: 0,
            }),
            session_ttl,
        };
        auth.tokens();
        auth
    }

    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// The current tokens, rereading the file when it changed.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.load(false)
    }

    /// The entry for a token digest. A miss rereads the file at once, so a token
    /// added a moment ago works on its first use.
    fn find(&self, digest: &[u8; 32]) -> Option<Entry> {
        if let Some(entry) = self.load(false).find(digest) {
            return Some(entry.clone());
        }
        self.load(true).find(digest).cloned()
    }

    fn load(&self, force: bool) -> Arc<Tokens> {
        let fresh = |l: &Loaded| !force && l.checked.is_some_and(|at| at.elapsed() < RELOAD_EVERY);
        if let Ok(loaded) = self.loaded.read()
            && fresh(&loaded)
        {
            return loaded.tokens.clone();
        }
        let Ok(mut loaded) = self.loaded.write() else {
            return Arc::new(Tokens::default());
        };
        if fresh(&loaded) {
            return loaded.tokens.clone();
        }
        loaded.checked = Some(Instant::now());
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let digest: [u8; 32] = Sha256::digest(&bytes).into();
                if loaded.file_digest != Some(digest) {
                    loaded.file_digest = Some(digest);
                    match std::str::from_utf8(&bytes)
                        .map_err(|e| e.to_string())
                        .and_then(Tokens::parse)
                    {
                        Ok(tokens) => {
                            info!(
                                message = "reviewer tokens loaded",
                                file = %self.path.display(),
                                tokens = tokens.len()
                            );
                            loaded.tokens = Arc::new(tokens);
                        }
                        Err(problem) => error!(
                            message = "reviewer tokens file refused; the last good one stays in force",
                            file = %self.path.display(),
                            %problem
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if loaded.file_digest.is_some() || loaded.tokens.is_empty() {
                    if !loaded.tokens.is_empty() {
                        warn!(message = "reviewer tokens file removed: no one can sign in", file = %self.path.display());
                    }
                    loaded.tokens = Arc::new(Tokens::default());
                    loaded.file_digest = None;
                }
            }
            Err(error) => error!(
                message = "cannot read the reviewer tokens file; the last good one stays in force",
                file = %self.path.display(),
                %error
            ),
        }
        loaded.tokens.clone()
    }

    /// The holder of bearer token `token`.
    pub fn bearer(&self, token: &str) -> Option<Identity> {
        let entry = self.find(&token_hash(token))?;
        Some(Identity {
            name: entry.name.clone(),
            role: entry.role,
            via: Via::Bearer,
        })
    }

    /// Starts a session for `token`'s holder.
    pub fn sign_in(&self, token: &str) -> Option<Result<NewSession, getrandom::Error>> {
        let digest = token_hash(token);
        let entry = self.find(&digest)?;
        let start = || -> Result<NewSession, getrandom::Error> {
            let id = random_b64()?;
            let csrf = random_b64()?;
            let now = Instant::now();
            if let Ok(mut sessions) = self.sessions.lock() {
                sessions.retain(|_, s| s.expires > now);
                sessions.insert(
                    Sha256::digest(id.as_bytes()).into(),
                    Session {
                        name: entry.name.clone(),
                        token: digest,
                        csrf: csrf.clone(),
                        expires: now + self.session_ttl,
                    },
                );
            }
            Ok(NewSession {
                id,
                csrf,
                name: entry.name.clone(),
                role: entry.role,
            })
        };
        Some(start())
    }

    /// The holder of session `id`, if it is live and its token still valid.
    pub fn session(&self, id: &str) -> Option<Identity> {
        let key: [u8; 32] = Sha256::digest(id.as_bytes()).into();
        let (token, csrf, name) = {
            let mut sessions = self.sessions.lock().ok()?;
            let session = sessions.get(&key)?;
            if session.expires <= Instant::now() {
                sessions.remove(&key);
                return None;
            }
            (session.token, session.csrf.clone(), session.name.clone())
        };
        let tokens = self.tokens();
        let entry = tokens.find(&token)?;
        if entry.name != name {
            return None;
        }
        Some(Identity {
            name,
            role: entry.role,
            via: Via::Session { csrf },
        })
    }

    /// Whether `headers` carry a current reviewer's credential: a bearer token the
    /// tokens file holds or, without an `Authorization` header, a live session in
    /// cookie `session_cookie`, as the API's own check would find. The endpoint keeps
    /// such requests' connections when it is full; this decides nothing else.
    pub fn vouches_for(&self, headers: &axum::http::HeaderMap, session_cookie: &str) -> bool {
        if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
            return value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .is_some_and(|token| self.find(&token_hash(token)).is_some());
        }
        headers
            .get_all(axum::http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == session_cookie)
            .any(|(_, id)| self.session(id).is_some())
    }

    /// Ends session `id`.
    pub fn sign_out(&self, id: &str) {
        let key: [u8; 32] = Sha256::digest(id.as_bytes()).into();
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(&key);
        }
    }

    /// Counts a failed authentication. Returns how long to wait before answering
    /// when the throttle is on (`None`: answer now).
    pub fn failed(&self) -> Option<(Duration, Duration)> {
        let Ok(mut failures) = self.failures.lock() else {
            return Some((MAX_PENALTY, FAILURE_WINDOW));
        };
        let now = Instant::now();
        if now.duration_since(failures.window_start) >= FAILURE_WINDOW {
            failures.window_start = now;
            failures.count = 0;
        }
        failures.count = failures.count.saturating_add(1);
        let over = failures.count.checked_sub(FAILURES_BEFORE_THROTTLE)?;
        if over == 0 {
            return None;
        }
        if over == 1 {
            warn!(
                message = "repeated failed sign-ins; slowing further failures down",
                failures = failures.count
            );
        }
        let wait = Duration::from_millis(50u64.saturating_mul(1 << over.min(6))).min(MAX_PENALTY);
        let retry_after = FAILURE_WINDOW.saturating_sub(now.duration_since(failures.window_start));
        Some((wait, retry_after))
    }
}

/// Whether a presented CSRF token matches the session's, in constant time.
pub fn csrf_matches(expected: &str, presented: &str) -> bool {
    bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, &str)]) -> String {
        entries
            .iter()
            .map(|(name, role, token)| entry_toml(name, role.parse().unwrap(), token))
            .collect()
    }

    #[test]
    fn tokens_are_found_by_hash_only() {
        let tokens = Tokens::parse(&file(&[
            ("alice", "approver", "alr_one"),
            ("bob", "viewer", "alr_two"),
        ]))
        .unwrap();
        assert_eq!(tokens.find(&token_hash("alr_one")).unwrap().name, "alice");
        assert_eq!(
            tokens.find(&token_hash("alr_two")).unwrap().role,
            Role::Viewer
        );
        assert!(tokens.find(&token_hash("alr_three")).is_none());
        assert!(tokens.find(&token_hash("")).is_none());
    }

    #[test]
    fn bad_files_name_the_entry_and_the_problem() {
        let cases = [
            (
                "[[token]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"00\"\n",
                "unknown role \"root\"",
            ),
            (
                "[[token]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"zz\"\n",
                "64 hex digits",
            ),
            (
                "[[token]]\nname = \" \"\nrole = \"admin\"\nsha256 = \"00\"\n",
                "name must be",
            ),
            (
                "[[token]]\nname = \"a\"\nrole = \"admin\"\nsha = \"00\"\n",
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let error = Tokens::parse(text).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let twice = file(&[("a", "admin", "t1"), ("a", "viewer", "t2")]);
        assert!(Tokens::parse(&twice).unwrap_err().contains("used twice"));
        let same = file(&[("a", "admin", "t1"), ("b", "viewer", "t1")]);
        assert!(Tokens::parse(&same).unwrap_err().contains("listed twice"));
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer < Role::Approver && Role::Approver < Role::Admin);
    }

    #[test]
    fn sessions_die_with_their_token_and_on_sign_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file(&[("alice", "approver", "alr_a")])).unwrap();
        let auth = Auth::new(path.clone(), Duration::from_secs(60));
        assert!(auth.sign_in("alr_wrong").is_none());
        let session = auth.sign_in("alr_a").unwrap().unwrap();
        let who = auth.session(&session.id).unwrap();
        assert_eq!((who.name.as_str(), who.role), ("alice", Role::Approver));
        assert_eq!(
            who.via,
            Via::Session {
                csrf: session.csrf.clone()
            }
        );
        assert!(auth.session("forged").is_none());

        auth.sign_out(&session.id);
        assert!(auth.session(&session.id).is_none());

        // Revoking the token ends its sessions once the file is reread.
        let session = auth.sign_in("alr_a").unwrap().unwrap();
        std::fs::write(&path, file(&[("bob", "viewer", "alr_b")])).unwrap();
        auth.loaded.write().unwrap().checked = None;
        assert!(auth.session(&session.id).is_none());
        assert!(auth.bearer("alr_a").is_none());
        assert_eq!(auth.bearer("alr_b").unwrap().name, "bob");
    }

    #[test]
    fn only_current_credentials_vouch_for_a_request() {
        use axum::http::{HeaderMap, HeaderValue, header};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file(&[("alice", "viewer", "alr_a")])).unwrap();
        let auth = Auth::new(path, Duration::from_secs(60));
        let session = auth.sign_in("alr_a").unwrap().unwrap();
        let with = |pairs: &[(header::HeaderName, String)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.append(name, HeaderValue::from_str(value).unwrap());
            }
            auth.vouches_for(&headers, "s")
        };
        assert!(with(&[(header::AUTHORIZATION, "Bearer alr_a".into())]));
        assert!(with(&[(header::COOKIE, format!("x=1; s={}", session.id))]));
        assert!(!with(&[]));
        assert!(!with(&[(header::AUTHORIZATION, "Bearer alr_b".into())]));
        assert!(!with(&[(header::AUTHORIZATION, "alr_a".into())]));
        assert!(!with(&[(header::COOKIE, "s=forged".into())]));
        assert!(!with(&[(header::COOKIE, format!("t={}", session.id))]));
        // As in the API, a bad bearer token is not rescued by a good cookie.
        assert!(!with(&[
            (header::AUTHORIZATION, "Bearer alr_b".into()),
            (header::COOKIE, format!("s={}", session.id)),
        ]));
    }

    #[test]
    fn a_broken_file_keeps_the_last_good_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file(&[("alice", "admin", "alr_a")])).unwrap();
        let auth = Auth::new(path.clone(), Duration::from_secs(60));
        std::fs::write(&path, "[[token]]\nname = ").unwrap();
        auth.loaded.write().unwrap().checked = None;
        assert_eq!(auth.bearer("alr_a").unwrap().role, Role::Admin);
    }

    #[test]
    fn failures_are_throttled_after_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::new(dir.path().join("none.toml"), Duration::from_secs(60));
        for _ in 0..FAILURES_BEFORE_THROTTLE {
            assert!(auth.failed().is_none());
        }
        let (wait, retry_after) = auth.failed().unwrap();
        assert!(wait > Duration::ZERO && wait <= MAX_PENALTY);
        assert!(retry_after <= FAILURE_WINDOW);
        let (longer, _) = auth.failed().unwrap();
        assert!(longer >= wait);
    }

    #[test]
    fn new_tokens_are_distinct_and_prefixed() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 43);
        assert!(csrf_matches(&a, &a) && !csrf_matches(&a, &b));
    }
}
