//! Reloading a running pipeline's settings without a restart: on SIGHUP the pipeline file is read
//! again and each camera's alert settings (`[alerts]`, `[camera.alerts]`: thresholds, k/m,
//! cooldowns, zones) go to its worker, which applies them before its next frame; the model is
//! swapped when `[model] bundle` names another folder or the bundle changed on disk (new
//! thresholds from `stpm calibrate`, a new `stpm train`); the HTTP server's credential files
//! (`[http.auth]`) are read again. Settings that cannot change while
//! running (cameras, ports, outputs, the model's other keys, the spool) are named and left as
//! they are.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::background::Background;

use crate::alerts::{AlertConfig, Polygon};
use crate::pipeline::auth::Auth;
use crate::pipeline::config::{PipelineConfig, PipelineFile};
use crate::pipeline::model::{ModelControl, ModelSlot, SwapError, same_folder};

/// One camera's alert settings as the pipeline file now says.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub alerts: AlertConfig,
    pub roi: Vec<Polygon>,
    pub ignore: Vec<Polygon>,
}

/// Where new settings wait for a camera's worker (it takes them before its next frame).
pub type Inbox = Arc<Mutex<Option<LiveSettings>>>;

/// Takes what waits in `inbox`, if anything.
pub fn take(inbox: &Inbox) -> Option<LiveSettings> {
    inbox.lock().unwrap_or_else(PoisonError::into_inner).take()
}

static HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUP.store(true, Ordering::SeqCst);
}

/// Makes SIGHUP ask for a reload instead of ending the process (one that arrives before the
/// reload thread runs is handled when it starts).
pub fn catch_hangup() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGHUP,
            on_hangup as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// The thread that waits for SIGHUP; [`Reloader::stop`] ends it.
pub struct Reloader(Background);

