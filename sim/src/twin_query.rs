//! The hub's twin query service (`POST /devices/query`, PROTOCOL §14.1): runs a parsed
//! [`Query`](crate::query::Query) over the current twin documents and hands back one page
//! with a continuation token for the next.
//!
//! The token is opaque to clients: base64 of the offset into the result and a hash of the
//! query text, so a token presented with another query is refused. Results are ordered by
//! device and module id; like the real hub's (eventually consistent) results, pages of a
//! result that changes between calls may overlap or skip.

use base64::Engine as _;
use serde_json::{json, Value};

use super::errors::HubError;
use super::hub::{identity_etag, Hub, State};
use super::query::{self, Collection, ItemType, Query};
use super::service_side::twin_doc;

/// Page size when the client sends no `x-ms-max-item-count`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page the emulator serves; larger requests get this many.
pub const MAX_PAGE_SIZE: usize = 1000;

/// One page of a query's result.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage {
    pub items: Vec<Value>,
    pub item_type: ItemType,
    /// Present when more rows follow; send it back as `x-ms-continuation`.
    pub continuation: Option<String>,
}

/// A query text refused by the parser, as the hub answers it: 400 with the position.
pub fn invalid_query(e: &query::QueryError) -> HubError {
    HubError::argument_invalid(format!("Invalid query: {e}"))
}

impl Hub {
    /// Runs `text` and returns the page starting at `continuation` (None: the first) of at
    /// most `page_size` rows (None: [`DEFAULT_PAGE_SIZE`]).
    pub fn query_twins(
        &self,
        text: &str,
        continuation: Option<&str>,
        page_size: Option<usize>,
    ) -> Result<QueryPage, HubError> {
        let query = query::parse(text).map_err(|e| invalid_query(&e))?;
        let hash = fnv1a(text.as_bytes());
        let offset = match continuation.map(str::trim).filter(|c| !c.is_empty()) {
            None => 0,
            Some(token) => decode_token(token, hash)?,
        };
        let size = page_size
            .unwrap_or(DEFAULT_PAGE_SIZE)
            .clamp(1, MAX_PAGE_SIZE);
        let rows = self.run_query(&query);
        let end = offset.saturating_add(size).min(rows.len());
        let items = rows
            .get(offset..end)
            .map(<[Value]>::to_vec)
            .unwrap_or_default();
        Ok(QueryPage {
            items,
            item_type: query.item_type(),
            continuation: (end < rows.len()).then(|| encode_token(end, hash)),
        })
    }

    /// Every row of `query` over the twins as they are now.
    pub fn run_query(&self, query: &Query) -> Vec<Value> {
        let docs = {
            let st = self.state();
            collection_docs(&st, query.from)
        };
        query.run(&docs)
    }
}

/// The documents of a collection, ordered by device and module id.
pub(super) fn collection_docs(st: &State, from: Collection) -> Vec<Value> {
    match from {
        Collection::Modules => module_twin_docs(st),
        Collection::Devices => st
            .data
            .devices
            .keys()
            .map(|d| device_twin_doc(st, d))
            .collect(),
    }
}

/// Every module twin as the service sees it.
pub(super) fn module_twin_docs(st: &State) -> Vec<Value> {
    st.data
        .devices
        .iter()
        .flat_map(|(d, rec)| rec.modules.keys().map(move |m| (d, m)))
        .filter_map(|(d, m)| twin_doc(st, d, m).ok())
        .collect()
}

/// A device twin for `FROM devices`: the emulator keeps no device twin properties, so
/// both sections are empty at version 1; identity fields come from the registry.
fn device_twin_doc(st: &State, device_id: &str) -> Value {
    let d = &st.data.devices[device_id];
    let connected = st.connections.keys().any(|k| k.device_id == device_id);
    let section = json!({"$metadata": {"$lastUpdated": d.status_updated}, "$version": 1});
    json!({
        "deviceId": device_id,
        "etag": "AAAAAAAAAAE=",
        "deviceEtag": identity_etag(d.etag_seq),
        "status": if d.enabled { "enabled" } else { "disabled" },
        "statusUpdateTime": d.status_updated,
        "connectionState": if connected { "Connected" } else { "Disconnected" },
        "lastActivityTime": "0001-01-01T00:00:00Z",
        "cloudToDeviceMessageCount": 0,
        "authenticationType": "sas",
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "modelId": "",
        "version": 2,
        "properties": {"desired": section.clone(), "reported": section},
        "capabilities": {"iotEdge": d.iot_edge}
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn encode_token(offset: usize, hash: u64) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{offset}:{hash:016x}"))
}

fn decode_token(token: &str, hash: u64) -> Result<usize, HubError> {
    let invalid = || {
        HubError::argument_invalid("x-ms-continuation is not a continuation token of this query")
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(raw).map_err(|_| invalid())?;
    let (offset, h) = text.split_once(':').ok_or_else(invalid)?;
    if u64::from_str_radix(h, 16).ok() != Some(hash) {
        return Err(invalid());
    }
    offset.parse().map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::register;

    fn hub_with(n: usize) -> (tempfile::TempDir, Hub) {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open("localhost", dir.path()).unwrap();
        for i in 0..n {
            register(&hub, &format!("d{i:02}"), "m");
        }
        (dir, hub)
    }

    #[test]
    fn pages_follow_continuation_tokens_to_the_end() {
        let (_dir, hub) = hub_with(7);
        let q = "SELECT deviceId FROM devices.modules";
        let mut seen = Vec::new();
        let mut token = None;
        loop {
            let page = hub.query_twins(q, token.as_deref(), Some(3)).unwrap();
            assert!(page.items.len() <= 3);
            seen.extend(
                page.items
                    .iter()
                    .map(|r| r["deviceId"].as_str().unwrap().to_string()),
            );
            match page.continuation {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let expected: Vec<String> = (0..7).map(|i| format!("d{i:02}")).collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_token_of_another_query_or_garbage_is_refused() {
        let (_dir, hub) = hub_with(3);
        let page = hub
            .query_twins("SELECT * FROM devices.modules", None, Some(1))
            .unwrap();
        let token = page.continuation.expect("more pages");
        let other = hub.query_twins(
            "SELECT deviceId FROM devices.modules",
            Some(&token),
            Some(1),
        );
        assert_eq!(other.unwrap_err().code, 400004);
        let garbage = hub.query_twins("SELECT * FROM devices.modules", Some("%%%"), None);
        assert_eq!(garbage.unwrap_err().code, 400004);
    }

    #[test]
    fn device_twins_answer_from_devices() {
        let (_dir, hub) = hub_with(2);
        let page = hub
            .query_twins("SELECT * FROM devices WHERE deviceId = 'd01'", None, None)
            .unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0]["status"], "enabled");
        assert_eq!(page.item_type, ItemType::Twin);
    }
}
