//! One camera's alert state machine: K-of-M debounce, hysteresis, cooldown and an hourly cap turn
//! per-frame summaries into `new` / `update` / `end` events (docs/alerts.md). Pure: time comes in.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::config::AlertConfig;
use super::zones::{BoxN, FrameSummary};

/// f32 sums are not exact: a rise from 0.6 to 0.7 is 0.099999964, which must count as 0.1.
const RISE_TOLERANCE: f32 = 1e-6;
const HOUR_SECONDS: f64 = 3600.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    New,
    Update,
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The score stayed below the off-threshold long enough.
    Cleared,
    /// The camera stopped delivering frames.
    CameraOffline,
    /// The service is stopping.
    Shutdown,
}

/// One message on `<prefix>/<camera>/events`, serialised exactly as docs/alerts.md specifies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// `<camera>-<start unix ms>-<per-camera counter>`.
    pub id: String,
    pub camera: String,
    /// Unix seconds of the first anomalous frame that counted towards the debounce.
    pub start_time: f64,
    /// Unix seconds the anomaly stopped (for `cleared`: when the score first fell below the
    /// off-threshold for good); `null` until the `end` event.
    pub end_time: Option<f64>,
    /// Score of the latest frame.
    pub score: f32,
    /// Highest score since the event was announced.
    pub top_score: f32,
    /// Boxes of the latest frame, largest region first.
    pub boxes: Vec<BoxN>,
    /// True when this frame is the event's highest-scoring so far: the pipeline publishes its
    /// annotated JPEG on `<prefix>/<camera>/snapshot`.
    pub snapshot: bool,
    /// Id of the model that scored the frame (the first 12 hex digits of the sha256 of its
    /// bundle's `stpm.toml`; `stpm run` names the live model so in `/api/cameras`).
    pub model: String,
    /// Only on `end` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    /// The stored peak snapshot's path on the `[http]` server (with `[storage]` and `[http]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_url: Option<String>,
    /// On `end`, with `[clips]` as well: the clip's path on the `[http]` server, served once the
    /// post-roll is written (404 until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_url: Option<String>,
}

/// `status` of the retained `<prefix>/<camera>/state` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraStatus {
    Ok,
    Anomaly,
    Offline,
}

/// The retained `<prefix>/<camera>/state` payload; `fps` comes from the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CameraState {
    pub status: CameraStatus,
    pub fps: f32,
    pub score: f32,
}

#[derive(Debug, Clone)]
struct ActiveEvent {
    id: String,
    start_time: f64,
    top_score: f32,
    score: f32,
    boxes: Vec<BoxN>,
    below_since: Option<f64>,
    /// `top_score` as of the last message sent.
    sent_top_score: f32,
    /// Top box centre as of the last message that had one.
    sent_centre: Option<(f32, f32)>,
    /// When the last message of this event was sent.
    sent_at: f64,
    /// Centre of the region this event follows (its box nearest to where it last was).
    region: Option<(f32, f32)>,
    /// Frames in a row with anomalous boxes, none of them near `region`, and when that began.
    lost: usize,
    lost_since: Option<f64>,
}

