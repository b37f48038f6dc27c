//! `runyard ls | status | logs | stop | rm | agents`: read and act on jobs through the HTTP API.
//!
//! Log following survives a broken connection: logs are append-only, so after reconnecting the
//! bytes already written are skipped and nothing is printed twice or lost. Following ends only
//! when the stream ends cleanly *and* the job is terminal (the controller makes a job's logs
//! complete before its terminal state is visible). While following on a terminal, the job is
//! also polled for its progress bar (`progress`); piped output is exactly the log.

use std::pin::pin;
use std::time::{Duration, Instant};

use futures::StreamExt;
use runyard_api::JobView;
use runyard_model::Timestamp;

use super::{CommandError, client_for};
use crate::args::{ClientArgs, JobArgs, LogsArgs, LsArgs, RmArgs};
use crate::client::{ApiClient, ClientError};
use crate::output;
use crate::progress::FollowDisplay;

/// How often a pending job is polled for its first attempt.
const PENDING_POLL: Duration = Duration::from_millis(250);
/// First wait before reconnecting a log stream; doubles up to `RECONNECT_MAX`.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Give up following when the controller stays unreachable this long.
const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// `runyard ls`.
pub async fn ls(args: LsArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    let first = client.list_jobs(args.status, args.limit, None).await?;
    if !args.all {
        if args.client.json {
            output::write_json(&first.raw).map_err(CommandError::Stdout)?;
        } else {
            let table = output::jobs_table(&first.value.jobs, Timestamp::now());
            output::write_stdout(table.as_bytes()).map_err(CommandError::Stdout)?;
            if first.value.next.is_some() {
                eprintln!("more jobs: use --all, or a larger --limit");
            }
        }
        return Ok(0);
    }
    let mut jobs = first.value.jobs;
    let mut cursor = first.value.next;
    while let Some(c) = cursor {
        let page = client.list_jobs(args.status, args.limit, Some(&c)).await?;
        jobs.extend(page.value.jobs);
        if page.value.next.as_deref() == Some(c.as_str()) {
            return Err(CommandError::CursorLoop(c));
        }
        cursor = page.value.next;
    }
    if args.client.json {
        let page = crate::client::JobPage { jobs, next: None };
        let body = serde_json::to_vec(&page).expect("a job page always serializes");
        output::write_json(&body).map_err(CommandError::Stdout)?;
    } else {
        let table = output::jobs_table(&jobs, Timestamp::now());
        output::write_stdout(table.as_bytes()).map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `runyard status ID`.
pub async fn status(args: JobArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    let reply = client.job(&args.id).await?;
    if args.client.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        let text = output::job_details(&reply.value, Timestamp::now());
        output::write_stdout(text.as_bytes()).map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `runyard attempts ID`.
pub async fn attempts(args: JobArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    let reply = client.placements(&args.id).await?;
    if args.client.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        let text = output::placements_table(&reply.value.placements, Timestamp::now());
        output::write_stdout(text.as_bytes()).map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `runyard stop ID`.
pub async fn stop(args: JobArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    let reply = client.stop(&args.id).await?;
    if args.client.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        let job = &reply.value;
        output::write_stdout(format!("{} {}\n", job.id, job.status).as_bytes())
            .map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `runyard rm ID...`: each id is reported, deleted on stdout (`ID deleted`, or the job's JSON
/// with `--json`) or failed on stderr; the exit code is 1 if any failed.
pub async fn rm(args: RmArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    let mut failed = false;
    for id in &args.ids {
        match client.delete(id).await {
            Ok(reply) if args.client.json => {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            }
            Ok(_) => {
                output::write_stdout(format!("{id} deleted\n").as_bytes())
                    .map_err(CommandError::Stdout)?;
            }
            // Nothing else can succeed: say so once, as every other command does.
            Err(e @ (ClientError::Connect { .. } | ClientError::Unauthorized { .. })) => {
                return Err(e.into());
            }
            Err(e) => {
                failed = true;
                eprintln!("error: {id}: {}", crate::client::one_line(&e.to_string()));
            }
        }
    }
    Ok(u8::from(failed))
}

/// `runyard agents`.
pub async fn agents(args: ClientArgs) -> Result<u8, CommandError> {
    let client = client_for(&args)?;
    let reply = client.agents().await?;
    if args.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        let table = output::agents_table(&reply.value, Timestamp::now());
        output::write_stdout(table.as_bytes()).map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `runyard logs ID [-f]`: the body bytes go to stdout as they arrive.
pub async fn logs(args: LogsArgs) -> Result<u8, CommandError> {
    let client = client_for(&args.client)?;
    if args.follow {
        follow_logs(&client, &args.id).await?;
        return Ok(0);
    }
    let mut stream = pin!(client.logs(&args.id, false, None).await?);
    while let Some(chunk) = stream.next().await {
        output::write_stdout(&chunk?).map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// Streams the job's logs to stdout until the job is terminal; returns the terminal job.
///
/// Follows one attempt at a time by attempt number and byte offset, so a reconnect (controller
/// restart, network cut) resumes exactly where it broke: no line lost, none printed twice. When
/// the job moves on to a new attempt (its agent was lost, or a retry), a note goes to stderr and
/// the new attempt's log follows. On a terminal, a progress bar stays below the log while the
/// job reports progress; it is gone from the screen when this returns (also after Ctrl-C).
pub async fn follow_logs(client: &ApiClient, id: &str) -> Result<JobView, CommandError> {
    let display = FollowDisplay::start(client, id);
    let result = if display.has_bar() {
        // Ctrl-C would leave the bar on the screen: take it away first.
        tokio::select! {
            result = follow(client, id, &display) => result,
            _ = tokio::signal::ctrl_c() => Err(CommandError::Interrupted),
        }
    } else {
        follow(client, id, &display).await
    };
    display.finish().await;
    result
}

async fn follow(
    client: &ApiClient,
    id: &str,
    display: &FollowDisplay,
) -> Result<JobView, CommandError> {
    let mut backoff = RECONNECT_MIN;
    let mut last_contact = Instant::now();
    let mut ever_connected = false;
    // (attempt, bytes of its log already printed); None until the job has an attempt.
    let mut pos: Option<(u32, u64)> = None;
    loop {
        let step = match pos {
            None => match client.job(id).await {
                Ok(reply) if reply.value.attempt > 0 => {
                    pos = Some((reply.value.attempt, 0));
                    ever_connected = true;
                    continue;
                }
                Ok(reply) if reply.value.status.is_terminal() => return Ok(reply.value),
                Ok(_) => {
                    ever_connected = true;
                    last_contact = Instant::now();
                    tokio::time::sleep(PENDING_POLL).await;
                    continue;
                }
                Err(e) if is_transient(&e) => Err(FollowError::Transient {
                    cause: e,
                    progressed: false,
                }),
                Err(e) => return Err(e.into()),
            },
            Some((attempt, ref mut offset)) => {
                follow_once(client, id, attempt, offset, display).await
            }
        };
        match step {
            Ok(()) => {
                last_contact = Instant::now();
                ever_connected = true;
                // The attempt's stream ended cleanly: done if the job is, else move on.
                match client.job(id).await {
                    Ok(reply) => {
                        let job = reply.value;
                        let current = pos.map_or(0, |p| p.0);
                        if job.attempt > current {
                            display.note(&format!(
                                "── attempt {} of job {id} ({}) ──",
                                job.attempt,
                                job.reason.as_deref().unwrap_or("placed again")
                            ));
                            pos = Some((job.attempt, 0));
                            continue;
                        }
                        if job.status.is_terminal() {
                            return Ok(job);
                        }
                        backoff = RECONNECT_MIN;
                    }
                    Err(e) if is_transient(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(FollowError::Fatal(e)) => return Err(e),
            Err(FollowError::Transient { cause, progressed }) => {
                if progressed {
                    last_contact = Instant::now();
                    backoff = RECONNECT_MIN;
                    ever_connected = true;
                }
                if !ever_connected && matches!(cause, ClientError::Connect { .. }) {
                    // Nothing listens there: say so now rather than retry against nothing.
                    return Err(cause.into());
                }
                if last_contact.elapsed() > RECONNECT_WINDOW {
                    return Err(CommandError::LogStream {
                        id: id.to_string(),
                        cause: cause.to_string(),
                    });
                }
                tracing::debug!(job = %id, error = %cause, "log stream broke; reconnecting");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

enum FollowError {
    /// Worth reconnecting; `progressed` if the connection was made before it broke.
    Transient {
        cause: ClientError,
        progressed: bool,
    },
    Fatal(CommandError),
}

/// One `?follow=true` request for one attempt from byte `offset`; advances `offset`.
async fn follow_once(
    client: &ApiClient,
    id: &str,
    attempt: u32,
    offset: &mut u64,
    display: &FollowDisplay,
) -> Result<(), FollowError> {
    let stream = client
        .logs(id, true, Some((attempt, *offset)))
        .await
        .map_err(|e| {
            if is_transient(&e) {
                FollowError::Transient {
                    cause: e,
                    progressed: false,
                }
            } else {
                FollowError::Fatal(e.into())
            }
        })?;
    let mut stream = pin!(stream);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|cause| FollowError::Transient {
            cause,
            progressed: true,
        })?;
        display
            .log(&chunk)
            .map_err(|e| FollowError::Fatal(CommandError::Stdout(e)))?;
        *offset += chunk.len() as u64;
    }
    Ok(())
}

/// Transport trouble and server-side (5xx) errors may pass; refusals (4xx) will not.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Request { .. } | ClientError::Body { .. } => {
            true
        }
        ClientError::Api { status, .. } => *status >= 500,
        _ => false,
    }
}
