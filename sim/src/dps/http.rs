//! The DPS device registration REST API on the emulator's HTTPS listener (PROTOCOL §12.1):
//! `PUT /{idScope}/registrations/{registrationId}/register` and
//! `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`, each with an
//! `api-version` query parameter (any value) and `Authorization: SharedAccessSignature ...`.
//! Answers carry `Retry-After` (seconds) where DPS sends it. Requests are logged at debug
//! without their headers.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;

use super::{Dps, DpsAnswer};

/// The routes, with their state applied: merged into the REST router.
pub fn router(dps: Dps) -> Router {
    Router::new()
        .route(
            "/:scope/registrations/:registration/register",
            put(register),
        )
        .route(
            "/:scope/registrations/:registration/operations/:operation",
            get(operation_status),
        )
        .with_state(dps)
}

async fn register(
    State(dps): State<Dps>,
    Path((scope, registration)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(missing) = require_api_version(&uri) {
        return missing;
    }
    let answer = dps
        .register(&scope, &registration, authorization(&headers), &body)
        .await;
    respond(answer)
}

async fn operation_status(
    State(dps): State<Dps>,
    Path((scope, registration, operation)): Path<(String, String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(missing) = require_api_version(&uri) {
        return missing;
    }
    respond(dps.operation_status(&scope, &registration, authorization(&headers), &operation))
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("(not text)"))
}

fn require_api_version(uri: &Uri) -> Option<Response> {
    let present = uri.query().is_some_and(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .any(|(k, v)| k == "api-version" && !v.is_empty())
    });
    (!present).then(|| {
        respond(DpsAnswer {
            status: 400,
            body: serde_json::json!({
                "errorCode": 400004,
                "message": "BadRequest: the api-version query parameter is required",
            }),
            retry_after: None,
        })
    })
}

fn respond(answer: DpsAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, answer.body.to_string()).into_response();
    let headers = res.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    if let Some(secs) = answer.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    res
}