impl ActiveEvent {
    /// Follows the event's region into this frame's `boxes`: the nearest box within `distance`
    /// continues it; boxes that are all farther count one more frame of the region being gone.
    /// A frame without boxes changes nothing (the clear timer handles quiet frames).
    fn follow(&mut self, t: f64, boxes: &[BoxN], distance: f32) {
        let Some((x, y)) = self.region else {
            self.region = boxes.first().map(BoxN::centre);
            return;
        };
        let nearest = boxes
            .iter()
            .map(BoxN::centre)
            .map(|(bx, by)| ((bx - x).hypot(by - y), (bx, by)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        match nearest {
            None => {}
            Some((d, centre)) if d <= distance => {
                self.region = Some(centre);
                self.lost = 0;
                self.lost_since = None;
            }
            Some(_) => {
                self.lost += 1;
                self.lost_since.get_or_insert(t);
            }
        }
    }

    fn message(
        &self,
        camera: &str,
        model: &str,
        kind: EventKind,
        snapshot: bool,
        end: Option<(f64, EndReason)>,
    ) -> AlertEvent {
        AlertEvent {
            kind,
            id: self.id.clone(),
            camera: camera.to_string(),
            start_time: self.start_time,
            end_time: end.map(|(time, _)| time),
            score: self.score,
            top_score: self.top_score,
            boxes: self.boxes.clone(),
            snapshot,
            model: model.to_string(),
            end_reason: end.map(|(_, reason)| reason),
            snapshot_url: None,
            clip_url: None,
        }
    }
}

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Active(ActiveEvent),
    /// The debounce fired while the hourly cap was reached: followed like an event until it
    /// clears, so one anomaly counts once, but nothing is sent.
    Suppressed {
        below_since: Option<f64>,
    },
}

/// Turns one camera's frame summaries into alert events.
#[derive(Debug, Clone)]
pub struct AlertTracker {
    camera: String,
    model: String,
    config: AlertConfig,
    /// (time, score) of the last `m` frames.
    recent: VecDeque<(f64, f32)>,
    phase: Phase,
    /// No `new` event before this time (cooldown after an end).
    quiet_until: f64,
    /// When each `new` of the last hour was sent.
    sent_news: VecDeque<f64>,
    events_started: u64,
    suppressed: u64,
    last_score: f32,
    online: bool,
}

impl AlertTracker {
    /// `config` should have passed validation; the camera counts as offline until its first frame.
    pub fn new(camera: impl Into<String>, model: impl Into<String>, config: AlertConfig) -> Self {
        Self {
            camera: camera.into(),
            model: model.into(),
            recent: VecDeque::with_capacity(config.m.min(super::config::MAX_WINDOW)),
            config,
            phase: Phase::Idle,
            quiet_until: f64::NEG_INFINITY,
            sent_news: VecDeque::new(),
            events_started: 0,
            suppressed: 0,
            last_score: 0.0,
            online: false,
        }
    }

    /// New settings (a reload) from the next frame on; an event in progress goes on under them.
    pub fn set_config(&mut self, config: AlertConfig) {
        while self.recent.len() > config.m {
            self.recent.pop_front();
        }
        self.config = config;
    }

    /// Events from the next frame on name model `id` (a swapped-in model scored it).
    pub fn set_model(&mut self, id: &str) {
        self.model = id.to_string();
    }

