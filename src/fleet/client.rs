//! [`FleetClient`]: rollouts over the registry client's query and configuration calls.
//! Every call is quota-metered: a 429 is retried with [`super::pace::retry_throttled`]
//! on the injected clock, and each attempt is counted for `--wait`'s pacing.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};

use super::pace::{retry_throttled, Clock, QuotaPolicy, SystemClock};
use super::spec::{next_priority, RolloutSpec};
use super::status::{current_rejection, Rollout, RolloutStatus};
use super::watch::{Poll, Usage};
use super::FleetError;
use crate::registry::{Refusal, RegistryClient, RegistryError, MAX_PAGE};

/// The most configurations IoT Hub holds (standard tiers); `list` asks for this many.
pub const MAX_CONFIGURATIONS: u32 = 100;

/// What [`FleetClient::apply`] created.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub spec: RolloutSpec,
    /// The configuration as the hub stored it.
    pub configuration: Value,
}

/// Rollouts (IoT Hub module configurations) and twin queries for one hub.
#[derive(Clone)]
pub struct FleetClient {
    registry: RegistryClient,
    policy: QuotaPolicy,
    clock: Arc<dyn Clock>,
    draw: Arc<dyn Fn() -> f64 + Send + Sync>,
    usage: Arc<Mutex<Usage>>,
    page_size: u32,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetClient")
            .field("registry", &self.registry)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl FleetClient {
    pub fn new(registry: RegistryClient) -> Self {
        FleetClient {
            registry,
            policy: QuotaPolicy::default(),
            clock: Arc::new(SystemClock),
            draw: Arc::new(rand::random::<f64>),
            usage: Arc::default(),
            page_size: MAX_PAGE,
        }
    }

    /// The same client asking for pages of at most `rows` rows (default 1000).
    pub fn with_page_size(mut self, rows: u32) -> Self {
        self.page_size = rows.max(1);
        self
    }

    /// The same client with another throttling policy and clock.
    pub fn with_pacing(mut self, policy: QuotaPolicy, clock: Arc<dyn Clock>) -> Self {
        self.policy = policy;
        self.clock = clock;
        self
    }

    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// The calls counted since the last take.
    pub fn take_usage(&self) -> Usage {
        std::mem::take(&mut *self.usage.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Creates the rollout `name`: validated first (nothing is sent for bad input), then
    /// the hub's configurations read (for the name and the priority), then created.
    /// `priority` `None`: one above the configurations that set the same settings.
    pub async fn apply(
        &self,
        name: &str,
        module: &str,
        target: &str,
        priority: Option<i64>,
        settings: Map<String, Value>,
    ) -> Result<Applied, FleetError> {
        let mut spec = RolloutSpec::new(name, module, target, priority.unwrap_or(0), settings)?;
        let existing = self.configurations().await?;
        let next = next_priority(&existing, module, &spec.settings);
        if let Some(found) = existing
            .iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(name))
        {
            return Err(FleetError::Exists {
                name: name.to_owned(),
                priority: found.get("priority").and_then(Value::as_i64),
                next,
            });
        }
        spec.priority = priority.unwrap_or(next);
        let body = spec.body();
        let created = self
            .configuration_op(|| self.registry.create_configuration(&body))
            .await;
        match created {
            Ok(configuration) => Ok(Applied {
                spec,
                configuration,
            }),
            Err(FleetError::Registry(RegistryError::Conflict(_))) => Err(FleetError::Exists {
                name: name.to_owned(),
                priority: None,
                next,
            }),
            Err(FleetError::Registry(RegistryError::Invalid(message)))
                if existing.len() >= MAX_CONFIGURATIONS as usize
                    || message.contains("ConfigurationCountLimitExceeded") =>
            {
                Err(FleetError::TooMany {
                    name: name.to_owned(),
                    count: existing.len(),
                    message,
                })
            }
            Err(FleetError::Registry(RegistryError::Invalid(message))) => {
                Err(FleetError::Refused {
                    name: name.to_owned(),
                    message,
                })
            }
            Err(other) => Err(other),
        }
    }

    /// Every configuration of the hub (edgetwin's and others').
    pub async fn configurations(&self) -> Result<Vec<Value>, FleetError> {
        self.configuration_op(|| self.registry.list_configurations(MAX_CONFIGURATIONS))
            .await
    }

    pub async fn configuration(&self, name: &str) -> Result<Value, FleetError> {
        self.configuration_op(|| self.registry.get_configuration(name))
            .await
            .map_err(|e| not_found(e, name))
    }

    pub async fn remove(&self, name: &str) -> Result<(), FleetError> {
        self.configuration_op(|| self.registry.delete_configuration(name, None))
            .await
            .map_err(|e| not_found(e, name))
    }

    /// Every row of `query`, following the continuation pages.
    pub async fn query(&self, query: &str) -> Result<Vec<Value>, FleetError> {
        let mut rows = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let page = retry_throttled(&self.policy, self.clock(), self.draw.as_ref(), || {
                self.meter(|u| u.queries += 1);
                self.registry
                    .query_page(query, continuation.as_deref(), self.page_size)
            })
            .await
            .map_err(|r| match r.error {
                RegistryError::Invalid(message) => FleetError::Query(message),
                other => FleetError::from_registry(other),
            })?;
            rows.extend(page.items);
            match page.continuation {
                Some(next) if continuation.as_deref() != Some(next.as_str()) => {
                    continuation = Some(next)
                }
                _ => return Ok(rows),
            }
        }
    }

    /// The number a `SELECT COUNT() AS n ...` query answers.
    pub async fn count(&self, query: &str) -> Result<u64, FleetError> {
        let rows = self.query(query).await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                row.get("n")
                    .or_else(|| row.as_object()?.values().next())
                    .and_then(Value::as_u64)
            })
            .sum())
    }

    /// One rollout's status: 4 queries (more when the rejecting twins fill pages).
    pub async fn rollout_status(&self, rollout: &Rollout) -> Result<RolloutStatus, FleetError> {
        let queries = rollout
            .status_queries()
            .ok_or_else(|| FleetError::NotARollout(rollout.name.clone()))?;
        let targeted = self.count(&queries.targeted).await?;
        let applied = self.count(&queries.applied).await?;
        let superseded = self.count(&queries.superseded).await?;
        let rejections = self
            .query(&queries.rejecting)
            .await?
            .iter()
            .filter_map(|twin| current_rejection(twin, &rollout.settings))
            .collect();
        Ok(RolloutStatus::tally(
            rollout, targeted, applied, superseded, rejections,
        ))
    }

    /// The status of rollout `name`, or of every rollout; with what the poll cost.
    pub async fn status(&self, name: Option<&str>) -> Result<Poll, FleetError> {
        self.take_usage();
        let configurations = match name {
            Some(name) => vec![self.configuration(name).await?],
            None => self.configurations().await?,
        };
        let mut poll = Poll::default();
        for rollout in configurations.iter().filter_map(Rollout::from_hub) {
            if !rollout.is_countable() {
                if name.is_some() {
                    return Err(FleetError::NotARollout(rollout.name));
                }
                poll.skipped.push(rollout.name);
                continue;
            }
            poll.statuses.push(self.rollout_status(&rollout).await?);
        }
        poll.usage = self.take_usage();
        Ok(poll)
    }

    async fn configuration_op<T, F, Fut>(&self, mut op: F) -> Result<T, FleetError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Refusal>>,
    {
        retry_throttled(&self.policy, self.clock(), self.draw.as_ref(), || {
            self.meter(|u| u.configuration_ops += 1);
            op()
        })
        .await
        .map_err(|r| FleetError::from_registry(r.error))
    }

    fn meter(&self, add: impl FnOnce(&mut Usage)) {
        add(&mut self.usage.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

fn not_found(e: FleetError, name: &str) -> FleetError {
    match e {
        FleetError::Registry(RegistryError::NotFound(_)) => FleetError::NotFound(name.to_owned()),
        other => other,
    }
}
