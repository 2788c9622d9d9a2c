//! The hub's side of the fleet bench: its throttle counters sampled into peak rates and a
//! bound, and the service REST calls an operator makes (a module configuration, or a
//! desired PATCH per module).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use edgetwin::identity::ServiceCredentials;
use edgetwin_sim::hub::Hub;
use edgetwin_sim::throttle::{Counts, Kind};
use edgetwin_sim::Sim;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{device, MODULE, PROPERTY};

const SAMPLE: Duration = Duration::from_millis(100);

/// Reads the hub's counters every [`SAMPLE`] on a thread of its own, so a busy runtime
/// (a thousand gateways on two cores) does not starve it.
pub struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Counts)>>,
}

impl Sampler {
    pub fn start(hub: Hub) -> Sampler {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = vec![(Instant::now(), hub.throttle_counts())];
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE);
                // On a loaded machine the thread can be descheduled between reading the
                // clock and the counters; such a sample would skew its window, so it is
                // dropped.
                let before = Instant::now();
                let counts = hub.throttle_counts();
                if before.elapsed() < Duration::from_millis(5) {
                    samples.push((before, counts));
                }
            }
            samples
        });
        Sampler { stop, thread }
    }

    pub async fn finish(self) -> Rates {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread;
        let samples = tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default();
        Rates(samples)
    }
}

pub struct Rates(Vec<(Instant, Counts)>);

impl Rates {
    /// Most operations of `kind` accepted within any 1 s window.
    pub fn peak(&self, kind: Kind) -> u64 {
        let s = &self.0;
        let mut best = 0;
        let mut j = 0;
        for i in 0..s.len() {
            while j + 1 < s.len() && s[j + 1].0.duration_since(s[i].0) <= Duration::from_secs(1) {
                j += 1;
            }
            j = j.max(i);
            best = best.max(s[j].1.get(kind).accepted - s[i].1.get(kind).accepted);
        }
        best
    }

    pub fn total(&self, kind: Kind) -> (u64, u64) {
        let (Some(first), Some(last)) = (self.0.first(), self.0.last()) else {
            return (0, 0);
        };
        let (a, b) = (first.1.get(kind), last.1.get(kind));
        (b.accepted - a.accepted, b.throttled - a.throttled)
    }

    /// Seconds the tier's buckets alone need for what was accepted in the phase: per
    /// kind, what exceeds the burst (one period's worth) at the rate; the slowest kind.
    pub fn bound(&self) -> f64 {
        let Some((_, last)) = self.0.last() else {
            return 0.0;
        };
        Kind::ALL
            .iter()
            .filter_map(|&k| {
                let rate = last.limit(k)?;
                let beyond = self.total(k).0.saturating_sub(u64::from(rate.amount));
                Some(beyond as f64 / rate.per_second())
            })
            .fold(0.0, f64::max)
    }
}

// ---- service side ----------------------------------------------------------------------

pub struct Rest {
    client: reqwest::Client,
    base: String,
    creds: ServiceCredentials,
}

impl Rest {
    pub fn new(sim: &Sim) -> Result<Rest> {
        let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes())?;
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("localhost", sim.https_addr())
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()?;
        let creds = sim
            // Configurations need RegistryWrite as well as ServiceConnect.
            .service_connection_string("iothubowner")
            .context("iothubowner policy")?
            .parse()?;
        Ok(Rest {
            client,
            base: format!("https://{}", sim.rest_authority()),
            creds,
        })
    }

    /// PATCH desired; 429 retried with jittered backoff. Returns the new desired `$version`
    /// and how many 429s it took.
    pub async fn set_desired(&self, device: &str, value: u64) -> Result<(u64, u64)> {
        let url = format!(
            "{}/twins/{device}/modules/{MODULE}?api-version=2021-04-12",
            self.base
        );
        let body = json!({"properties": {"desired": {PROPERTY: value}}});
        let mut throttled = 0;
        let mut ceiling = Duration::from_millis(200);
        loop {
            let token = self.creds.sas_token(edgetwin_sim::hub::unix_now() + 3600);
            let res = self
                .client
                .patch(&url)
                .header("Authorization", token)
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.to_string())
                .send()
                .await?;
            match res.status().as_u16() {
                200 => {
                    let twin: Value = res.json().await?;
                    let version = twin["properties"]["desired"]["$version"]
                        .as_u64()
                        .context("desired $version")?;
                    return Ok((version, throttled));
                }
                429 => {
                    throttled += 1;
                    let jitter = rand_below(ceiling.as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    ceiling = (ceiling * 2).min(Duration::from_secs(5));
                }
                status => bail!("PATCH {device}: {status} {}", res.text().await?),
            }
        }
    }
}