    /// Feeds one analysed frame at unix time `t`. A `new` needs the current frame and at least
    /// `k - 1` of the `m - 1` frames before it above the on-threshold; during a cooldown the
    /// debounce keeps counting, so an anomaly still present when it expires starts an event then.
    /// Frames with a non-finite time are ignored; a NaN score counts as 0.
    pub fn observe(&mut self, t: f64, summary: &FrameSummary) -> Vec<AlertEvent> {
        if !t.is_finite() {
            return Vec::new();
        }
        let score = if summary.score.is_nan() {
            0.0
        } else {
            summary.score
        };
        self.online = true;
        self.last_score = score;
        if self.config.m > 0 {
            if self.recent.len() >= self.config.m {
                self.recent.pop_front();
            }
            self.recent.push_back((t, score));
        }
        match &mut self.phase {
            Phase::Idle => self.try_start(t, score, &summary.boxes),
            Phase::Suppressed { below_since } => {
                if cleared(below_since, t, score, &self.config) {
                    self.phase = Phase::Idle;
                    self.recent.clear();
                }
                Vec::new()
            }
            Phase::Active(event) => {
                event.score = score;
                event.boxes.clone_from(&summary.boxes);
                if cleared(&mut event.below_since, t, score, &self.config) {
                    let end_time = event.below_since.unwrap_or(t);
                    return self.finish(t, end_time, EndReason::Cleared);
                }
                let distance = self.config.new_region_distance;
                if distance > 0.0 {
                    event.follow(t, &summary.boxes, distance);
                    if event.lost >= self.config.m.max(1) {
                        // The event's region has gone (off the belt) while another one, far from
                        // it, stays anomalous: end this event; the other starts its own, from the
                        // same debounce window.
                        let end_time = event.lost_since.unwrap_or(t);
                        let window = std::mem::take(&mut self.recent);
                        let mut events = self.finish(t, end_time, EndReason::Cleared);
                        self.recent = window;
                        events.extend(self.try_start(t, score, &summary.boxes));
                        return events;
                    }
                }
                let is_top = score > event.top_score;
                if is_top {
                    event.top_score = score;
                }
                let rose = event.top_score - event.sent_top_score
                    >= self.config.update_min_rise - RISE_TOLERANCE;
                let centre = summary.boxes.first().map(BoxN::centre);
                let moved = match (centre, event.sent_centre) {
                    (Some((x, y)), Some((sent_x, sent_y))) => {
                        (x - sent_x).hypot(y - sent_y) > self.config.update_min_move
                    }
                    // The event started without a box: its first location is news.
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if !(rose || moved) || t - event.sent_at < self.config.update_min_seconds {
                    return Vec::new();
                }
                event.sent_at = t;
                event.sent_top_score = event.top_score;
                event.sent_centre = centre.or(event.sent_centre);
                vec![event.message(&self.camera, &self.model, EventKind::Update, is_top, None)]
            }
        }
    }

    /// The camera stopped delivering frames: ends an active event with `camera_offline`.
    pub fn camera_offline(&mut self, t: f64) -> Vec<AlertEvent> {
        self.online = false;
        self.finish(t, t, EndReason::CameraOffline)
    }

    /// The service is stopping: ends an active event with `shutdown`.
    pub fn shutdown(&mut self, t: f64) -> Vec<AlertEvent> {
        self.finish(t, t, EndReason::Shutdown)
    }

    pub fn camera(&self) -> &str {
        &self.camera
    }

    /// `new` events withheld by the hourly cap (one per anomaly, however long it lasts).
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }

    /// For the retained state topic: `anomaly` while an event (sent or suppressed) is open.
    pub fn status(&self) -> CameraStatus {
        match (&self.phase, self.online) {
            (_, false) => CameraStatus::Offline,
            (Phase::Idle, true) => CameraStatus::Ok,
            (Phase::Active(_) | Phase::Suppressed { .. }, true) => CameraStatus::Anomaly,
        }
    }

    /// The retained state payload, with the pipeline's measured `fps`.
    pub fn state(&self, fps: f32) -> CameraState {
        CameraState {
            status: self.status(),
            fps,
            score: self.last_score,
        }
    }

    fn try_start(&mut self, t: f64, score: f32, boxes: &[BoxN]) -> Vec<AlertEvent> {
        let on = self.config.on_threshold;
        if score <= on || t < self.quiet_until {
            return Vec::new();
        }
        let mut above = self.recent.iter().filter(|&&(_, s)| s > on);
        let first_above = above.next().map_or(t, |&(time, _)| time);
        if 1 + above.count() < self.config.k {
            return Vec::new();
        }
        while self
            .sent_news
            .front()
            .is_some_and(|&sent| t - sent >= HOUR_SECONDS)
        {
            self.sent_news.pop_front();
        }
        if self.sent_news.len() >= self.config.max_events_per_hour {
            self.suppressed += 1;
            self.phase = Phase::Suppressed { below_since: None };
            return Vec::new();
        }
        self.sent_news.push_back(t);
        let event = ActiveEvent {
            id: format!(
                "{}-{}-{}",
                self.camera,
                (first_above * 1000.0).round() as i64,
                self.events_started
            ),
            start_time: first_above,
            top_score: score,
            score,
            boxes: boxes.to_vec(),
            below_since: None,
            sent_top_score: score,
            sent_centre: boxes.first().map(BoxN::centre),
            sent_at: t,
            region: boxes.first().map(BoxN::centre),
            lost: 0,
            lost_since: None,
        };
        self.events_started += 1;
        let message = event.message(&self.camera, &self.model, EventKind::New, true, None);
        self.phase = Phase::Active(event);
        vec![message]
    }

