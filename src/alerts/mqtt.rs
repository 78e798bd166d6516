//! The `[mqtt]` settings, the topics (docs/alerts.md) and the rumqttc options built from them.
//! Owns no connection: `publisher.rs` runs it (and holds `MqttConfig::build`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};

/// How to reach the MQTT broker that receives alerts.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name or IP address.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker TCP port (1883 plain; brokers usually take TLS on 8883).
    #[serde(default = "default_port")]
    pub port: u16,
    /// First level of every topic: `<prefix>/available`, `<prefix>/<camera>/events`, …
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// MQTT client id; two clients with the same id knock each other off the broker.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// User name for brokers that require a login.
    #[serde(default)]
    pub username: Option<String>,
    /// Password for `username`.
    #[serde(default)]
    pub password: Option<String>,
    /// A file whose first line is the password for `username`, instead of `password`: the
    /// secret is then neither in the configuration nor on a command line.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate; setting it turns TLS on.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate clients by certificate (needs `tls_key`).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Seconds between keep-alive pings; a silent broker is declared gone after 1.5× this.
    #[serde(default = "default_keep_alive_seconds")]
    pub keep_alive_seconds: u16,
    /// Seconds a TCP/TLS connect and CONNACK may take before the attempt counts as failed.
    #[serde(default = "default_connect_timeout_seconds")]
    pub connect_timeout_seconds: u16,
    /// First wait before reconnecting after a failure; it doubles on every failure in a row ...
    #[serde(default = "default_reconnect_min_seconds")]
    pub reconnect_min_seconds: f64,
    /// ... up to this many seconds. A refused login waits this long straight away.
    #[serde(default = "default_reconnect_max_seconds")]
    pub reconnect_max_seconds: f64,
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}
fn default_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "stpm".to_string()
}
/// `stpm-<host name>`, or `stpm-<process id>` when the host name is unknown. A pipeline makes it
/// unique on its host with [`MqttConfig::distinguish_default_client_id`].
pub(crate) fn default_client_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| {
            name.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty());
    match host {
        Some(host) => format!("stpm-{host}"),
        None => format!("stpm-{}", std::process::id()),
    }
}
fn default_keep_alive_seconds() -> u16 {
    30
}
fn default_connect_timeout_seconds() -> u16 {
    5
}
fn default_reconnect_min_seconds() -> f64 {
    0.5
}
fn default_reconnect_max_seconds() -> f64 {
    30.0
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            prefix: default_prefix(),
            client_id: default_client_id(),
            username: None,
            password: None,
            password_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            keep_alive_seconds: default_keep_alive_seconds(),
            connect_timeout_seconds: default_connect_timeout_seconds(),
            reconnect_min_seconds: default_reconnect_min_seconds(),
            reconnect_max_seconds: default_reconnect_max_seconds(),
        }
    }
}

/// Never prints the password.
impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("prefix", &self.prefix)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("keep_alive_seconds", &self.keep_alive_seconds)
            .field("connect_timeout_seconds", &self.connect_timeout_seconds)
            .field("reconnect_min_seconds", &self.reconnect_min_seconds)
            .field("reconnect_max_seconds", &self.reconnect_max_seconds)
            .finish()
    }
}

/// Every problem found in an `[mqtt]` section, one per line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid mqtt settings:{}", .problems.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
pub struct MqttConfigError {
    pub problems: Vec<String>,
}

/// Why the publisher could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error(transparent)]
    Config(#[from] MqttConfigError),
    /// A file the section names (`tls_ca`, `tls_cert`, `tls_key`, `password_file`) is unreadable.
    #[error("cannot read mqtt.{key} file {path}: {source}")]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `password_file` holds no password (an empty first line).
    #[error("mqtt.password_file {path}: its first line (the password) is empty")]
    EmptyPassword { path: PathBuf },
}

/// True for a name that can be one topic level: non-empty, no `/`, no wildcard, no NUL.
pub fn is_topic_level(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '+', '#', '\0'])
}

/// True for a topic a client may publish to: non-empty, no wildcard, no NUL.
pub fn is_publish_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

impl MqttConfig {
    /// When `client_id` was not given, appends 8 hex digits of a hash of `instance` (something
    /// only one running instance has, such as its spool folder's absolute path), so two pipelines
    /// on one host do not knock each other off the broker with the same id.
    pub fn distinguish_default_client_id(&mut self, instance: &std::path::Path) {
        use sha2::Digest;
        if self.client_id != default_client_id() {
            return;
        }
        let digest = sha2::Sha256::digest(instance.as_os_str().as_encoded_bytes());
        let suffix: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        self.client_id = format!("{}-{suffix}", self.client_id);
    }

