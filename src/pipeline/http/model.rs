//! `GET /api/model` says which model is live; `POST /api/model` with `{"bundle": "<path>"}` swaps
//! another bundle in while the cameras run and answers once it is live (200), or says why it was
//! refused (422, the running model stays; 409 while another swap loads).

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use super::Served;
use super::api::error;
use crate::pipeline::model::SwapError;

pub(super) fn routes() -> Router<Arc<Served>> {
    Router::new().route("/api/model", get(live).post(swap))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    /// A bundle folder on the machine running `stpm run` (relative to its working folder).
    bundle: PathBuf,
}

async fn live(State(served): State<Arc<Served>>) -> Response {
    axum::Json(served.model.live_model()).into_response()
}

async fn swap(State(served): State<Arc<Served>>, body: axum::body::Bytes) -> Response {
    let request: Request = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"bundle\": \"<bundle folder>\"}}: {e}"),
            );
        }
    };
    // Opening and warming up a model takes seconds: off the server's one thread.
    let model = Arc::clone(&served.model);
    let swapped = tokio::task::spawn_blocking(move || model.swap(&request.bundle)).await;
    match swapped {
        Ok(Ok(swapped)) => axum::Json(swapped).into_response(),
        Ok(Err(e @ SwapError::Busy)) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e)) if e.refused() => {
            log::warn!("model: refused, the live model stays: {e}");
            error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Ok(Err(e)) => {
            log::warn!("model: not swapped in, the live model stays: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