    /// Closes whatever is open; sends `end` only for an announced event.
    fn finish(&mut self, t: f64, end_time: f64, reason: EndReason) -> Vec<AlertEvent> {
        self.recent.clear();
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Active(event) => {
                self.quiet_until = t + self.config.cooldown_seconds;
                let end = Some((end_time, reason));
                vec![event.message(&self.camera, &self.model, EventKind::End, false, end)]
            }
            Phase::Idle | Phase::Suppressed { .. } => Vec::new(),
        }
    }
}

/// Follows how long the score has stayed below the off-threshold (scores between off and on keep
/// an event alive); true once that has lasted `min_clear_seconds`.
fn cleared(below_since: &mut Option<f64>, t: f64, score: f32, config: &AlertConfig) -> bool {
    if score >= config.off_threshold {
        *below_since = None;
        return false;
    }
    let since = *below_since.get_or_insert(t);
    t - since >= config.min_clear_seconds
}

/// A `new` event with one score (as top score too) and nothing else: what the tests of the
/// modules that store, serve or publish events start from.
#[cfg(test)]
impl AlertEvent {
    pub(crate) fn sample(id: &str, camera: &str, start_time: f64, score: f32) -> Self {
        Self {
            kind: EventKind::New,
            id: id.into(),
            camera: camera.into(),
            start_time,
            end_time: None,
            score,
            top_score: score,
            boxes: Vec::new(),
            snapshot: false,
            model: "m".into(),
            end_reason: None,
            snapshot_url: None,
            clip_url: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: f64 = 1_700_000_000.0;
    /// 4 frames per second: exact in binary, so times compare exactly.
    const DT: f64 = 0.25;

    fn frame(score: f32) -> FrameSummary {
        FrameSummary {
            score,
            boxes: Vec::new(),
        }
    }

    fn boxed(score: f32, centre_x: f32, centre_y: f32) -> FrameSummary {
        FrameSummary {
            score,
            boxes: vec![BoxN {
                x: centre_x - 0.05,
                y: centre_y - 0.05,
                w: 0.1,
                h: 0.1,
            }],
        }
    }

    fn tracker(config: AlertConfig) -> AlertTracker {
        AlertTracker::new("line1", "brick-v1", config)
    }

    /// Feeds `scores` at `DT` spacing from frame index `first`; returns (frame index, event).
    fn feed(tracker: &mut AlertTracker, first: usize, scores: &[f32]) -> Vec<(usize, AlertEvent)> {
        let mut events = Vec::new();
        for (offset, &score) in scores.iter().enumerate() {
            let index = first + offset;
            for event in tracker.observe(T0 + index as f64 * DT, &frame(score)) {
                events.push((index, event));
            }
        }
        events
    }

    fn time(index: usize) -> f64 {
        T0 + index as f64 * DT
    }

    /// Defaults without the update rate limit, so single frames can be tested.
    fn unthrottled() -> AlertConfig {
        AlertConfig {
            update_min_seconds: 0.0,
            ..AlertConfig::default()
        }
    }

    #[test]
    fn updates_are_rate_limited_and_a_held_change_is_sent_later() {
        let config = AlertConfig::default();
        let per_update = (config.update_min_seconds / DT).round() as usize;
        let mut tracker = tracker(config);
        for i in 0..3 {
            tracker.observe(time(i), &boxed(0.9, 0.1, 0.2));
        }
        // The box moves steadily, like a part on a belt: 0.05 per frame, beyond update_min_move
        // (0.1) within every interval.
        let mut updates = Vec::new();
        for i in 3..3 + 3 * per_update {
            let x = 0.1 + 0.05 * (i - 2) as f32;
            for event in tracker.observe(time(i), &boxed(0.9, x, 0.2)) {
                updates.push(i);
                assert_eq!(event.kind, EventKind::Update);
            }
        }
        // The new event was sent at frame 2; one update per interval after that.
        let expected: Vec<usize> = (1..=3)
            .map(|n| 2 + n * per_update)
            .filter(|&i| i < 3 + 3 * per_update)
            .collect();
        assert_eq!(updates, expected);
    }

    #[test]
    fn fewer_than_k_high_frames_in_m_send_nothing() {
        let mut tracker = tracker(AlertConfig::default());
        // Never 3 highs within 5 frames; a score exactly at the on-threshold does not count.
        let events = feed(
            &mut tracker,
            0,
            &[0.9, 0.9, 0.2, 0.2, 0.2, 0.9, 0.5, 0.5, 0.9, 0.2, 0.2, 0.2],
        );
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(tracker.status(), CameraStatus::Ok);
    }

    #[test]
    fn k_of_m_sends_exactly_one_new() {
        let mut tracker = tracker(AlertConfig::default());
        let events = feed(
            &mut tracker,
            0,
            &[0.2, 0.9, 0.3, 0.8, 0.3, 0.7, 0.7, 0.7, 0.7],
        );
        assert_eq!(events.len(), 1, "{events:?}");
        let (index, new) = &events[0];
        assert_eq!(*index, 5);
        assert_eq!(new.kind, EventKind::New);
        assert_eq!(new.start_time, time(1)); // the first high frame in the window
        assert_eq!(new.end_time, None);
        assert_eq!((new.score, new.top_score), (0.7, 0.7));
        assert!(new.snapshot);
        assert_eq!(new.id, format!("line1-{}-0", (time(1) * 1000.0) as i64));
        assert_eq!(tracker.status(), CameraStatus::Anomaly);
    }

    #[test]
    fn hysteresis_and_clear_time() {
        let mut tracker = tracker(AlertConfig::default());
        assert_eq!(feed(&mut tracker, 0, &[0.9; 3]).len(), 1);
        // Between off (0.4) and on (0.5) for 10 s: still active.
        assert!(feed(&mut tracker, 3, &[0.45; 40]).is_empty());
        // Below off for 1.75 s, then back between: the clear clock restarts.
        assert!(feed(&mut tracker, 43, &[0.3; 8]).is_empty());
        assert!(feed(&mut tracker, 51, &[0.42]).is_empty());
        assert_eq!(tracker.status(), CameraStatus::Anomaly);
        // Below off from frame 52: ends at the frame 2.0 s later (52 + 8).
        let events = feed(&mut tracker, 52, &[0.3; 12]);
        assert_eq!(events.len(), 1, "{events:?}");
        let (index, end) = &events[0];
        assert_eq!(*index, 60);
        assert_eq!(end.kind, EventKind::End);
        assert_eq!(end.end_reason, Some(EndReason::Cleared));
        assert_eq!(end.end_time, Some(time(52)));
        assert_eq!(end.top_score, 0.9);
        assert_eq!(end.score, 0.3);
        assert!(!end.snapshot);
        assert_eq!(tracker.status(), CameraStatus::Ok);
    }

    #[test]
    fn cooldown_delays_the_next_new() {
        let config = AlertConfig {
            min_clear_seconds: 0.0,
            ..AlertConfig::default()
        };
        let mut tracker = tracker(config);
        let first = feed(&mut tracker, 0, &[0.9, 0.9, 0.9, 0.1]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[1].0, 3); // ended at frame 3: cooldown until frame 3 + 40
        let events = feed(&mut tracker, 4, &[0.9; 60]);
        assert_eq!(events.len(), 1, "{events:?}");
        let (index, new) = &events[0];
        assert_eq!(*index, 43);
        assert_eq!(new.kind, EventKind::New);
        assert_ne!(new.id, first[0].1.id);
        assert!(new.id.ends_with("-1"));
        assert_eq!(tracker.suppressed(), 0);
    }

    #[test]
    fn hourly_cap_suppresses_and_counts_once_per_anomaly() {
        let config = AlertConfig {
            min_clear_seconds: 0.0,
            cooldown_seconds: 0.0,
            max_events_per_hour: 2,
            ..AlertConfig::default()
        };
        let mut tracker = tracker(config);
        let burst = [0.9, 0.9, 0.9, 0.9, 0.9, 0.1];
        let mut news = 0;
        for round in 0..4 {
            let first = round * burst.len();
            let events = feed(&mut tracker, first, &burst[..5]);
            news += events
                .iter()
                .filter(|(_, e)| e.kind == EventKind::New)
                .count();
            // Suppressed or not, the state topic tells the truth.
            assert_eq!(tracker.status(), CameraStatus::Anomaly);
            feed(&mut tracker, first + 5, &burst[5..]);
        }
        assert_eq!(news, 2);
        assert_eq!(tracker.suppressed(), 2);
        // An hour after the first new, the cap has room again.
        let later = T0 + HOUR_SECONDS + 10.0;
        tracker.observe(later, &frame(0.1)); // clears the suppressed anomaly
        let mut events = Vec::new();
        for i in 0..3 {
            events.extend(tracker.observe(later + 1.0 + i as f64, &frame(0.9)));
        }
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::New);
        assert_eq!(tracker.suppressed(), 2);
    }

    #[test]
    fn update_on_rise() {
        let mut tracker = tracker(unthrottled());
        assert_eq!(feed(&mut tracker, 0, &[0.6; 3]).len(), 1);
        let events = feed(&mut tracker, 3, &[0.65, 0.7, 0.75, 0.55, 0.79, 0.8, 0.85]);
        let updates: Vec<(usize, f32, f32, bool)> = events
            .iter()
            .map(|(i, e)| {
                assert_eq!(e.kind, EventKind::Update);
                (*i, e.score, e.top_score, e.snapshot)
            })
            .collect();
        // 0.7 is 0.1 above the 0.6 sent with `new`; 0.8 is 0.1 above the 0.7 sent last.
        assert_eq!(updates, vec![(4, 0.7, 0.7, true), (8, 0.8, 0.8, true)]);
    }

    #[test]
    fn update_on_move() {
        let mut tracker = tracker(unthrottled());
        for i in 0..3 {
            tracker.observe(time(i), &boxed(0.9, 0.2, 0.2));
        }
        // A small shift (0.05) is not a move; 0.3 to the right is.
        assert!(tracker.observe(time(3), &boxed(0.9, 0.25, 0.2)).is_empty());
        let events = tracker.observe(time(4), &boxed(0.9, 0.5, 0.2));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Update);
        assert!(!events[0].snapshot); // the score did not rise
        let (x, y) = events[0].boxes[0].centre();
        assert!((x - 0.5).abs() < 1e-6 && (y - 0.2).abs() < 1e-6, "{x}, {y}");
        // Measured from the last sent position now.
        assert!(tracker.observe(time(5), &boxed(0.9, 0.55, 0.2)).is_empty());
        // Frames without boxes never count as a move.
        assert!(tracker.observe(time(6), &frame(0.9)).is_empty());
    }

