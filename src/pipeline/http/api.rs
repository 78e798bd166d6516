//! The events API under `/api`: the event store's rows (filtered, newest first, in pages), one
//! event, its peak snapshots, the operator's verdict, and the cameras' live state. Errors are JSON
//! (`{"error": "…"}`) naming the parameter at fault.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Served;
use crate::store::{EventStore, Query, StoreError, StoredEvent, Verdict};

/// Events per page when `limit` is not given, and the most a page holds.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

pub(super) fn routes() -> Router<Arc<Served>> {
    Router::new()
        .route("/api/events", get(list))
        .route("/api/events/{id}", get(one))
        .route("/api/events/{id}/snapshot.jpg", get(snapshot))
        .route("/api/events/{id}/clean.jpg", get(clean))
        .route("/api/events/{id}/clip.mp4", get(clip))
        .route("/api/events/{id}/verdict", post(verdict))
        .route("/api/cameras", get(cameras))
}

/// An error answer: its status and `{"error": message}`.
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

pub(super) fn fail(status: StatusCode, message: String) -> ApiError {
    ApiError { status, message }
}

/// A JSON error response.
/// 404 for `camera`: `known` says what it lacks when the run has it, else it is not configured.
pub(super) fn camera_lacks(served: &Served, camera: &str, known: &str) -> Response {
    let why = if served.metrics.camera(camera).is_some() {
        known
    } else {
        "is not configured"
    };
    error(StatusCode::NOT_FOUND, format!("camera {camera} {why}"))
}

pub(super) fn error(status: StatusCode, message: String) -> Response {
    fail(status, message).into_response()
}

fn bad(message: String) -> ApiError {
    fail(StatusCode::BAD_REQUEST, message)
}

/// Runs `work` on the event store of `served` off the async thread.
pub(super) async fn with_store<T: Send + 'static>(
    served: &Served,
    work: impl FnOnce(&EventStore) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let Some(folder) = served.storage.clone() else {
        return Err(fail(
            StatusCode::NOT_FOUND,
            "events are not kept: [storage] is off".into(),
        ));
    };
    tokio::task::spawn_blocking(move || {
        let store = EventStore::open_existing(&folder).map_err(|e| match e {
            // Deleted under the running writer, which makes a new one: a moment's wait.
            StoreError::Missing(_) => fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            e => internal(e),
        })?;
        work(&store)
    })
    .await
    .unwrap_or_else(|e| Err(internal(e)))
}

pub(super) fn internal(e: impl std::fmt::Display) -> ApiError {
    fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// An event as the API shows it: the stored row with URLs on this server instead of paths.
pub(super) fn event_json(event: &StoredEvent) -> Value {
    let url = |path: &Option<PathBuf>, name: &str| {
        path.is_some()
            .then(|| format!("/api/events/{}/{name}", event.id))
    };
    json!({
        "id": event.id,
        "camera": event.camera,
        "start_time": event.start_time,
        "end_time": event.end_time,
        "end_reason": event.end_reason,
        "score": event.score,
        "raw_score": event.raw_score,
        "box": event.boxes,
        "zone": event.zone,
        "model": event.model,
        "verdict": event.verdict,
        "verdict_by": event.verdict_by,
        "verdict_at": event.verdict_at,
        "snapshot_url": url(&event.snapshot_path, "snapshot.jpg"),
        "clean_url": url(&event.clean_path, "clean.jpg"),
        "clip_url": url(&event.clip_path, "clip.mp4"),
        "clip_start": event.clip_start,
    })
}

/// `cursor` is `<start_time>:<id>` of the last event of the previous page.
fn parse_query(params: &HashMap<String, String>) -> Result<Query, ApiError> {
    let mut query = Query {
        limit: DEFAULT_LIMIT,
        ..Query::default()
    };
    let number = |key: &str, value: &str| -> Result<f64, ApiError> {
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad(format!("{key} = `{value}`: expected a number")))
    };
    for (key, value) in params {
        match key.as_str() {
            "camera" => query.camera = Some(value.clone()),
            "since" => query.since = Some(number(key, value)?),
            "until" => query.until = Some(number(key, value)?),
            "min_score" => query.min_score = Some(number(key, value)? as f32),
            "verdict" => {
                query.verdict = Some(parse_verdict(value).ok_or_else(|| {
                    bad(format!(
                        "verdict = `{value}`: use unreviewed, defect or not_a_defect"
                    ))
                })?)
            }
            "limit" => {
                query.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| bad(format!("limit = `{value}`: use 1 to {MAX_LIMIT}")))?
            }
            "cursor" => {
                let parsed = value.split_once(':').and_then(|(time, id)| {
                    let time = time.parse::<f64>().ok().filter(|t| t.is_finite())?;
                    Some((time, id.to_string()))
                });
                query.before = Some(parsed.ok_or_else(|| {
                    bad(format!(
                        "cursor = `{value}`: pass the next_cursor of the previous page"
                    ))
                })?);
            }
            other => {
                return Err(bad(format!(
                    "unknown parameter `{other}` (camera, since, until, min_score, verdict, limit, cursor)"
                )));
            }
        }
    }
    Ok(query)
}

