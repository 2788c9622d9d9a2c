//! REST routes for fleets (PROTOCOL §14): the twin query API (`POST /devices/query`) and
//! automatic configurations (`/configurations/{id}`, `/configurations`,
//! `/configurations/testQueries`). The work is in [`crate::twin_query`] and
//! [`crate::configurations`]; this maps HTTP onto it, headers included.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use super::{blocking, error_response, methods, respond, App, Call, JSON_UTF8};
use crate::errors::HubError;
use crate::hub::Right;

pub const CONTINUATION: &str = "x-ms-continuation";
pub const MAX_ITEM_COUNT: &str = "x-ms-max-item-count";
pub const ITEM_TYPE: &str = "x-ms-item-type";

/// The fleet routes, merged into the hub's router.
pub(super) fn routes() -> Router<App> {
    Router::new()
        .route("/devices/query", methods(post(query)))
        .route("/configurations", methods(get(list_configurations)))
        .route("/configurations/testQueries", methods(post(test_queries)))
        .route(
            "/configurations/:id",
            methods(
                get(get_configuration)
                    .put(put_configuration)
                    .delete(delete_configuration),
            ),
        )
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, HubError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| HubError::argument_invalid(format!("{name} is not text")))
        })
        .transpose()
}

/// `POST /devices/query`: body `{"query": "..."}`, paging by `x-ms-max-item-count` and
/// `x-ms-continuation`; answers a JSON array with `x-ms-item-type` and, while more rows
/// follow, `x-ms-continuation`.
async fn query(State(app): State<App>, mut call: Call<()>) -> Response {
    let page = async {
        call.begin(&app, Right::ServiceConnect)?;
        // Throttling (h13, sim/src/throttle.rs): the queries bucket is taken here.
        let body = call.json()?;
        let text = body
            .get("query")
            .and_then(Value::as_str)
            .ok_or_else(|| HubError::argument_invalid("the body must be {\"query\": \"...\"}"))?
            .to_owned();
        let continuation = header_text(&call.headers, CONTINUATION)?.map(str::to_owned);
        let size = header_text(&call.headers, MAX_ITEM_COUNT)?
            .map(|v| {
                v.trim().parse::<usize>().map_err(|_| {
                    HubError::argument_invalid(format!(
                        "{MAX_ITEM_COUNT} must be a positive whole number, not '{v}'"
                    ))
                })
            })
            .transpose()?;
        let hub = app.hub.clone();
        blocking(move || hub.query_twins(&text, continuation.as_deref(), size)).await
    }
    .await;
    match page {
        Ok(page) => {
            let mut res = (StatusCode::OK, Value::Array(page.items).to_string()).into_response();
            let headers = res.headers_mut();
            headers.insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static(JSON_UTF8),
            );
            headers.insert(
                HeaderName::from_static(ITEM_TYPE),
                HeaderValue::from_static(page.item_type.as_str()),
            );
            if let Some(token) = page.continuation {
                if let Ok(v) = HeaderValue::from_str(&token) {
                    headers.insert(HeaderName::from_static(CONTINUATION), v);
                }
            }
            res
        }
        Err(e) => error_response(&e),
    }
}

// ---- configurations ------------------------------------------------------------------
// Throttling (h13, sim/src/throttle.rs): the configurations bucket (20/min/unit) is taken
// in each handler below right after `call.begin`.

async fn get_configuration(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let id = call.begin(&app, Right::RegistryRead)?;
        Ok((StatusCode::OK, Some(app.hub.get_configuration(&id)?)))
    })
    .await
}

async fn put_configuration(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let id = call.begin(&app, Right::RegistryWrite)?;
        let body = call.json()?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        let doc = blocking(move || hub.put_configuration(&id, &body, if_match.as_deref())).await?;
        Ok((StatusCode::OK, Some(doc)))
    })
    .await
}

async fn delete_configuration(State(app): State<App>, mut call: Call<String>) -> Response {
    respond(async move {
        let id = call.begin(&app, Right::RegistryWrite)?;
        let if_match = call.if_match()?;
        let hub = app.hub.clone();
        blocking(move || hub.delete_configuration(&id, if_match.as_deref())).await?;
        Ok((StatusCode::NO_CONTENT, None))
    })
    .await
}

async fn list_configurations(State(app): State<App>, mut call: Call<()>) -> Response {
    respond(async move {
        call.begin(&app, Right::RegistryRead)?;
        let top = call
            .uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "top")
            .map(|(_, v)| {
                v.parse::<usize>().map_err(|_| {
                    HubError::argument_invalid(format!("top must be a whole number, not '{v}'"))
                })
            })
            .transpose()?;
        Ok((StatusCode::OK, Some(app.hub.list_configurations(top))))
    })
    .await
}

async fn test_queries(State(app): State<App>, mut call: Call<()>) -> Response {
    respond(async move {
        call.begin(&app, Right::RegistryRead)?;
        let body = call.json()?;
        Ok((
            StatusCode::OK,
            Some(app.hub.test_configuration_queries(&body)),
        ))
    })
    .await
}