    fn boxes(score: f32, centres: &[(f32, f32)]) -> FrameSummary {
        FrameSummary {
            score,
            boxes: centres
                .iter()
                .map(|&(x, y)| BoxN {
                    x: x - 0.05,
                    y: y - 0.05,
                    w: 0.1,
                    h: 0.1,
                })
                .collect(),
        }
    }

    /// A belt: defect A moves right and leaves the frame while defect B, on the next part, has
    /// entered at the left. The score never drops, yet A's event ends once its region has been gone
    /// for `m` frames, and B gets its own event at once (no cooldown here).
    #[test]
    fn a_region_that_leaves_while_another_stays_ends_its_event_and_starts_one() {
        let config = AlertConfig {
            cooldown_seconds: 0.0,
            ..unthrottled()
        };
        let m = config.m;
        let mut tracker = tracker(config);
        let mut events = Vec::new();
        let mut i = 0;
        // A alone, moving 0.02 per frame: one event, no split.
        while i < 15 {
            let x = 0.6 + 0.02 * i as f32;
            events.extend(tracker.observe(time(i), &boxes(0.9, &[(x, 0.5)])));
            i += 1;
        }
        // B enters at the left; A still in view for 3 frames, then gone.
        for j in 0..3 {
            let (a, b) = (0.6 + 0.02 * (i + j) as f32, 0.1 + 0.02 * j as f32);
            events.extend(tracker.observe(time(i + j), &boxes(0.9, &[(b, 0.5), (a, 0.5)])));
        }
        i += 3;
        let gone = i;
        for j in 0..m + 2 {
            let b = 0.16 + 0.02 * j as f32;
            events.extend(tracker.observe(time(i + j), &boxes(0.9, &[(b, 0.5)])));
        }
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        let news: Vec<&AlertEvent> = events.iter().filter(|e| e.kind == EventKind::New).collect();
        let ends: Vec<&AlertEvent> = events.iter().filter(|e| e.kind == EventKind::End).collect();
        assert_eq!((news.len(), ends.len()), (2, 1), "{kinds:?}");
        assert_eq!(ends[0].id, news[0].id);
        assert_ne!(news[1].id, news[0].id);
        assert_eq!(ends[0].end_reason, Some(EndReason::Cleared));
        assert_eq!(
            ends[0].end_time,
            Some(time(gone)),
            "A was last seen the frame before"
        );
        // The end comes first, then B's new in the same frame.
        let end_at = kinds.iter().position(|k| *k == EventKind::End);
        assert_eq!(
            kinds.get(end_at.map_or(0, |p| p + 1)),
            Some(&EventKind::New)
        );
        let (x, _) = news[1].boxes[0].centre();
        assert!(x < 0.4, "B's event is about B: {x}");
        assert_eq!(tracker.status(), CameraStatus::Anomaly);
    }