fn parse_verdict(text: &str) -> Option<Verdict> {
    match text {
        "unreviewed" => Some(Verdict::Unreviewed),
        "defect" => Some(Verdict::Defect),
        "not_a_defect" => Some(Verdict::NotADefect),
        _ => None,
    }
}

/// `GET /api/events`: `{"events": […], "next_cursor": "…" | null}`, newest first.
async fn list(
    State(served): State<Arc<Served>>,
    UrlQuery(params): UrlQuery<HashMap<String, String>>,
) -> Response {
    let query = match parse_query(&params) {
        Ok(query) => query,
        Err(e) => return e.into_response(),
    };
    let limit = query.limit;
    let listed = with_store(&served, move |store| store.list(&query).map_err(internal)).await;
    match listed {
        Ok(events) => {
            let next = (events.len() == limit)
                .then(|| events.last().map(|e| format!("{}:{}", e.start_time, e.id)))
                .flatten();
            let events: Vec<Value> = events.iter().map(event_json).collect();
            axum::Json(json!({ "events": events, "next_cursor": next })).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The stored event `id`, or a 404 response.
async fn find(served: &Served, id: String) -> Result<StoredEvent, ApiError> {
    with_store(served, move |store| {
        store
            .get(&id)
            .map_err(internal)?
            .ok_or_else(|| fail(StatusCode::NOT_FOUND, format!("no event {id}")))
    })
    .await
}

async fn one(State(served): State<Arc<Served>>, Path(id): Path<String>) -> Response {
    match find(&served, id).await {
        Ok(event) => axum::Json(event_json(&event)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A JPEG of the event's peak, or 404 when there is none (or retention removed it).
async fn picture(served: &Served, id: String, clean: bool) -> Response {
    let event = match find(served, id).await {
        Ok(event) => event,
        Err(e) => return e.into_response(),
    };
    let path = if clean {
        event.clean_path.clone()
    } else {
        event.snapshot_path.clone()
    };
    let Some(path) = path else {
        return error(
            StatusCode::NOT_FOUND,
            format!("event {} has no such picture", event.id),
        );
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/jpeg")], bytes).into_response(),
        Err(e) => unreadable(&event.id, "picture", &path, e),
    }
}

/// 404 when an event's file is gone (retention, or removed by hand), 500 when it is there but
/// cannot be read; the answer names the file, the log its folder too.
fn unreadable(id: &str, what: &str, path: &std::path::Path, e: std::io::Error) -> Response {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    if e.kind() == std::io::ErrorKind::NotFound {
        return error(
            StatusCode::NOT_FOUND,
            format!("event {id}: its {what} {name} is gone (removed by retention or by hand)"),
        );
    }
    log::warn!("http: event {id}: cannot read {}: {e}", path.display());
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("event {id}: its {what} {name} cannot be read: {e}"),
    )
}

async fn snapshot(State(served): State<Arc<Served>>, Path(id): Path<String>) -> Response {
    picture(&served, id, false).await
}

async fn clean(State(served): State<Arc<Served>>, Path(id): Path<String>) -> Response {
    picture(&served, id, true).await
}

/// The event's clip, with HTTP Range (browsers seek in it), or 404 when there is none.
async fn clip(
    State(served): State<Arc<Served>>,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Response {
    use tower::ServiceExt;
    let event = match find(&served, id).await {
        Ok(event) => event,
        Err(e) => return e.into_response(),
    };
    let Some(path) = event.clip_path.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("event {} has no clip", event.id),
        );
    };
    // ServeFile answers a missing or unreadable file with an empty body: say what is wrong.
    if let Err(e) = tokio::fs::File::open(&path).await {
        return unreadable(&event.id, "clip", &path, e);
    }
    // The type comes from the extension: video/mp4.
    match tower_http::services::ServeFile::new(&path)
        .oneshot(request)
        .await
    {
        Ok(response) => response.map(axum::body::Body::new),
        Err(e) => internal(e).into_response(),
    }
}

#[derive(Deserialize)]
struct VerdictBody {
    verdict: String,
    /// Who decided (free text until accounts exist).
    #[serde(default)]
    by: Option<String>,
}

/// `POST /api/events/{id}/verdict` with `{"verdict": "defect" | "not_a_defect" | "unreviewed",
/// "by": "…"}`: the updated event. With `[http.auth]` the author is the signed-in user (or
/// `token`), not `by`.
async fn verdict(
    State(served): State<Arc<Served>>,
    Path(id): Path<String>,
    signed_in: Option<axum::Extension<super::SignedIn>>,
    body: Result<axum::Json<VerdictBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return bad(format!("body: {}", rejection.body_text())).into_response(),
    };
    let Some(verdict) = parse_verdict(&body.verdict) else {
        return bad(format!(
            "verdict = `{}`: use unreviewed, defect or not_a_defect",
            body.verdict
        ))
        .into_response();
    };
    // With `[http.auth]` the author is who signed in, whatever the body says.
    let by = match signed_in {
        Some(axum::Extension(super::SignedIn(identity))) => identity,
        None => body.by.unwrap_or_else(|| "api".into()),
    };
    let now = crate::pipeline::unix_now();
    let changed = id.clone();
    let updated = with_store(&served, move |store| {
        match store.set_verdict(&id, verdict, &by, now) {
            Err(crate::store::StoreError::NoEvent(id)) => {
                return Err(fail(StatusCode::NOT_FOUND, format!("no event {id}")));
            }
            Err(e) => return Err(internal(e)),
            Ok(()) => {}
        }
        store
            .get(&id)
            .map_err(internal)?
            .ok_or_else(|| fail(StatusCode::NOT_FOUND, format!("no event {id}")))
    })
    .await;
    match updated {
        Ok(event) => {
            // Other consoles update their list; no one listening is fine.
            let _ = served.event_feed.send(changed);
            axum::Json(event_json(&event)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /api/cameras`: `{"cameras": [{"name", "state", "fps", "score", "model", "bundle",
/// "live"}, …]}`: `model` the live model's id, `bundle` its folder's name, `live` the path of the
/// camera's live view when it has one.
async fn cameras(State(served): State<Arc<Served>>) -> Response {
    let model = served.model.live_model();
    let cameras: Vec<Value> = served
        .metrics
        .cameras()
        .into_iter()
        .map(|(name, state, fps, score)| {
            json!({
                "name": name,
                "state": state.name(),
                "fps": (fps * 1000.0).round() / 1000.0,
                "score": score,
                "model": model.id,
                "bundle": model.name,
                "live": served
                    .live
                    .contains_key(&name)
                    .then(|| format!("/api/cameras/{name}/live")),
            })
        })
        .collect();
    axum::Json(json!({ "cameras": cameras })).into_response()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{call, call_with, runtime, served};
    use super::super::{Served, router};
    use crate::alerts::AlertEvent;
    use crate::pipeline::metrics::Metrics;
    use crate::store::{EventStore, Peak};
    use serde_json::Value;
    use std::sync::Arc;

    fn event(id: &str, camera: &str, start: f64, score: f32) -> AlertEvent {
        AlertEvent {
            snapshot: true,
            model: "demo".into(),
            ..AlertEvent::sample(id, camera, start, score)
        }
    }

    #[test]
    fn events_list_page_filter_serve_pictures_and_take_verdicts() {
        let dir = tempfile::tempdir().expect("dir");
        let store = EventStore::open(dir.path()).expect("store");
        let jpeg = dir.path().join("a.jpg");
        std::fs::write(&jpeg, "not really a jpeg").expect("jpeg");
        let peak = Peak {
            raw_score: Some(2.0),
            snapshot_path: Some(jpeg),
            clean_path: None,
        };
        store
            .record(&event("a-1", "line1", 10.0, 0.7), "m1", Some(&peak), 1.0)
            .expect("a-1");
        store
            .record(&event("b-2", "line2", 20.0, 0.9), "m1", None, 1.0)
            .expect("b-2");
        store
            .record(&event("a-3", "line1", 30.0, 0.6), "m1", None, 1.0)
            .expect("a-3");
        let metrics = Arc::new(Metrics::new("cpu", "fp32", &["line1".into()]));
        let app = router(Arc::new(Served {
            storage: Some(dir.path().to_path_buf()),
            model: super::super::tests::fixed_model("demo"),
            ..served(metrics)
        }));
        let json = |body: &str| serde_json::from_str::<Value>(body).expect("json");
        let ids = |body: &str| -> Vec<String> {
            json(body)["events"]
                .as_array()
                .map(|events| {
                    events
                        .iter()
                        .filter_map(|e| e["id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        runtime().block_on(async {
            let (status, _, body) = call(&app, "GET", "/api/events", "").await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(ids(&body), ["a-3", "b-2", "a-1"]);
            let all = json(&body);
            let first = &all["events"][2];
            assert_eq!(first["snapshot_url"], "/api/events/a-1/snapshot.jpg");
            assert_eq!(first["clip_url"], Value::Null);
            assert_eq!(
                (first["verdict"].as_str(), first["model"].as_str()),
                (Some("unreviewed"), Some("m1"))
            );
            assert_eq!(all["next_cursor"], Value::Null);

            let (_, _, body) =
                call(&app, "GET", "/api/events?camera=line1&min_score=0.65", "").await;
            assert_eq!(ids(&body), ["a-1"]);
            let (_, _, body) = call(&app, "GET", "/api/events?limit=2", "").await;
            assert_eq!(ids(&body), ["a-3", "b-2"]);
            let cursor = json(&body)["next_cursor"]
                .as_str()
                .map(String::from)
                .expect("cursor");
            let (_, _, body) = call(
                &app,
                "GET",
                &format!("/api/events?limit=2&cursor={cursor}"),
                "",
            )
            .await;
            assert_eq!(ids(&body), ["a-1"]);

            for (query, named) in [
                ("limit=0", "limit"),
                ("since=abc", "since"),
                ("verdict=maybe", "verdict"),
                ("bogus=1", "bogus"),
                ("cursor=x", "cursor"),
                ("cursor=NaN:a-1", "cursor"),
                ("cursor=inf:a-1", "cursor"),
            ] {
                let (status, _, body) =
                    call(&app, "GET", &format!("/api/events?{query}"), "").await;
                assert_eq!(status, 400, "{query}: {body}");
                assert!(
                    json(&body)["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(named)),
                    "{body}"
                );
            }

            let (status, _, body) = call(&app, "GET", "/api/events/b-2", "").await;
            assert_eq!(
                (status, json(&body)["camera"].as_str()),
                (200, Some("line2"))
            );
            assert_eq!(call(&app, "GET", "/api/events/nope", "").await.0, 404);
            let (status, kind, body) = call(&app, "GET", "/api/events/a-1/snapshot.jpg", "").await;
            assert_eq!(
                (status, kind.as_str(), body.as_str()),
                (200, "image/jpeg", "not really a jpeg")
            );
            assert_eq!(
                call(&app, "GET", "/api/events/a-1/clean.jpg", "").await.0,
                404
            );
            assert_eq!(
                call(&app, "GET", "/api/events/b-2/snapshot.jpg", "")
                    .await
                    .0,
                404
            );

            let (status, _, body) = call(
                &app,
                "POST",
                "/api/events/b-2/verdict",
                r#"{"verdict":"defect","by":"anna"}"#,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                (
                    json(&body)["verdict"].as_str(),
                    json(&body)["verdict_by"].as_str()
                ),
                (Some("defect"), Some("anna"))
            );
            let (_, _, body) = call(&app, "GET", "/api/events?verdict=defect", "").await;
            assert_eq!(ids(&body), ["b-2"]);
            let (status, _, body) = call(
                &app,
                "POST",
                "/api/events/b-2/verdict",
                r#"{"verdict":"maybe"}"#,
            )
            .await;
            assert!(status == 400 && body.contains("verdict"), "{body}");
            assert_eq!(
                call(&app, "POST", "/api/events/b-2/verdict", "not json")
                    .await
                    .0,
                400
            );
            assert_eq!(
                call(
                    &app,
                    "POST",
                    "/api/events/nope/verdict",
                    r#"{"verdict":"defect"}"#
                )
                .await
                .0,
                404
            );

            // Clips: whole, and by Range (206 with just those bytes).
            assert_eq!(
                call(&app, "GET", "/api/events/a-1/clip.mp4", "").await.0,
                404
            );
            let clip = dir.path().join("a-1.mp4");
            std::fs::write(&clip, "0123456789").expect("clip");
            EventStore::open(dir.path())
                .expect("store")
                .set_clip("a-1", &clip, 9.5)
                .expect("set clip");
            let (status, kind, body) = call(&app, "GET", "/api/events/a-1/clip.mp4", "").await;
            assert_eq!(
                (status, kind.as_str(), body.as_str()),
                (200, "video/mp4", "0123456789")
            );
            let (status, _, body) = call_with(
                &app,
                "GET",
                "/api/events/a-1/clip.mp4",
                "",
                &[("range", "bytes=2-5")],
            )
            .await;
            assert_eq!((status, body.as_str()), (206, "2345"));
            let (_, _, body) = call(&app, "GET", "/api/events/a-1", "").await;
            assert_eq!(json(&body)["clip_url"], "/api/events/a-1/clip.mp4");
            assert_eq!(json(&body)["clip_start"], 9.5);
            // A clip removed from the disk: 404 in JSON, saying so.
            std::fs::remove_file(&clip).expect("remove");
            let (status, kind, body) = call(&app, "GET", "/api/events/a-1/clip.mp4", "").await;
            assert_eq!((status, kind.as_str()), (404, "application/json"), "{body}");
            assert!(body.contains("its clip a-1.mp4 is gone"), "{body}");

            let (status, _, body) = call(&app, "GET", "/api/cameras", "").await;
            assert_eq!(status, 200);
            let cameras = json(&body);
            assert_eq!(cameras["cameras"][0]["name"], "line1");
            assert_eq!(cameras["cameras"][0]["state"], "starting");
            assert_eq!(cameras["cameras"][0]["model"], "demo");
        });
    }

    #[test]
    fn without_storage_the_events_api_says_so() {
        let app = router(Arc::new(served(Arc::new(Metrics::new("cpu", "fp32", &[])))));
        runtime().block_on(async {
            let (status, _, body) = call(&app, "GET", "/api/events", "").await;
            assert_eq!(status, 404);
            assert!(body.contains("[storage] is off"), "{body}");
        });
    }
}
