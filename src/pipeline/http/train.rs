//! `POST /api/train` starts `stpm train` from the running pipeline (a child process at lowered
//! priority; body: `{"camera": "line1"}` or `{"data": "<folder>"}`, optional `out`, `swap`,
//! `threads`, `epochs`, `max_steps`); `GET /api/train` says how far it is (phase, epoch, loss,
//! ETA) and how it ended; `DELETE /api/train` stops it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::Served;
use super::api::error;
use crate::pipeline::training::{Cancel, TrainRequest, TrainSlot, TrainStartError};

pub(super) fn routes() -> Router<Arc<Served>> {
    Router::new().route("/api/train", get(status).post(start).delete(cancel))
}

/// The slot, or the 404 that says training is not offered.
fn slot(served: &Served) -> Result<Arc<TrainSlot>, Box<Response>> {
    served.train.clone().ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "this server does not train models".into(),
        ))
    })
}

async fn start(State(served): State<Arc<Served>>, body: axum::body::Bytes) -> Response {
    let slot = match slot(&served) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    let request: TrainRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected {{\"camera\": \"<name>\"}} or {{\"data\": \"<folder>\"}} (optional: out, swap, threads, epochs, max_steps): {e}"
                ),
            );
        }
    };
    match tokio::task::spawn_blocking(move || slot.start(request)).await {
        Ok(Ok(status)) => (StatusCode::ACCEPTED, axum::Json(status)).into_response(),
        Ok(Err(e @ TrainStartError::Busy)) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ TrainStartError::Request(_))) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn status(State(served): State<Arc<Served>>) -> Response {
    let slot = match slot(&served) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    match slot.status() {
        Some(status) => axum::Json(status).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no training has run in this run".into(),
        ),
    }
}

async fn cancel(State(served): State<Arc<Served>>) -> Response {
    let slot = match slot(&served) {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    match slot.cancel() {
        Cancel::Stopped => (StatusCode::ACCEPTED, axum::Json(slot.status())).into_response(),
        Cancel::Swapping => error(
            StatusCode::CONFLICT,
            "the training is done and its model is being swapped in".into(),
        ),
        Cancel::NotRunning => error(StatusCode::NOT_FOUND, "no training is running".into()),
    }
}