    #[test]
    fn jitter_a_second_region_or_a_zero_distance_keep_one_event() {
        type Centres = Vec<(f32, f32)>;
        let here = || vec![(0.5, 0.5)];
        // (new_region_distance, the frames' box centres).
        let cases: [(f32, Vec<Centres>); 3] = [
            // The region jitters by up to 0.1 around its place: it is followed.
            (
                0.3,
                (0..40)
                    .map(|i| vec![(0.5 + 0.1 * (i % 2) as f32, 0.5 - 0.08 * (i % 3) as f32)])
                    .collect(),
            ),
            // A second region far away comes and stays while the first stays too.
            (
                0.3,
                (0..40)
                    .map(|i| {
                        if i < 3 {
                            here()
                        } else {
                            vec![(0.1, 0.1), (0.5, 0.5)]
                        }
                    })
                    .collect(),
            ),
            // Off: the region jumps far for good, still one event.
            (
                0.0,
                (0..40)
                    .map(|i| if i < 3 { here() } else { vec![(0.1, 0.1)] })
                    .collect(),
            ),
        ];
        for (distance, frames) in cases {
            let config = AlertConfig {
                cooldown_seconds: 0.0,
                new_region_distance: distance,
                ..unthrottled()
            };
            let mut tracker = tracker(config);
            let mut kinds = Vec::new();
            for (i, centres) in frames.iter().enumerate() {
                for event in tracker.observe(time(i), &boxes(0.9, centres)) {
                    kinds.push(event.kind);
                }
            }
            let not_updates: Vec<_> = kinds.iter().filter(|k| **k != EventKind::Update).collect();
            assert_eq!(
                not_updates,
                [&EventKind::New],
                "distance {distance}: {kinds:?}"
            );
        }
        // The same permanent jump with the distance on does split: the case above is not vacuous.
        let mut tracker = tracker(AlertConfig {
            cooldown_seconds: 0.0,
            ..unthrottled()
        });
        let news = (0..40)
            .flat_map(|i| {
                let centres = if i < 3 { here() } else { vec![(0.1, 0.1)] };
                tracker.observe(time(i), &boxes(0.9, &centres))
            })
            .filter(|e| e.kind == EventKind::New)
            .count();
        assert_eq!(news, 2);
    }

