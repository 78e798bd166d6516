//! A real MQTT broker for the tests: mosquitto (installed by scripts/setup.sh) on a free port with
//! a generated config, stopped when dropped; and a bundle that finds every frame anomalous.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(5);

pub fn mosquitto_binary() -> PathBuf {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("mosquitto"))
            .find(|path| path.is_file())
    });
    // Debian installs it in /usr/sbin, which a normal user's PATH lacks.
    from_path
        .or_else(|| {
            ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
                .into_iter()
                .map(PathBuf::from)
                .find(|path| path.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "the mosquitto broker is not installed (not in PATH nor /usr/sbin): run \
                 `bash scripts/setup.sh` (it installs the Debian packages mosquitto and \
                 mosquitto-clients)"
            )
        })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("no free TCP port on 127.0.0.1")
}

/// A mosquitto process on 127.0.0.1:`port`, killed on drop. Persistence is on (in its own
/// folder) so that a subscriber's session and queued QoS 1 messages survive `restart`.
pub struct Broker {
    pub port: u16,
    folder: TempDir,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> Self {
        Self::start_on(free_port(), None)
    }

    /// With `login`, only that user and password may connect.
    pub fn start_on(port: u16, login: Option<(&str, &str)>) -> Self {
        Self::start_with(port, login, "")
    }

    /// `extra` is appended to the generated mosquitto.conf (more listeners, TLS).
    pub fn start_with(port: u16, login: Option<(&str, &str)>, extra: &str) -> Self {
        let folder = tempfile::tempdir().expect("temp folder for mosquitto");
        let dir = folder.path();
        let mut config = format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n\
             log_dest stderr\nlog_type error\nlog_type warning\n\
             # mosquitto started as root would switch to user mosquitto and lose our files.\n\
             user root\n",
            dir.display()
        );
        match login {
            None => config.push_str("allow_anonymous true\n"),
            Some((user, password)) => {
                let file = dir.join("passwords");
                let status = Command::new("mosquitto_passwd")
                    .arg("-b")
                    .arg("-c")
                    .arg(&file)
                    .arg(user)
                    .arg(password)
                    .status()
                    .expect("mosquitto_passwd missing: run `bash scripts/setup.sh`");
                assert!(status.success(), "mosquitto_passwd failed");
                config.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\n",
                    file.display()
                ));
            }
        }
        config.push_str(extra);
        fs::write(dir.join("mosquitto.conf"), config).unwrap();
        let mut broker = Self {
            port,
            folder,
            child: None,
        };
        broker.launch();
        broker
    }

    pub fn launch(&mut self) {
        let mut child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(self.folder.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mosquitto");
        let stderr = child.stderr.take();
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log: Vec<String> = stderr
                    .map(|s| BufReader::new(s).lines().map_while(Result::ok).collect())
                    .unwrap_or_default();
                panic!("mosquitto exited with {status}:\n{}", log.join("\n"));
            }
            assert!(
                start.elapsed() < WAIT,
                "mosquitto did not listen on {}",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (mosquitto saves its sessions), then waits for the process to end.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < WAIT {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The tiny bundle recalibrated so that every frame is an anomaly (threshold 0, floor -1: any raw
/// score normalises to 1), so events are certain.
pub fn always_anomalous_bundle(dir: &Path) -> PathBuf {
    super::recalibrated_bundle(
        super::tiny_conveyor_bundle(),
        &dir.join("bundle"),
        "0.0",
        "-1.0",
    )
}
