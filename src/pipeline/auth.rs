//! `[http.auth]`: who may use the HTTP server. Browsers and people sign in with HTTP Basic against
//! argon2 password hashes (`password_file`: `user:$argon2id$…` lines, as `argon2 <salt> -id -e`
//! prints them); API clients send `Authorization: Bearer <token>`, checked against the SHA-256 of
//! each token (`token_file`: one hex digest per line; `metrics_token_file`: tokens that may only
//! read `/metrics`). Secrets stay out of the configuration and
//! the command line. `/health` stays open (it says only whether cameras run).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `[http.auth]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `user:<argon2 PHC hash>` per line (`#` comments).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The SHA-256 (hex) of one API token per line (`#` comments).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// As `token_file`, for tokens that may only read `/metrics` (a Prometheus scrape job).
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
}

impl AuthConfig {
    pub fn is_on(&self) -> bool {
        self.password_file.is_some()
            || self.token_file.is_some()
            || self.metrics_token_file.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("http.auth.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("http.auth.password_file {path}, line {line}: {message}")]
    Password {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("http.auth.{key} {path}, line {line}: expected a SHA-256 in hex (64 digits)")]
    Token {
        key: &'static str,
        path: PathBuf,
        line: usize,
    },
    #[error(
        "http.bind = `{bind}` is reachable from other machines but [http.auth] is not set: add http.auth.password_file and/or http.auth.token_file, or bind to 127.0.0.1"
    )]
    Unprotected { bind: String },
}

/// An argon2id hash (default parameters) that no password in use matches, checked for unknown
/// users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c3RwbS1kdW1teS1zYWx0$uj3qGmsK2F6ZJkmyRZK3dKwsxgqLLXAgH0TfGXjGn/s";

/// The credentials, loaded at the start and read again on SIGHUP ([`Auth::reload`]).
pub struct Auth {
    config: AuthConfig,
    credentials: RwLock<Credentials>,
    /// `user:sha256(password)` of credentials already verified (argon2 is slow on purpose; a
    /// browser sends its credentials with every request).
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Failed password checks per client address.
    pub throttle: Throttle,
}

/// What the credential files say.
struct Credentials {
    /// User name → argon2 PHC hash.
    users: HashMap<String, String>,
    /// SHA-256 of each API token.
    tokens: HashSet<[u8; 32]>,
    /// SHA-256 of each token that may only read `/metrics`.
    metrics_tokens: HashSet<[u8; 32]>,
}

impl Credentials {
    fn read(config: &AuthConfig) -> Result<Self, AuthError> {
        let mut users = HashMap::new();
        if let Some(path) = &config.password_file {
            for (line, text) in lines("password_file", path)? {
                let error = |message: &str| AuthError::Password {
                    path: path.clone(),
                    line,
                    message: message.to_string(),
                };
                let (user, hash) = text
                    .split_once(':')
                    .ok_or_else(|| error("expected user:hash"))?;
                PasswordHash::new(hash).map_err(|e| error(&format!("not an argon2 hash ({e})")))?;
                users.insert(user.to_string(), hash.to_string());
            }
        }
        Ok(Self {
            users,
            tokens: token_digests("token_file", config.token_file.as_deref())?,
            metrics_tokens: token_digests(
                "metrics_token_file",
                config.metrics_token_file.as_deref(),
            )?,
        })
    }
}

/// Failed password checks a client address may make in [`FAILURE_WINDOW`]; beyond that its
/// passwords not verified before are refused (429) without hashing, so a flood of guesses cannot
/// keep the cores busy with argon2.
pub const FAILURES_ALLOWED: u32 = 10;
/// See [`FAILURES_ALLOWED`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses remembered at most; past it, those whose window has ended are forgotten.
const CLIENTS_TRACKED: usize = 4096;