    #[test]
    fn offline_and_shutdown_end_active_events() {
        let mut tracker = tracker(AlertConfig::default());
        assert!(tracker.camera_offline(time(0)).is_empty());
        assert_eq!(tracker.status(), CameraStatus::Offline);
        feed(&mut tracker, 1, &[0.9; 3]);
        let events = tracker.camera_offline(time(10));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::End);
        assert_eq!(events[0].end_reason, Some(EndReason::CameraOffline));
        assert_eq!(events[0].end_time, Some(time(10)));
        assert_eq!(tracker.status(), CameraStatus::Offline);
        assert!(tracker.camera_offline(time(11)).is_empty());

        // Back online after the cooldown; shutdown ends the next event.
        let events = feed(&mut tracker, 60, &[0.9; 3]);
        assert_eq!(events.len(), 1);
        assert_eq!(tracker.status(), CameraStatus::Anomaly);
        let events = tracker.shutdown(time(70));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].end_reason, Some(EndReason::Shutdown));
        assert!(tracker.shutdown(time(71)).is_empty());
        assert_eq!(
            serde_json::to_string(&tracker.state(12.5)).unwrap(),
            r#"{"status":"ok","fps":12.5,"score":0.9}"#
        );
    }

    #[test]
    fn json_shape_of_each_event_type() {
        let mut tracker = tracker(unthrottled());
        let mut events = Vec::new();
        for i in 0..3 {
            events.extend(tracker.observe(time(i), &boxed(0.6, 0.2, 0.2)));
        }
        events.extend(tracker.observe(time(3), &boxed(0.8, 0.2, 0.2)));
        events.extend(tracker.shutdown(time(4)));
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::New, EventKind::Update, EventKind::End]);

        let common = [
            "type",
            "id",
            "camera",
            "start_time",
            "end_time",
            "score",
            "top_score",
            "boxes",
            "snapshot",
            "model",
        ];
        for (event, kind) in events.iter().zip(["new", "update", "end"]) {
            let text = serde_json::to_string(event).unwrap();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let object = value.as_object().unwrap();
            let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
            let mut expected = common.to_vec();
            if kind == "end" {
                expected.push("end_reason");
            }
            keys.sort_unstable();
            expected.sort_unstable();
            assert_eq!(keys, expected, "{text}");
            assert_eq!(object["type"], kind);
            assert_eq!(object["camera"], "line1");
            assert_eq!(object["model"], "brick-v1");
            assert_eq!(object["start_time"], time(0));
            assert!(object["id"].as_str().unwrap().starts_with("line1-"));
            let boxes = object["boxes"].as_array().unwrap();
            assert_eq!(boxes.len(), 1);
            let mut box_keys: Vec<&str> = boxes[0]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            box_keys.sort_unstable();
            assert_eq!(box_keys, ["h", "w", "x", "y"]);
            let parsed: AlertEvent = serde_json::from_str(&text).unwrap();
            assert_eq!(&parsed, event);
        }
        let new: serde_json::Value = serde_json::to_value(&events[0]).unwrap();
        assert!(new["end_time"].is_null());
        assert_eq!(new["snapshot"], true);
        let end: serde_json::Value = serde_json::to_value(&events[2]).unwrap();
        assert_eq!(end["end_time"], time(4));
        assert_eq!(end["end_reason"], "shutdown");
        assert_eq!(end["top_score"].as_f64().unwrap() as f32, 0.8);
    }
}
