//! The `[alerts]` settings and their per-camera overrides; validation names every offending key.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::zones::Polygon;

/// The longest window `m` of frames an event is decided on (400 s at 25 frames/s); each camera
/// keeps that many scores.
pub const MAX_WINDOW: usize = 10_000;

/// How alert events are debounced, limited and kept while the broker is away.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Normalised score above which a frame counts as anomalous (the calibrated threshold is 0.5).
    #[serde(default = "default_on_threshold")]
    pub on_threshold: f32,
    /// An active event ends only once the score stays below this (hysteresis).
    #[serde(default = "default_off_threshold")]
    pub off_threshold: f32,
    /// A `new` event needs at least `k` anomalous frames ...
    #[serde(default = "default_k")]
    pub k: usize,
    /// ... among the last `m` frames (at most [`MAX_WINDOW`]).
    #[serde(default = "default_m")]
    pub m: usize,
    /// Seconds the score must stay below `off_threshold` before the event ends.
    #[serde(default = "default_min_clear_seconds")]
    pub min_clear_seconds: f64,
    /// Seconds after an event ends during which no new event starts on that camera.
    #[serde(default = "default_cooldown_seconds")]
    pub cooldown_seconds: f64,
    /// At most this many `new` events per camera in any rolling hour; further ones are suppressed.
    #[serde(default = "default_max_events_per_hour")]
    pub max_events_per_hour: usize,
    /// Send an `update` when the event's top score has risen by at least this since the last message.
    #[serde(default = "default_update_min_rise")]
    pub update_min_rise: f32,
    /// Send an `update` when the top box centre moved more than this (fraction of the frame).
    #[serde(default = "default_update_min_move")]
    pub update_min_move: f32,
    /// An event follows its region (the box nearest to where it last was, within this distance, in
    /// fractions of the frame); when the region is gone for `m` frames while another region far from
    /// it stays anomalous (the next part on a belt), the event ends and that region starts a new
    /// one. 0 turns this off (one event lasts while anything is anomalous).
    #[serde(default = "default_new_region_distance")]
    pub new_region_distance: f32,
    /// At most one `update` per this many seconds per event (a part moving along a belt moves
    /// its box every frame); changes in between are sent when the interval has passed.
    #[serde(default = "default_update_min_seconds")]
    pub update_min_seconds: f64,
    /// Folder of the on-disk spool that keeps events while the broker is unreachable.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// Most events the spool keeps; beyond it, the oldest updates (then the oldest events) go.
    #[serde(default = "default_spool_max_events")]
    pub spool_max_events: usize,
}

fn default_on_threshold() -> f32 {
    0.5
}
fn default_off_threshold() -> f32 {
    0.4
}
fn default_k() -> usize {
    3
}
fn default_m() -> usize {
    5
}
fn default_min_clear_seconds() -> f64 {
    2.0
}
fn default_cooldown_seconds() -> f64 {
    10.0
}
fn default_max_events_per_hour() -> usize {
    60
}
fn default_update_min_rise() -> f32 {
    0.1
}
fn default_update_min_move() -> f32 {
    0.1
}
fn default_new_region_distance() -> f32 {
    0.3
}
fn default_update_min_seconds() -> f64 {
    1.0
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("spool")
}
fn default_spool_max_events() -> usize {
    10_000
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            on_threshold: default_on_threshold(),
            off_threshold: default_off_threshold(),
            k: default_k(),
            m: default_m(),
            min_clear_seconds: default_min_clear_seconds(),
            cooldown_seconds: default_cooldown_seconds(),
            max_events_per_hour: default_max_events_per_hour(),
            update_min_rise: default_update_min_rise(),
            update_min_move: default_update_min_move(),
            new_region_distance: default_new_region_distance(),
            update_min_seconds: default_update_min_seconds(),
            spool_dir: default_spool_dir(),
            spool_max_events: default_spool_max_events(),
        }
    }
}

/// Every problem found in an alerts section, one per line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid alert settings:{}", .problems.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
pub struct AlertConfigError {
    pub problems: Vec<String>,
}

fn into_result(problems: Vec<String>) -> Result<(), AlertConfigError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(AlertConfigError { problems })
    }
}

impl AlertConfig {
    /// Checks the global `[alerts]` section.
    pub fn validate(&self) -> Result<(), AlertConfigError> {
        into_result(self.problems("alerts"))
    }

