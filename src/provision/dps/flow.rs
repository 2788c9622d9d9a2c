//! The register-then-poll loop of one [`DpsClient::register`] call: what each answer means
//! ([`next`], pure, unit-tested without a socket) and the loop that sends, waits and stops
//! within the [`PollPolicy`] ([`run`]).

use std::time::Duration;

use tokio::time::Instant;

use super::wire::{FinalStatus, Reply};
use super::{DpsAssignment, DpsClient, DpsError, DpsRequest, PollPolicy};

/// What to do after one answer.
#[derive(Debug)]
pub(super) enum Next {
    Done(DpsAssignment),
    /// Final: return this error.
    Stop(DpsError),
    /// Poll this operation after the pause.
    Poll {
        operation_id: String,
        pause: Duration,
    },
    /// The request failed in a way worth repeating; `register` again instead of polling
    /// when `restart`.
    Again {
        error: DpsError,
        pause: Duration,
        restart: bool,
    },
}

/// Classifies one answer. `answer` is `Err` for what never became a DPS answer (network,
/// unreadable body); `polling` says whether it answered a poll; `failures` counts this
/// failure among those in a row (1 for the first).
pub(super) fn next(
    request: &DpsRequest,
    policy: &PollPolicy,
    answer: Result<Reply, DpsError>,
    polling: bool,
    failures: u32,
) -> Next {
    let reply = match answer {
        Ok(reply) => reply,
        Err(error) => {
            return Next::Again {
                error,
                pause: policy.backoff(failures),
                restart: false,
            }
        }
    };
    let registration_id = || request.registration_id.clone();
    match reply {
        Reply::Assigned { assignment, .. } => Next::Done(assignment),
        Reply::Assigning {
            operation_id,
            retry_after,
        } => match policy.pause(retry_after) {
            Ok(pause) => Next::Poll {
                operation_id,
                pause,
            },
            Err(asked) => Next::Stop(DpsError::Throttled {
                message: format!(
                    "DPS asked to poll registration {} again in {} s, longer than this client waits",
                    request.registration_id,
                    asked.as_secs()
                ),
                retry_after: Some(asked),
            }),
        },
        Reply::Final {
            status,
            error_code,
            message,
        } => Next::Stop(match status {
            FinalStatus::Disabled => DpsError::Disabled {
                registration_id: registration_id(),
                message,
            },
            FinalStatus::Unassigned => DpsError::Unassigned {
                registration_id: registration_id(),
                message,
            },
            FinalStatus::Failed => DpsError::Failed {
                registration_id: registration_id(),
                error_code,
                message,
            },
        }),
        Reply::Error {
            http_status,
            error_code,
            message,
            retry_after,
        } => {
            let message = match error_code {
                Some(code) if !message.contains(&code.to_string()) => {
                    format!("{message} (error {code})")
                }
                _ => message,
            };
            match http_status {
                401 | 403 => Next::Stop(DpsError::Unauthorized {
                    registration_id: registration_id(),
                    status: http_status,
                    message,
                }),
                // A poll for an operation DPS no longer knows: register again.
                404 if polling => Next::Again {
                    error: DpsError::Rejected {
                        status: 404,
                        message,
                    },
                    pause: policy.backoff(failures),
                    restart: true,
                },
                404 => Next::Stop(DpsError::UnknownScope {
                    id_scope: request.id_scope.clone(),
                    endpoint: request.global_endpoint.to_string(),
                    message,
                }),
                429 => match policy.pause(retry_after) {
                    Ok(pause) => Next::Again {
                        error: DpsError::Throttled {
                            message,
                            retry_after,
                        },
                        pause,
                        restart: false,
                    },
                    Err(asked) => Next::Stop(DpsError::Throttled {
                        message,
                        retry_after: Some(asked),
                    }),
                },
                500..=599 => Next::Again {
                    error: DpsError::Transient(format!("HTTP {http_status}: {message}")),
                    pause: match retry_after {
                        Some(_) => policy.pause(retry_after).unwrap_or(policy.max_interval),
                        None => policy.backoff(failures),
                    },
                    restart: false,
                },
                status => Next::Stop(DpsError::Rejected { status, message }),
            }
        }
    }
}

/// Registers, then polls, within `client`'s policy.
pub(super) async fn run(
    client: &DpsClient,
    request: &DpsRequest,
) -> Result<DpsAssignment, DpsError> {
    let policy = client.policy;
    let started = Instant::now();
    let mut operation: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let answer = client.send(request, operation.as_deref()).await;
        let failed = !matches!(
            answer,
            Ok(Reply::Assigning { .. } | Reply::Assigned { .. } | Reply::Final { .. })
        );
        failures = if failed { failures + 1 } else { 0 };
        let (pause, on_timeout) =
            match next(request, &policy, answer, operation.is_some(), failures) {
                Next::Done(assignment) => {
                    tracing::debug!(
                        registration = %request.registration_id,
                        hub = %assignment.assigned_hub,
                        device = %assignment.device_id,
                        "DPS assigned"
                    );
                    return Ok(assignment);
                }
                Next::Stop(error) => return Err(error),
                Next::Poll {
                    operation_id,
                    pause,
                } => {
                    tracing::debug!(
                        registration = %request.registration_id,
                        pause_ms = pause.as_millis() as u64,
                        "DPS registration assigning"
                    );
                    operation = Some(operation_id);
                    let timeout = DpsError::Timeout {
                        registration_id: request.registration_id.clone(),
                        waited: started.elapsed(),
                    };
                    (pause, timeout)
                }
                Next::Again {
                    error,
                    pause,
                    restart,
                } => {
                    if failures >= policy.attempts {
                        return Err(error);
                    }
                    tracing::warn!(
                        error = %error,
                        attempt = failures,
                        pause_ms = pause.as_millis() as u64,
                        "DPS request failed; retrying"
                    );
                    if restart {
                        operation = None;
                    }
                    (pause, error)
                }
            };
        if started.elapsed() + pause > policy.total {
            return Err(on_timeout);
        }
        tokio::time::sleep(pause).await;
    }
}