    /// Checks the section; every problem names its `mqtt.` key.
    pub fn validate(&self) -> Result<(), MqttConfigError> {
        let mut problems = Vec::new();
        if self.host.trim().is_empty() {
            problems.push("mqtt.host must not be empty".to_string());
        }
        if self.port == 0 {
            problems.push("mqtt.port must be between 1 and 65535".to_string());
        }
        if self.prefix.is_empty() {
            problems.push("mqtt.prefix must not be empty".to_string());
        } else if !is_publish_topic(&self.prefix)
            || self.prefix.starts_with('/')
            || self.prefix.ends_with('/')
            || self.prefix.contains("//")
        {
            problems.push(format!(
                "mqtt.prefix ({:?}) must be topic levels without '+', '#', NUL, empty levels or \
                 a leading/trailing '/'",
                self.prefix
            ));
        }
        if self.client_id.is_empty() {
            problems.push("mqtt.client_id must not be empty".to_string());
        } else if self.client_id.len() > 65535 || self.client_id.contains('\0') {
            problems.push("mqtt.client_id must be under 64 KiB, without NUL".to_string());
        }
        if self.password.is_some() && self.username.is_none() {
            problems.push("mqtt.password is set but mqtt.username is not (MQTT 3.1.1 sends a password only with a user name)".to_string());
        }
        if self.password_file.is_some() && self.username.is_none() {
            problems.push("mqtt.password_file is set but mqtt.username is not".to_string());
        }
        if self.password.is_some() && self.password_file.is_some() {
            problems.push(
                "mqtt.password and mqtt.password_file are both set: keep one (the file)".into(),
            );
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => problems.push(
                "mqtt.tls_cert is set but mqtt.tls_key is not: a client certificate needs its key"
                    .to_string(),
            ),
            (None, Some(_)) => problems.push(
                "mqtt.tls_key is set but mqtt.tls_cert is not: a client key needs its certificate"
                    .to_string(),
            ),
            _ => {}
        }
        if self.tls_ca.is_none() && (self.tls_cert.is_some() || self.tls_key.is_some()) {
            problems.push(
                "mqtt.tls_cert/tls_key need mqtt.tls_ca (TLS is on only when mqtt.tls_ca is set)"
                    .to_string(),
            );
        }
        for (key, path) in [
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                problems.push(format!("mqtt.{key} must not be an empty path"));
            }
        }
        if self.keep_alive_seconds == 0 {
            problems.push(
                "mqtt.keep_alive_seconds must be at least 1 (0 would never notice a dead broker)"
                    .to_string(),
            );
        }
        if self.connect_timeout_seconds == 0 {
            problems.push("mqtt.connect_timeout_seconds must be at least 1".to_string());
        }
        let min = self.reconnect_min_seconds;
        let max = self.reconnect_max_seconds;
        if !(min.is_finite() && min >= 0.01) {
            problems.push(format!(
                "mqtt.reconnect_min_seconds ({min}) must be a finite number of seconds, at least 0.01"
            ));
        }
        if !(max.is_finite() && (0.01..=3600.0).contains(&max)) {
            problems.push(format!(
                "mqtt.reconnect_max_seconds ({max}) must be a finite number of seconds in [0.01, 3600]"
            ));
        } else if min.is_finite() && max < min {
            problems.push(format!(
                "mqtt.reconnect_max_seconds ({max}) must not be below mqtt.reconnect_min_seconds ({min})"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(MqttConfigError { problems })
        }
    }

    /// `<prefix>/available`: `online` / `offline`, retained; also the last will.
    pub fn available_topic(&self) -> String {
        format!("{}/available", self.prefix)
    }

    /// `<prefix>/<camera>/events`.
    pub fn events_topic(&self, camera: &str) -> String {
        format!("{}/{camera}/events", self.prefix)
    }

    /// `<prefix>/<camera>/snapshot`.
    pub fn snapshot_topic(&self, camera: &str) -> String {
        format!("{}/{camera}/snapshot", self.prefix)
    }

    /// `<prefix>/<camera>/state`.
    pub fn state_topic(&self, camera: &str) -> String {
        format!("{}/{camera}/state", self.prefix)
    }

    /// The broker as `host:port`, for messages.
    pub fn broker(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// rumqttc options: clean session (the spool, not the broker, keeps what is unacknowledged),
    /// the `offline` last will, credentials and TLS. Validate first.
    pub(crate) fn mqtt_options(&self) -> Result<MqttOptions, MqttSetupError> {
        let mut options = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        options
            .set_keep_alive(Duration::from_secs(u64::from(
                self.keep_alive_seconds.max(1),
            )))
            .set_clean_session(true)
            .set_last_will(LastWill::new(
                self.available_topic(),
                "offline",
                QoS::AtLeastOnce,
                true,
            ))
            // JPEG snapshots of big frames exceed rumqttc's 10 KiB default.
            .set_max_packet_size(64 * 1024, 64 * 1024 * 1024);
        if let Some(username) = &self.username {
            let password = match &self.password_file {
                Some(path) => {
                    let password = std::fs::read_to_string(path)
                        .map(|text| text.lines().next().unwrap_or("").to_string())
                        .map_err(|source| MqttSetupError::File {
                            key: "password_file",
                            path: path.clone(),
                            source,
                        })?;
                    // An empty file is a mistake, not a user without a password.
                    if password.is_empty() {
                        return Err(MqttSetupError::EmptyPassword { path: path.clone() });
                    }
                    password
                }
                None => self.password.clone().unwrap_or_default(),
            };
            options.set_credentials(username.clone(), password);
        }
        if let Some(ca_path) = &self.tls_ca {
            let read = |key: &'static str, path: &PathBuf| {
                std::fs::read(path).map_err(|source| MqttSetupError::File {
                    key,
                    path: path.clone(),
                    source,
                })
            };
            let ca = read("tls_ca", ca_path)?;
            let client_auth = match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some((read("tls_cert", cert)?, read("tls_key", key)?)),
                _ => None,
            };
            install_crypto_provider();
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            }));
        }
        Ok(options)
    }
}

