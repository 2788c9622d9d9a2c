//! The quota-metered service operations (PROTOCOL §14.1, §14.3, §14.4): twin queries
//! (`POST /devices/query`, one page per call, `x-ms-continuation` paging) and automatic
//! configurations (`/configurations/{id}` create, read, list, delete).
//!
//! These count against the hub's per-minute quotas (20 queries and 20 configuration
//! operations per minute per S1 unit), so a 429 is not retried here: it comes back as a
//! [`Refusal`] with its `Retry-After`, and the caller (`crate::fleet`) paces itself.
//! Transient failures are still retried by the client, where safe.

use serde_json::Value;

use super::request::{Answer, Call, Refusal, Throttling};
use super::{quoted, seg, RegistryClient, Repeat};

/// Largest page the hub is documented to return (PROTOCOL §14.1: "up to 1000").
pub const MAX_PAGE: u32 = 1000;

/// One page of a query's results.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage {
    /// The rows: twins for `SELECT *`, objects for projections and aggregates.
    pub items: Vec<Value>,
    /// Where the next page starts; `None` when this was the last.
    pub continuation: Option<String>,
}

impl RegistryClient {
    /// One page of `query`, from `continuation` (none: the first page), at most
    /// `max_items` rows.
    pub async fn query_page(
        &self,
        query: &str,
        continuation: Option<&str>,
        max_items: u32,
    ) -> Result<QueryPage, Refusal> {
        let body = serde_json::json!({ "query": query });
        let mut headers = vec![("x-ms-max-item-count", max_items.to_string())];
        if let Some(token) = continuation {
            headers.push(("x-ms-continuation", token.to_owned()));
        }
        let answer = self
            // A query changes nothing: repeating it is always safe.
            .metered(
                &reqwest::Method::POST,
                "/devices/query",
                Some(&body),
                None,
                Repeat::Safe,
                &headers,
            )
            .await?;
        let continuation = answer
            .headers
            .get("x-ms-continuation")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        let items = match answer.body {
            Value::Array(items) => items,
            Value::Null => Vec::new(),
            _ => {
                return Err(Refusal {
                    error: super::RegistryError::Invalid(
                        "POST /devices/query: the hub's answer is not a JSON array".into(),
                    ),
                    retry_after: None,
                })
            }
        };
        Ok(QueryPage {
            items,
            continuation,
        })
    }

    /// Creates configuration `configuration["id"]` (no `If-Match`: an existing one is a
    /// 409). Sent again only when the hub cannot have acted on it, so a 409 always means
    /// someone else's configuration.
    pub async fn create_configuration(&self, configuration: &Value) -> Result<Value, Refusal> {
        let id = configuration
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let path = format!("/configurations/{}", seg(id));
        self.metered(
            &reqwest::Method::PUT,
            &path,
            Some(configuration),
            None,
            Repeat::IfUnprocessed,
            &[],
        )
        .await
        .map(|a| a.body)
    }

    pub async fn get_configuration(&self, id: &str) -> Result<Value, Refusal> {
        let path = format!("/configurations/{}", seg(id));
        self.metered(&reqwest::Method::GET, &path, None, None, Repeat::Safe, &[])
            .await
            .map(|a| a.body)
    }

    /// Up to `top` configurations (a hub holds at most 100).
    pub async fn list_configurations(&self, top: u32) -> Result<Vec<Value>, Refusal> {
        let path = format!("/configurations?top={top}");
        let body = self
            .metered(&reqwest::Method::GET, &path, None, None, Repeat::Safe, &[])
            .await?
            .body;
        Ok(match body {
            Value::Array(items) => items,
            _ => Vec::new(),
        })
    }

    /// Deletes a configuration; `etag` `None` sends `If-Match: "*"`.
    pub async fn delete_configuration(&self, id: &str, etag: Option<&str>) -> Result<(), Refusal> {
        let path = format!("/configurations/{}", seg(id));
        let if_match = quoted(etag);
        self.metered(
            &reqwest::Method::DELETE,
            &path,
            None,
            Some(&if_match),
            Repeat::Safe,
            &[],
        )
        .await
        .map(drop)
    }

    async fn metered(
        &self,
        method: &reqwest::Method,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
        repeat: Repeat,
        headers: &[(&'static str, String)],
    ) -> Result<Answer, Refusal> {
        self.exchange(&Call {
            method,
            path,
            body,
            if_match,
            repeat,
            headers,
            throttling: Throttling::Return,
        })
        .await
    }
}