impl Reloader {
    /// Catches SIGHUP from now on; on each, reads `file` (with its `--set` overrides and shard,
    /// as at the start) and hands each camera of `running` its new alert settings through
    /// `inboxes` (by camera), and `models` the bundle when it changed; reads the HTTP server's
    /// credential files (`auth`) again.
    pub fn start(
        file: PipelineFile,
        running: PipelineConfig,
        inboxes: Vec<(String, Inbox)>,
        models: Arc<ModelSlot>,
        auth: Option<Arc<Auth>>,
    ) -> std::io::Result<Self> {
        catch_hangup();
        Background::spawn("reload", move |stop| {
            // What `[model] bundle` said at the last reload (or the start).
            let mut named = running.model.bundle.clone();
            while !stop.load(Ordering::Relaxed) {
                let hangup = HANGUP.swap(false, Ordering::SeqCst);
                if hangup && let Some(auth) = &auth {
                    reload_credentials(auth);
                }
                if hangup && let Some(new) = reload(&file, &running, &inboxes) {
                    let live = models.live().model.bundle.clone();
                    match bundle_to_load(&named, &new.model.bundle, &live) {
                        Some(bundle) => swap_model(&bundle, &models),
                        None => log::info!(
                            "reload: [model] bundle unchanged; the live model ({}, swapped in \
                             through the API or a training) stays",
                            live.display()
                        ),
                    }
                    named = new.model.bundle;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map(Self)
    }

    pub fn stop(self) {
        self.0.stop();
    }
}

/// Reads the credential files of `[http.auth]` again (the files the run started with).
fn reload_credentials(auth: &Auth) {
    match auth.reload() {
        Ok((users, tokens, metrics_tokens)) => log::info!(
            "reload: http.auth read again: {users} user(s), {tokens} token(s), \
             {metrics_tokens} metrics token(s); passwords are checked anew"
        ),
        Err(e) => log::warn!("reload: the credentials in use stay: {e}"),
    }
}

/// The bundle a reload swaps in: the file's when it names another folder than at the last reload
/// (`named_before`), or the live one's when the file names it (its thresholds or graph may have
/// changed on disk; an unchanged one is not loaded again); `None` when the file still names what
/// it did and the live model came from elsewhere (`POST /api/model`, a training), which stays.
pub fn bundle_to_load(
    named_before: &std::path::Path,
    named_now: &std::path::Path,
    live: &std::path::Path,
) -> Option<PathBuf> {
    (!same_folder(named_before, named_now) || same_folder(named_now, live))
        .then(|| named_now.to_path_buf())
}

/// Swaps `bundle` in (nothing is loaded when it is the live one, unchanged).
fn swap_model(bundle: &std::path::Path, models: &ModelSlot) {
    match models.swap(bundle) {
        Ok(swapped) if swapped.unchanged => {
            log::info!("reload: model {} unchanged", swapped.model.id)
        }
        Ok(_) => {}
        Err(e @ SwapError::Busy) => log::warn!("reload: model not reloaded: {e}"),
        Err(e) => log::warn!("reload: model refused, the live model stays: {e}"),
    }
}

/// Reads the file again and hands out the alert settings; logs what may not change. Returns
/// the file's settings (`None` when it cannot be read).
fn reload(
    file: &PipelineFile,
    running: &PipelineConfig,
    inboxes: &[(String, Inbox)],
) -> Option<PipelineConfig> {
    let new = match file.load() {
        Ok(new) => new,
        Err(e) => {
            log::warn!("reload refused, the running settings stay: {e}");
            return None;
        }
    };
    let fixed = fixed_changes(running, &new);
    if !fixed.is_empty() {
        log::warn!(
            "reload: {} cannot change while running (restart stpm run for them); the alert \
             settings are applied",
            fixed.join(", ")
        );
    }
    let mut applied = 0;
    for (camera, inbox) in inboxes {
        let Some(config) = new.camera.iter().find(|c| &c.name == camera) else {
            continue;
        };
        let settings = LiveSettings {
            alerts: config.alerts.resolve(&new.alerts),
            roi: config.alerts.roi.clone(),
            ignore: config.alerts.ignore.clone(),
        };
        *inbox.lock().unwrap_or_else(PoisonError::into_inner) = Some(settings);
        applied += 1;
    }
    log::info!(
        "reload: alert settings of {applied} camera(s) read from {}",
        file.path.display()
    );
    Some(new)
}

/// The sections (and keys) that differ between `running` and `new` outside what a reload may
/// change: everything but `[alerts]` (its spool excepted), each camera's `[camera.alerts]` and
/// `[model] bundle`.
pub fn fixed_changes(running: &PipelineConfig, new: &PipelineConfig) -> Vec<String> {
    let mut probe = new.clone();
    probe.model.bundle = running.model.bundle.clone();
    probe.alerts = AlertConfig {
        spool_dir: new.alerts.spool_dir.clone(),
        spool_max_events: new.alerts.spool_max_events,
        ..running.alerts.clone()
    };
    if probe.camera.len() == running.camera.len() {
        for (camera, old) in probe.camera.iter_mut().zip(&running.camera) {
            camera.alerts = old.alerts.clone();
        }
    }
    // `probe` equals `running` except where a reload cannot apply the change (its `[alerts]`
    // differs only in the spool keys).
    let sections: [(&str, &dyn std::fmt::Debug, &dyn std::fmt::Debug); 8] = [
        ("[model] (other than bundle)", &probe.model, &running.model),
        (
            "[[camera]] (other than [camera.alerts])",
            &probe.camera,
            &running.camera,
        ),
        ("[output]", &probe.output, &running.output),
        (
            "[alerts] spool_dir / spool_max_events",
            &probe.alerts,
            &running.alerts,
        ),
        ("[mqtt]", &probe.mqtt, &running.mqtt),
        ("[http]", &probe.http, &running.http),
        ("[storage]", &probe.storage, &running.storage),
        ("[clips]", &probe.clips, &running.clips),
    ];
    sections
        .into_iter()
        .filter(|(_, new, old)| format!("{new:?}") != format!("{old:?}"))
        .map(|(name, _, _)| name.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> PipelineConfig {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).expect("write");
        PipelineConfig::load(&path, &[]).expect("config")
    }

    #[test]
    fn a_reload_reverts_no_model_swapped_in_through_the_api() {
        let dir = tempfile::tempdir().expect("dir");
        let [a, b, c] = ["a", "b", "c"].map(|name| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).expect("bundle dir");
            path
        });
        // The file names the live bundle: reloaded (in case its manifest changed).
        assert_eq!(bundle_to_load(&a, &a, &a), Some(a.clone()));
        // The file names another bundle than before: that one.
        assert_eq!(bundle_to_load(&a, &b, &a), Some(b.clone()));
        assert_eq!(bundle_to_load(&a, &b, &c), Some(b.clone()));
        // The file unchanged, the live model from the API: it stays.
        assert_eq!(bundle_to_load(&a, &a, &c), None);
        // The same folder written another way is the same folder.
        let dotted = dir.path().join(".").join("a");
        assert_eq!(bundle_to_load(&a, &dotted, &c), None);
    }

    #[test]
    fn only_what_cannot_change_live_is_named() {
        let base = "[model]\nbundle = \"b\"\n\n[[camera]]\nname = \"line1\"\nsource = \"test://conveyor\"\n";
        let running = config(base);
        let alerts_only = config(&format!(
            "{base}\n[camera.alerts]\non_threshold = 0.7\n\n[alerts]\nk = 2\nm = 4\n"
        ));
        assert!(fixed_changes(&running, &alerts_only).is_empty());
        let moved = config(&format!(
            "{base}\n[alerts]\nk = 2\nspool_dir = \"elsewhere\"\n\n[http]\nenabled = true\n"
        ));
        assert_eq!(
            fixed_changes(&running, &moved),
            ["[alerts] spool_dir / spool_max_events", "[http]"]
        );
        // Another bundle is swapped in; another provider waits for a restart.
        let swapped = config(&base.replace("bundle = \"b\"", "bundle = \"c\""));
        assert!(fixed_changes(&running, &swapped).is_empty());
        let provider =
            config(&base.replace("bundle = \"b\"", "bundle = \"c\"\nprovider = \"cpu\""));
        assert_eq!(
            fixed_changes(&running, &provider),
            ["[model] (other than bundle)"]
        );
    }
}