/// Counts failed password checks per client address, in windows of [`FAILURE_WINDOW`] from each
/// address's first failure.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Throttle {
    /// `Err(wait)` while `client` (`None`: an unknown address, counted as one) has used its
    /// failed checks up; `wait` is the rest of its window.
    pub fn check(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let client = client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let Ok(failures) = self.failures.lock() else {
            return Ok(());
        };
        match failures.get(&client) {
            Some(&(since, count)) if count >= FAILURES_ALLOWED => {
                let wait = FAILURE_WINDOW.saturating_sub(now.saturating_duration_since(since));
                if wait.is_zero() { Ok(()) } else { Err(wait) }
            }
            _ => Ok(()),
        }
    }

    /// Counts a failed check of `client`.
    pub fn failed(&self, client: Option<IpAddr>, now: Instant) {
        let client = client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        if failures.len() >= CLIENTS_TRACKED && !failures.contains_key(&client) {
            failures.retain(|_, (since, _)| now.saturating_duration_since(*since) < FAILURE_WINDOW);
        }
        let entry = failures.entry(client).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// The non-empty, non-comment lines of `path` with their numbers.
fn lines(key: &'static str, path: &Path) -> Result<Vec<(usize, String)>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim().to_string()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .collect())
}

impl Auth {
    /// Loads `config`'s files, or `None` when auth is off; refuses to run open on an address other
    /// machines can reach.
    pub fn load(config: &AuthConfig, bind: &str) -> Result<Option<Self>, AuthError> {
        if !config.is_on() {
            let loopback = bind
                .parse::<SocketAddr>()
                .is_ok_and(|address| address.ip().is_loopback());
            if !loopback {
                return Err(AuthError::Unprotected {
                    bind: bind.to_string(),
                });
            }
            return Ok(None);
        }
        Ok(Some(Self {
            credentials: RwLock::new(Credentials::read(config)?),
            config: config.clone(),
            verified: Mutex::default(),
            throttle: Throttle::default(),
        }))
    }

    /// Reads the credential files again (SIGHUP): users, passwords and tokens removed or changed
    /// stop working at once, as the passwords verified before are forgotten. On an error the
    /// credentials in use stay. Returns how many users, tokens and metrics tokens there are now.
    pub fn reload(&self) -> Result<(usize, usize, usize), AuthError> {
        let fresh = Credentials::read(&self.config)?;
        let counts = (
            fresh.users.len(),
            fresh.tokens.len(),
            fresh.metrics_tokens.len(),
        );
        let mut credentials = self
            .credentials
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *credentials = fresh;
        // Cleared before the new credentials are readable: a check that hashed against the old
        // ones cannot remember its password after this (see `check`).
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        drop(credentials);
        Ok(counts)
    }

    fn credentials(&self) -> std::sync::RwLockReadGuard<'_, Credentials> {
        self.credentials
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the `Authorization` header value is a token of `metrics_token_file` (which may
    /// read `/metrics` and nothing else).
    pub fn is_metrics_token(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|token| {
                let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
                self.credentials().metrics_tokens.contains(&digest)
            })
    }

    /// Whether the `Authorization` header value admits the request.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        self.identify(authorization).is_some()
    }

    /// Who the `Authorization` header value signs in: the user of valid Basic credentials,
    /// `token` for a valid bearer token, `None` otherwise.
    pub fn identify(&self, authorization: Option<&str>) -> Option<String> {
        self.check(authorization)
            .then(|| Self::name_in(authorization))
    }

    /// [`Auth::identify`] where it needs no password hash: a bearer token, a header that admits
    /// nothing, or Basic credentials verified before. `None` when only the argon2 check can tell
    /// (run that one off the async threads, a few at a time).
    pub fn identify_quickly(&self, authorization: Option<&str>) -> Option<Option<String>> {
        match self.quick_check(authorization) {
            Quick::Admitted => Some(Some(Self::name_in(authorization))),
            Quick::Refused => Some(None),
            Quick::NeedsHash { .. } => None,
        }
    }

    /// The user named by Basic credentials, or `token`.
    fn name_in(authorization: Option<&str>) -> String {
        authorization
            .and_then(|value| value.strip_prefix("Basic "))
            .and_then(|encoded| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
            })
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|credentials| credentials.split_once(':').map(|(u, _)| u.to_string()))
            .unwrap_or_else(|| "token".into())
    }

    fn check(&self, authorization: Option<&str>) -> bool {
        let (credentials, key) = match self.quick_check(authorization) {
            Quick::Admitted => return true,
            Quick::Refused => return false,
            Quick::NeedsHash { credentials, key } => (credentials, key),
        };
        let Some((user, password)) = credentials.split_once(':') else {
            return false;
        };
        // An unknown user costs the same argon2 check as a known one: the time of a refusal
        // does not tell which user names exist.
        let (hash, known) = match self.credentials().users.get(user) {
            Some(hash) => (hash.clone(), true),
            None => (DUMMY_HASH.to_string(), false),
        };
        let good = PasswordHash::new(&hash).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        }) && known;
        if !good {
            return false;
        }
        // A reload may have come while hashing: the password counts (and is remembered) only
        // if the user still has the hash it was checked against.
        let credentials = self.credentials();
        if credentials.users.get(user) != Some(&hash) {
            return false;
        }
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
        drop(credentials);
        true
    }

    /// Everything but the argon2 check.
    fn quick_check(&self, authorization: Option<&str>) -> Quick {
        let Some(value) = authorization else {
            return Quick::Refused;
        };
        if let Some(token) = value.strip_prefix("Bearer ") {
            let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
            return if self.credentials().tokens.contains(&digest) {
                Quick::Admitted
            } else {
                Quick::Refused
            };
        }
        let Some(encoded) = value.strip_prefix("Basic ") else {
            return Quick::Refused;
        };
        if self.credentials().users.is_empty() {
            // No password_file: no password can be right, and no user name can leak.
            return Quick::Refused;
        }
        let Some(credentials) = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
        else {
            return Quick::Refused;
        };
        if !credentials.contains(':') {
            return Quick::Refused;
        }
        let key: [u8; 32] = Sha256::digest(credentials.as_bytes()).into();
        if self.verified.lock().is_ok_and(|seen| seen.contains(&key)) {
            return Quick::Admitted;
        }
        Quick::NeedsHash { credentials, key }
    }
}