    /// Problems with these settings, each naming its key under `section`.
    fn problems(&self, section: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, value) in [
            ("on_threshold", self.on_threshold),
            ("off_threshold", self.off_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                problems.push(format!(
                    "{section}.{key} ({value}) must be a normalised score in [0, 1]"
                ));
            }
        }
        if self.off_threshold >= self.on_threshold {
            problems.push(format!(
                "{section}.off_threshold ({}) must be below {section}.on_threshold ({})",
                self.off_threshold, self.on_threshold
            ));
        }
        if self.k == 0 {
            problems.push(format!("{section}.k must be at least 1"));
        }
        if self.m > MAX_WINDOW {
            problems.push(format!(
                "{section}.m ({}) must be at most {MAX_WINDOW} frames",
                self.m
            ));
        }
        if self.k > self.m {
            problems.push(format!(
                "{section}.k ({}) must not exceed {section}.m ({})",
                self.k, self.m
            ));
        }
        for (key, value) in [
            ("min_clear_seconds", self.min_clear_seconds),
            ("cooldown_seconds", self.cooldown_seconds),
            ("update_min_seconds", self.update_min_seconds),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                problems.push(format!(
                    "{section}.{key} ({value}) must be a finite number of seconds, at least 0"
                ));
            }
        }
        if self.max_events_per_hour == 0 {
            problems.push(format!(
                "{section}.max_events_per_hour must be at least 1 (to silence a camera, leave it out)"
            ));
        }
        for (key, value) in [
            ("update_min_rise", self.update_min_rise),
            ("update_min_move", self.update_min_move),
        ] {
            if !(value.is_finite() && value > 0.0) {
                problems.push(format!(
                    "{section}.{key} ({value}) must be a finite number above 0"
                ));
            }
        }
        if !(self.new_region_distance.is_finite() && self.new_region_distance >= 0.0) {
            problems.push(format!(
                "{section}.new_region_distance ({}) must be a finite fraction of the frame, at least 0 (0 = off)",
                self.new_region_distance
            ));
        }
        if self.spool_dir.as_os_str().is_empty() {
            problems.push(format!("{section}.spool_dir must not be empty"));
        }
        if self.spool_max_events == 0 {
            problems.push(format!("{section}.spool_max_events must be at least 1"));
        }
        problems
    }
}

/// A camera's own alert settings: any unset field takes the global `[alerts]` value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraAlertOverrides {
    /// Overrides `alerts.on_threshold`.
    #[serde(default)]
    pub on_threshold: Option<f32>,
    /// Overrides `alerts.off_threshold`.
    #[serde(default)]
    pub off_threshold: Option<f32>,
    /// Overrides `alerts.k`.
    #[serde(default)]
    pub k: Option<usize>,
    /// Overrides `alerts.m`.
    #[serde(default)]
    pub m: Option<usize>,
    /// Overrides `alerts.min_clear_seconds`.
    #[serde(default)]
    pub min_clear_seconds: Option<f64>,
    /// Overrides `alerts.cooldown_seconds`.
    #[serde(default)]
    pub cooldown_seconds: Option<f64>,
    /// Overrides `alerts.max_events_per_hour`.
    #[serde(default)]
    pub max_events_per_hour: Option<usize>,
    /// Overrides `alerts.update_min_rise`.
    #[serde(default)]
    pub update_min_rise: Option<f32>,
    /// Overrides `alerts.update_min_move`.
    #[serde(default)]
    pub update_min_move: Option<f32>,
    /// Overrides `alerts.new_region_distance`.
    #[serde(default)]
    pub new_region_distance: Option<f32>,
    /// Overrides `alerts.update_min_seconds`.
    #[serde(default)]
    pub update_min_seconds: Option<f64>,
    /// Only pixels inside one of these polygons raise alerts (none: the whole frame).
    #[serde(default)]
    pub roi: Vec<Polygon>,
    /// Pixels inside any of these polygons never raise alerts (glare, moving fixtures).
    #[serde(default)]
    pub ignore: Vec<Polygon>,
}

impl CameraAlertOverrides {
    /// The settings this camera runs with: its overrides on top of `global`. The spool is shared,
    /// so it always comes from `global`.
    pub fn resolve(&self, global: &AlertConfig) -> AlertConfig {
        AlertConfig {
            on_threshold: self.on_threshold.unwrap_or(global.on_threshold),
            off_threshold: self.off_threshold.unwrap_or(global.off_threshold),
            k: self.k.unwrap_or(global.k),
            m: self.m.unwrap_or(global.m),
            min_clear_seconds: self.min_clear_seconds.unwrap_or(global.min_clear_seconds),
            cooldown_seconds: self.cooldown_seconds.unwrap_or(global.cooldown_seconds),
            max_events_per_hour: self
                .max_events_per_hour
                .unwrap_or(global.max_events_per_hour),
            update_min_rise: self.update_min_rise.unwrap_or(global.update_min_rise),
            update_min_move: self.update_min_move.unwrap_or(global.update_min_move),
            new_region_distance: self
                .new_region_distance
                .unwrap_or(global.new_region_distance),
            update_min_seconds: self.update_min_seconds.unwrap_or(global.update_min_seconds),
            spool_dir: global.spool_dir.clone(),
            spool_max_events: global.spool_max_events,
        }
    }

