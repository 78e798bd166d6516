//! `POST /api/cameras/{camera}/collect` starts collecting good training frames from a running
//! camera into `<storage>/collect/<camera>/train/good` (body, optional: `{"frames": 150,
//! "every": 0.5}`); `GET` on the same path says how far it is.
//! `POST /api/cameras/{camera}/collect/not-a-defect` adds the clean peak frames of the camera's
//! events an operator marked "not a defect".

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::Served;
use super::api::{camera_lacks, error};
use crate::pipeline::collecting::{CollectSlot, StartError};

/// The most frames one collection may ask for.
const MAX_FRAMES: usize = 100_000;

pub(super) fn routes() -> Router<Arc<Served>> {
    Router::new()
        .route("/api/cameras/{camera}/collect", get(progress).post(start))
        .route(
            "/api/cameras/{camera}/collect/not-a-defect",
            axum::routing::post(add_reviewed),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default = "default_frames")]
    frames: usize,
    #[serde(default = "default_every")]
    every: f64,
}

fn default_frames() -> usize {
    150
}

fn default_every() -> f64 {
    0.5
}

/// The camera's collection slot, or the 404 that says why there is none.
fn slot(served: &Served, camera: &str) -> Result<Arc<CollectSlot>, Box<Response>> {
    served.collect.get(camera).cloned().ok_or_else(|| {
        Box::new(camera_lacks(
            served,
            camera,
            "cannot collect frames: [storage] is off",
        ))
    })
}

async fn start(
    State(served): State<Arc<Served>>,
    Path(camera): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let slot = match slot(&served, &camera) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    let request: Request = if body.iter().all(u8::is_ascii_whitespace) {
        Request {
            frames: default_frames(),
            every: default_every(),
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"frames\": N, \"every\": seconds}} (both optional): {e}"),
                );
            }
        }
    };
    let every_ok = request.every.is_finite() && (0.0..=3600.0).contains(&request.every);
    if !every_ok || !(1..=MAX_FRAMES).contains(&request.frames) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("frames must be 1 to {MAX_FRAMES}, every 0 to 3600 seconds"),
        );
    }
    // Creating the folder and the thread is quick, but off the server's one thread anyway.
    let model = served.model.live_model().id;
    let started =
        tokio::task::spawn_blocking(move || slot.start(request.frames, request.every, &model))
            .await;
    match started {
        Ok(Ok(progress)) => (StatusCode::ACCEPTED, axum::Json(progress)).into_response(),
        Ok(Err(e @ StartError::Busy(_))) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn add_reviewed(State(served): State<Arc<Served>>, Path(camera): Path<String>) -> Response {
    let slot = match slot(&served, &camera) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    let model = served.model.live_model().id;
    let query = crate::store::Query {
        camera: Some(camera.clone()),
        verdict: Some(crate::store::Verdict::NotADefect),
        limit: 100_000,
        ..Default::default()
    };
    let added = super::api::with_store(&served, move |store| {
        let events = store.list(&query).map_err(super::api::internal)?;
        slot.add_reviewed(&events, &model).map_err(|e| match e {
            StartError::Busy(_) => super::api::fail(StatusCode::CONFLICT, e.to_string()),
            e => super::api::internal(e),
        })
    })
    .await;
    match added {
        Ok(added) => axum::Json(serde_json::json!({
            "added": added.saved.len(),
            "already": added.duplicates,
            "events": added.seen,
            "frames": added.saved,
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn progress(State(served): State<Arc<Served>>, Path(camera): Path<String>) -> Response {
    let slot = match slot(&served, &camera) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    match slot.progress() {
        Some(progress) => axum::Json(progress).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("camera {camera} has not collected frames in this run"),
        ),
    }
}
