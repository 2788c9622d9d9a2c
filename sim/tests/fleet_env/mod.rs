//! Harness shared by the fleet REST tests (sim_query, sim_configurations): an emulator on
//! port 0, an HTTPS client trusting its CA, and calls as `iothubowner` with the headers
//! Microsoft's service SDK sends.

#![allow(dead_code)] // each test binary uses a different part

use std::time::Duration;

use edgetwin::identity::ServiceCredentials;
use edgetwin_sim::testing::{unix_now, TestSim};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

pub const API: &str = "api-version=2021-04-12";
/// Bound on a call that should take milliseconds; never a wait for something to happen.
const HANG: Duration = Duration::from_secs(30);

pub struct Env {
    pub t: TestSim,
    client: reqwest::Client,
    base: String,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Parsed JSON, or `Value::Null` for an empty body.
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the hub's error answer (status, `iothub-errorcode`, nested body) and
    /// returns the inner message.
    pub fn hub_error(&self, status: u16, name: &str, code: u64) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(self.header("iothub-errorcode"), Some(name), "{}", self.body);
        let inner: Value = serde_json::from_str(
            self.body["Message"]
                .as_str()
                .unwrap_or_else(|| panic!("no Message in {}", self.body)),
        )
        .expect("Message holds JSON text");
        assert_eq!(inner["errorCode"], code, "inner: {inner}");
        inner["message"].as_str().unwrap_or_default().to_string()
    }
}

impl Env {
    pub async fn start() -> Env {
        Env::wrap(TestSim::start().await)
    }

    pub fn wrap(t: TestSim) -> Env {
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(t.sim.ca_pem().as_bytes()).unwrap(),
            )
            .resolve("localhost", t.sim.https_addr())
            .no_proxy()
            .timeout(HANG)
            .build()
            .unwrap();
        let base = format!("https://{}", t.sim.rest_authority());
        Env { t, client, base }
    }

    pub fn token(&self, policy: &str) -> String {
        let creds: ServiceCredentials = self
            .t
            .sim
            .service_connection_string(policy)
            .unwrap()
            .parse()
            .unwrap();
        creds.sas_token(unix_now() + 3600)
    }

    /// A call as `policy`; `path` without a query gets `api-version`.
    pub async fn call_as(
        &self,
        policy: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let url = if path.contains('?') {
            format!("{}{path}", self.base)
        } else {
            format!("{}{path}?{API}", self.base)
        };
        let mut rb = self
            .client
            .request(method, url)
            .header("Authorization", self.token(policy))
            .header("Accept", "application/json");
        if let Some(body) = body {
            rb = rb
                .header("Content-Type", "application/json; charset=utf-8")
                .body(serde_json::to_vec(body).unwrap());
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let res = rb.send().await.expect("request failed");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!("non-JSON body ({e}): {}", String::from_utf8_lossy(&bytes))
            })
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        self.call_as("iothubowner", method, path, body, headers)
            .await
    }

    /// One page of `query`.
    pub async fn query_page(
        &self,
        query: &str,
        max: Option<usize>,
        continuation: Option<&str>,
    ) -> Reply {
        let max = max.map(|m| m.to_string());
        let mut headers = Vec::new();
        if let Some(m) = &max {
            headers.push(("x-ms-max-item-count", m.as_str()));
        }
        if let Some(c) = continuation {
            headers.push(("x-ms-continuation", c));
        }
        self.call(
            Method::POST,
            "/devices/query",
            Some(&json!({ "query": query })),
            &headers,
        )
        .await
    }

    /// Every row of `query`, following continuation tokens; also returns the page count.
    pub async fn query_all(&self, query: &str, max: Option<usize>) -> (Vec<Value>, usize) {
        let mut rows = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let r = self.query_page(query, max, token.as_deref()).await;
            assert_eq!(r.status, StatusCode::OK, "{query}: {}", r.body);
            pages += 1;
            rows.extend(r.body.as_array().expect("an array").iter().cloned());
            match r.header("x-ms-continuation") {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return (rows, pages),
            }
            assert!(pages < 1000, "paging does not end");
        }
    }

    /// Registers `d/m` and sets its tags.
    pub fn module_with_tags(&self, d: &str, m: &str, tags: Value) {
        self.t.register(d, m);
        self.t
            .hub()
            .write_module_twin(
                d,
                m,
                edgetwin_sim::service_side::TwinWrite::Patch,
                &json!({ "tags": tags }),
                None,
            )
            .expect("tags set");
    }
}

impl Env {
    /// `d/m` reports `patch` over MQTT, as a module does; returns once the hub applied it.
    pub async fn report(&self, d: &str, m: &str, patch: Value) {
        let mut events = self.t.hub().events();
        let mut client = self.t.connect(d, m, true).await;
        client.subscribe(&["$iothub/twin/res/#"]).await;
        client
            .publish(
                "$iothub/twin/PATCH/properties/reported/?$rid=1",
                patch.to_string(),
            )
            .await;
        let module = edgetwin_sim::testing::key(d, m);
        edgetwin_sim::testing::wait_event(&mut events, |e| match e {
            edgetwin_sim::SimEvent::ReportedPatched { module: k, .. } if *k == module => Some(()),
            _ => None,
        })
        .await;
        client.disconnect().await;
    }
}