    /// Checks the merged settings and the zones of one camera; `section` is where the overrides
    /// live in the file (e.g. `cameras.line1.alerts`), so each problem names a key the user can find.
    /// Validate `global` on its own first: its problems show up here too when not overridden.
    pub fn validate(&self, global: &AlertConfig, section: &str) -> Result<(), AlertConfigError> {
        let mut problems = self.resolve(global).problems(section);
        for (key, polygons) in [("roi", &self.roi), ("ignore", &self.ignore)] {
            for (index, polygon) in polygons.iter().enumerate() {
                if polygon.0.len() < 3 {
                    problems.push(format!(
                        "{section}.{key}[{index}] has {} points; a polygon needs at least 3",
                        polygon.0.len()
                    ));
                }
                if let Some([x, y]) = polygon
                    .0
                    .iter()
                    .find(|point| point.iter().any(|v| !(0.0..=1.0).contains(v)))
                {
                    problems.push(format!(
                        "{section}.{key}[{index}] has point [{x}, {y}] outside the frame: \
                         coordinates are fractions of width and height, in [0, 1]"
                    ));
                }
            }
        }
        into_result(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_from_empty_toml() {
        let config: AlertConfig = toml::from_str("").unwrap();
        assert_eq!(config, AlertConfig::default());
        assert_eq!(config.on_threshold, 0.5);
        assert_eq!(config.off_threshold, 0.4);
        assert_eq!((config.k, config.m), (3, 5));
        assert_eq!(config.spool_dir, PathBuf::from("spool"));
        assert_eq!(config.spool_max_events, 10_000);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn unknown_key_rejected() {
        let error = toml::from_str::<AlertConfig>("on_treshold = 0.6")
            .unwrap_err()
            .to_string();
        assert!(error.contains("on_treshold"), "{error}");
    }

    #[test]
    fn all_problems_reported_with_keys() {
        let config: AlertConfig = toml::from_str(
            "on_threshold = 0.5\noff_threshold = 0.6\nk = 6\nm = 5\ncooldown_seconds = -1.0\n\
             update_min_rise = nan\nmax_events_per_hour = 0",
        )
        .unwrap();
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(
            problems,
            vec![
                "alerts.off_threshold (0.6) must be below alerts.on_threshold (0.5)",
                "alerts.k (6) must not exceed alerts.m (5)",
                "alerts.cooldown_seconds (-1) must be a finite number of seconds, at least 0",
                "alerts.max_events_per_hour must be at least 1 (to silence a camera, leave it out)",
                "alerts.update_min_rise (NaN) must be a finite number above 0",
            ]
        );
    }

    #[test]
    fn thresholds_must_be_finite_scores_and_k_positive() {
        let config = AlertConfig {
            on_threshold: f32::NAN,
            off_threshold: f32::INFINITY,
            k: 0,
            ..AlertConfig::default()
        };
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("alerts.on_threshold (NaN)"));
        assert!(problems[1].starts_with("alerts.off_threshold (inf)"));
        assert_eq!(problems[2], "alerts.k must be at least 1");
    }

    #[test]
    fn a_huge_window_is_a_problem_not_an_allocation() {
        let config = AlertConfig {
            k: 3,
            m: usize::MAX,
            ..AlertConfig::default()
        };
        let problems = config.validate().unwrap_err().problems;
        assert_eq!(
            problems,
            vec![format!(
                "alerts.m ({}) must be at most 10000 frames",
                usize::MAX
            )]
        );
        let widest = AlertConfig {
            m: MAX_WINDOW,
            ..AlertConfig::default()
        };
        assert!(widest.validate().is_ok());
    }

    #[test]
    fn overrides_merge_over_global() {
        let overrides: CameraAlertOverrides = toml::from_str(
            "on_threshold = 0.7\nk = 2\nroi = [[[0.0, 0.0], [1.0, 0.0], [1.0, 0.5]]]",
        )
        .unwrap();
        let global = AlertConfig {
            spool_dir: PathBuf::from("/var/lib/stpm/spool"),
            ..AlertConfig::default()
        };
        let resolved = overrides.resolve(&global);
        assert_eq!(resolved.on_threshold, 0.7);
        assert_eq!(resolved.k, 2);
        assert_eq!(resolved.off_threshold, 0.4);
        assert_eq!(resolved.m, 5);
        assert_eq!(resolved.spool_dir, PathBuf::from("/var/lib/stpm/spool"));
        assert_eq!(overrides.roi.len(), 1);
        assert!(overrides.roi[0].contains(0.9, 0.2));
        assert!(overrides.validate(&global, "cameras.line1.alerts").is_ok());
    }

    #[test]
    fn camera_problems_name_camera_keys() {
        let overrides = CameraAlertOverrides {
            off_threshold: Some(0.55),
            roi: vec![Polygon(vec![[0.0, 0.0], [1.0, 1.0]])],
            ignore: vec![Polygon(vec![[0.1, 0.1], [1.2, 0.1], [0.5, 0.5]])],
            ..CameraAlertOverrides::default()
        };
        let error = overrides
            .validate(&AlertConfig::default(), "cameras.line1.alerts")
            .unwrap_err();
        assert_eq!(
            error.problems,
            vec![
                "cameras.line1.alerts.off_threshold (0.55) must be below cameras.line1.alerts.on_threshold (0.5)",
                "cameras.line1.alerts.roi[0] has 2 points; a polygon needs at least 3",
                "cameras.line1.alerts.ignore[0] has point [1.2, 0.1] outside the frame: \
                 coordinates are fractions of width and height, in [0, 1]",
            ]
        );
        assert!(
            error
                .to_string()
                .starts_with("invalid alert settings:\n  - ")
        );
    }
}