/// The SHA-256 digests listed in `path` (`http.auth.<key>`), none without a file.
fn token_digests(key: &'static str, path: Option<&Path>) -> Result<HashSet<[u8; 32]>, AuthError> {
    let mut digests = HashSet::new();
    if let Some(path) = path {
        for (line, text) in lines(key, path)? {
            let digest = hex32(&text).ok_or_else(|| AuthError::Token {
                key,
                path: path.to_path_buf(),
                line,
            })?;
            digests.insert(digest);
        }
    }
    Ok(digests)
}

/// What a credential check can tell without hashing a password.
enum Quick {
    Admitted,
    Refused,
    /// Basic credentials (`user:password`) not verified before, and their cache key.
    NeedsHash {
        credentials: String,
        key: [u8; 32],
    },
}

/// 32 bytes from 64 hex digits.
fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;

    /// A password file with `anna:secret` and a token file with `t0ken`, in `dir`.
    pub(crate) fn files(dir: &Path) -> AuthConfig {
        let salt = SaltString::encode_b64(b"a fixed salt").expect("salt");
        let hash = Argon2::default()
            .hash_password(b"secret", &salt)
            .expect("hash")
            .to_string();
        let passwords = dir.join("passwords");
        std::fs::write(&passwords, format!("# operators\nanna:{hash}\n")).expect("write");
        let hex = |token: &[u8]| -> String {
            Sha256::digest(token)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("{}\n", hex(b"t0ken"))).expect("write");
        let scrape = dir.join("metrics-tokens");
        std::fs::write(&scrape, format!("# prometheus\n{}\n", hex(b"scr4pe"))).expect("write");
        AuthConfig {
            password_file: Some(passwords),
            token_file: Some(tokens),
            metrics_token_file: Some(scrape),
        }
    }

    pub(crate) fn basic(credentials: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    #[test]
    fn basic_and_bearer_credentials_are_checked() {
        let dir = tempfile::tempdir().expect("dir");
        let auth = Auth::load(&files(dir.path()), "0.0.0.0:9090")
            .expect("load")
            .expect("on");
        // A password not seen yet needs the argon2 check; once verified, it does not.
        assert_eq!(auth.identify_quickly(Some(&basic("anna:secret"))), None);
        assert!(auth.admits(Some(&basic("anna:secret"))));
        assert_eq!(
            auth.identify_quickly(Some(&basic("anna:secret"))),
            Some(Some("anna".into()))
        );
        // Again, from the cache of verified credentials.
        assert!(auth.admits(Some(&basic("anna:secret"))));
        // Tokens and headers that admit nothing are decided without a hash.
        assert_eq!(
            auth.identify_quickly(Some("Bearer t0ken")),
            Some(Some("token".into()))
        );
        assert_eq!(auth.identify_quickly(Some("Bearer nope")), Some(None));
        assert_eq!(auth.identify_quickly(Some("Basic !!!")), Some(None));
        assert_eq!(auth.identify_quickly(None), Some(None));
        assert_eq!(auth.identify_quickly(Some(&basic("anna:wrong"))), None);
        assert!(!auth.admits(Some(&basic("anna:Secret"))));
        assert!(!auth.admits(Some(&basic("bob:secret"))));
        assert!(auth.admits(Some("Bearer t0ken")));
        assert_eq!(
            auth.identify(Some("Bearer t0ken")).as_deref(),
            Some("token")
        );
        assert_eq!(
            auth.identify(Some(&basic("anna:secret"))).as_deref(),
            Some("anna")
        );
        assert_eq!(auth.identify(Some(&basic("anna:guess"))), None);
        assert!(!auth.admits(Some("Bearer token")));
        assert!(!auth.admits(Some("Basic !!!")));
        assert!(!auth.admits(None));
        // A metrics token is only that: it signs nobody in, and other tokens are not one.
        assert!(auth.is_metrics_token(Some("Bearer scr4pe")));
        assert!(!auth.is_metrics_token(Some("Bearer t0ken")));
        assert!(!auth.is_metrics_token(Some(&basic("anna:secret"))));
        assert_eq!(auth.identify_quickly(Some("Bearer scr4pe")), Some(None));
        // The stand-in hash for unknown users is a real one (else their refusal would be quick).
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn without_a_password_file_basic_credentials_are_refused_without_a_hash() {
        let dir = tempfile::tempdir().expect("dir");
        let config = AuthConfig {
            password_file: None,
            ..files(dir.path())
        };
        let auth = Auth::load(&config, "0.0.0.0:9090")
            .expect("load")
            .expect("on");
        assert_eq!(
            auth.identify_quickly(Some(&basic("anna:secret"))),
            Some(None)
        );
        assert_eq!(
            auth.identify_quickly(Some("Bearer t0ken")),
            Some(Some("token".into()))
        );
    }

    #[test]
    fn a_reload_revokes_what_the_files_no_longer_list_and_keeps_all_on_a_bad_file() {
        let dir = tempfile::tempdir().expect("dir");
        let config = files(dir.path());
        let auth = Auth::load(&config, "0.0.0.0:9090")
            .expect("load")
            .expect("on");
        assert!(auth.admits(Some(&basic("anna:secret"))));
        assert!(auth.admits(Some("Bearer t0ken")));
        // A broken password file: refused, the credentials in use stay.
        let passwords = config.password_file.clone().expect("passwords");
        let kept = std::fs::read_to_string(&passwords).expect("read");
        std::fs::write(&passwords, "anna:plaintext\n").expect("write");
        let message = auth
            .reload()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("line 1: not an argon2 hash"), "{message}");
        assert!(auth.admits(Some(&basic("anna:secret"))));
        // anna renamed to bert, the API token revoked: anna's remembered password no longer
        // admits, nor the token.
        std::fs::write(&passwords, kept.replace("anna:", "bert:")).expect("write");
        let tokens = config.token_file.clone().expect("tokens");
        std::fs::write(&tokens, "# revoked\n").expect("write");
        assert_eq!(auth.reload().expect("reload"), (1, 0, 1));
        assert!(!auth.admits(Some(&basic("anna:secret"))));
        assert!(auth.admits(Some(&basic("bert:secret"))));
        assert!(!auth.admits(Some("Bearer t0ken")));
        assert!(auth.is_metrics_token(Some("Bearer scr4pe")));
    }

    #[test]
    fn a_client_that_fails_too_often_waits_out_its_window() {
        let throttle = Throttle::default();
        let (guesser, other) = (
            Some(IpAddr::from([10, 0, 0, 7])),
            Some(IpAddr::from([10, 0, 0, 8])),
        );
        let start = Instant::now();
        for _ in 0..FAILURES_ALLOWED {
            assert_eq!(throttle.check(guesser, start), Ok(()));
            throttle.failed(guesser, start);
        }
        let later = start + Duration::from_secs(15);
        assert_eq!(
            throttle.check(guesser, later),
            Err(FAILURE_WINDOW - Duration::from_secs(15))
        );
        // Another address is not held back, nor the same one once its window has passed.
        assert_eq!(throttle.check(other, later), Ok(()));
        let after = start + FAILURE_WINDOW;
        assert_eq!(throttle.check(guesser, after), Ok(()));
        // A failure after the window starts a new count.
        throttle.failed(guesser, after);
        assert_eq!(throttle.check(guesser, after), Ok(()));
        // Unknown addresses share one count.
        for _ in 0..FAILURES_ALLOWED {
            throttle.failed(None, start);
        }
        assert!(throttle.check(None, start).is_err());
    }

    #[test]
    fn an_open_server_must_be_loopback_and_bad_files_name_their_line() {
        let open = AuthConfig::default();
        assert!(
            Auth::load(&open, "127.0.0.1:9090")
                .expect("loopback")
                .is_none()
        );
        assert!(Auth::load(&open, "[::1]:9090").expect("loopback").is_none());
        let message = Auth::load(&open, "0.0.0.0:9090")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("http.bind = `0.0.0.0:9090` is reachable"),
            "{message}"
        );
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("passwords");
        std::fs::write(&path, "anna:plaintext\n").expect("write");
        let config = AuthConfig {
            password_file: Some(path),
            ..AuthConfig::default()
        };
        let message = Auth::load(&config, "0.0.0.0:1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("line 1: not an argon2 hash"), "{message}");
        let missing = AuthConfig {
            token_file: Some(dir.path().join("nowhere")),
            ..AuthConfig::default()
        };
        let message = Auth::load(&missing, "0.0.0.0:1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.starts_with("http.auth.token_file: cannot read"),
            "{message}"
        );
    }
}