pub fn rand_below(n: u64) -> u64 {
    use rand::Rng;
    rand::rng().random_range(0..n.max(1))
}

/// The rollout as a module configuration (PROTOCOL §14.3) targeting every gateway's module.
pub fn configuration(value: u64, priority: i64) -> Value {
    json!({
        "schemaVersion": "2.0",
        "labels": {},
        "content": {"moduleContent": {format!("properties.desired.{PROPERTY}"): value}},
        "targetCondition": format!("FROM devices.modules WHERE moduleId = '{MODULE}'"),
        "priority": priority,
        "metrics": {"queries": {}},
    })
}

impl Rest {
    /// `PUT /configurations/{id}`; 429 retried. Returns how many 429s it took.
    pub async fn put_configuration(&self, id: &str, value: u64, priority: i64) -> Result<u64> {
        let url = format!("{}/configurations/{id}?api-version=2021-04-12", self.base);
        let mut body = configuration(value, priority);
        body["id"] = json!(id);
        let mut throttled = 0;
        loop {
            let token = self.creds.sas_token(edgetwin_sim::hub::unix_now() + 3600);
            let res = self
                .client
                .put(&url)
                .header("Authorization", token)
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.to_string())
                .send()
                .await?;
            match res.status().as_u16() {
                200 | 201 => return Ok(throttled),
                429 => {
                    throttled += 1;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                status => bail!("PUT configuration {id}: {status} {}", res.text().await?),
            }
        }
    }
}

/// One desired patch per module, `writers` at a time; the versions written and the 429s.
pub async fn patch_all(
    rest: &Arc<Rest>,
    n: usize,
    value: u64,
    writers: usize,
) -> Result<(Vec<(String, u64)>, u64)> {
    let queue = Arc::new(Mutex::new((0..n).map(device).collect::<Vec<_>>()));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (rest, queue) = (Arc::clone(rest), Arc::clone(&queue));
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut throttled = 0;
            loop {
                let next = queue.lock().expect("queue").pop();
                let Some(d) = next else { break };
                let (v, t) = rest.set_desired(&d, value).await?;
                throttled += t;
                done.push((d, v));
            }
            anyhow::Ok((done, throttled))
        }));
    }
    let mut versions = Vec::new();
    let mut throttled = 0;
    for t in tasks {
        let (done, t) = t.await??;
        versions.extend(done);
        throttled += t;
    }
    Ok((versions, throttled))
}

/// Every gateway's desired `$version` in the hub now.
pub fn desired_versions(hub: &Hub, n: usize) -> Result<Vec<(String, u64)>> {
    (0..n)
        .map(|i| {
            let d = device(i);
            let twin = hub.get_module_twin(&d, MODULE)?;
            let v = twin["properties"]["desired"]["$version"]
                .as_u64()
                .unwrap_or(0);
            Ok((d, v))
        })
        .collect()
}

pub fn acked(hub: &Hub, device: &str, version: u64) -> bool {
    hub.get_module_twin(device, MODULE).is_ok_and(|t| {
        t["properties"]["reported"][PROPERTY]["av"]
            .as_u64()
            .is_some_and(|av| av >= version)
    })
}

pub async fn until_acked(
    hub: &Hub,
    versions: &[(String, u64)],
    since: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let mut left: Vec<&(String, u64)> = versions.iter().collect();
    loop {
        left.retain(|(d, v)| !acked(hub, d, *v));
        if left.is_empty() {
            return Ok(since.elapsed());
        }
        if since.elapsed() > timeout {
            bail!("acks: {} modules still unacknowledged", left.len());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