/// rustls needs a process-wide crypto provider; we build it with ring only (see Cargo.toml).
/// Installing twice is harmless: the first one stays.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_from_empty_toml() {
        let config: MqttConfig = toml::from_str("").unwrap();
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.port, 1883);
        assert_eq!(config.prefix, "stpm");
        assert!(
            config.client_id.starts_with("stpm-"),
            "{}",
            config.client_id
        );
        assert!(config.client_id.len() > 5);
        assert_eq!(config.username, None);
        assert_eq!(config.keep_alive_seconds, 30);
        assert!(config.validate().is_ok());
        assert_eq!(config.available_topic(), "stpm/available");
        assert_eq!(config.events_topic("line1"), "stpm/line1/events");
        assert_eq!(config.snapshot_topic("line1"), "stpm/line1/snapshot");
        assert_eq!(config.state_topic("line1"), "stpm/line1/state");
    }

    #[test]
    fn unknown_key_rejected() {
        let error = toml::from_str::<MqttConfig>("hots = \"broker\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("hots"), "{error}");
    }

    #[test]
    fn all_problems_reported_with_keys() {
        let config: MqttConfig = toml::from_str(
            "host = \"\"\nprefix = \"plant/#\"\npassword = \"pw\"\ntls_cert = \"c.pem\"\n\
             keep_alive_seconds = 0\nreconnect_min_seconds = 5.0\nreconnect_max_seconds = 1.0",
        )
        .unwrap();
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert_eq!(problems[0], "mqtt.host must not be empty");
        assert!(problems[1].starts_with("mqtt.prefix (\"plant/#\")"));
        assert!(problems[2].starts_with("mqtt.password is set but mqtt.username is not"));
        assert!(problems[3].starts_with("mqtt.tls_cert is set but mqtt.tls_key is not"));
        assert!(problems[4].starts_with("mqtt.tls_cert/tls_key need mqtt.tls_ca"));
        assert!(problems[5].starts_with("mqtt.keep_alive_seconds must be at least 1"));
        assert_eq!(
            problems[6],
            "mqtt.reconnect_max_seconds (1) must not be below mqtt.reconnect_min_seconds (5)"
        );
    }

    #[test]
    fn prefix_rules() {
        for (prefix, ok) in [
            ("stpm", true),
            ("plant3/line/stpm", true),
            ("", false),
            ("a+b", false),
            ("#", false),
            ("/stpm", false),
            ("stpm/", false),
            ("a//b", false),
        ] {
            let config = MqttConfig {
                prefix: prefix.to_string(),
                ..MqttConfig::default()
            };
            assert_eq!(config.validate().is_ok(), ok, "{prefix:?}");
        }
        assert!(is_topic_level("line-1"));
        assert!(!is_topic_level("line/1"));
        assert!(!is_topic_level("line+"));
        assert!(!is_topic_level(""));
    }

    #[test]
    fn password_hidden_in_debug() {
        let config = MqttConfig {
            username: Some("stpm".into()),
            password: Some("hunter2".into()),
            ..MqttConfig::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<hidden>"), "{text}");
    }

    #[test]
    fn an_empty_password_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("mqtt-password");
        std::fs::write(&path, "\nsecond line\n").expect("write");
        let config = MqttConfig {
            username: Some("stpm".into()),
            password_file: Some(path.clone()),
            ..MqttConfig::default()
        };
        let error = config
            .mqtt_options()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            error,
            format!(
                "mqtt.password_file {}: its first line (the password) is empty",
                path.display()
            )
        );
        std::fs::write(&path, "s3cret\n").expect("write");
        assert!(config.mqtt_options().is_ok());
    }

    #[test]
    fn missing_tls_file_named() {
        let config = MqttConfig {
            tls_ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..MqttConfig::default()
        };
        assert!(config.validate().is_ok());
        let error = config.mqtt_options().unwrap_err().to_string();
        assert!(
            error.starts_with("cannot read mqtt.tls_ca file /nonexistent/ca.pem"),
            "{error}"
        );
    }
}
