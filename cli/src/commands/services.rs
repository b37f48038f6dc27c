//! `runyard serve`, `runyard services` and `runyard service status|logs|scale|stop|rm`.

use std::fmt::Write as _;
use std::pin::pin;

use futures::StreamExt;
use runyard_api::{ReplicaView, ScaleRequest, ServiceView};
use runyard_model::ServiceSpec;
use serde_json::{Map, Value};

use super::{CommandError, client_for, jobs};
use crate::args::{ClientArgs, ServeArgs, ServiceCommand};
use crate::output;

/// Sends the service; prints its name and URL (or the view with `--json`).
pub async fn serve(args: ServeArgs) -> Result<u8, CommandError> {
    if args.job.follow {
        return Err(CommandError::Spec(runyard_model::ValidationError::new(
            "follow",
            "does not apply to a service: see `runyard service status NAME` and `runyard service logs NAME -f`",
        )));
    }
    let mut fields = super::submit::spec_fields(&args.job)?;
    lay_service_flags(&mut fields, &args);
    // The same check as the controller's, before anything is sent.
    let spec = ServiceSpec::from_value(Value::Object(fields.clone()))
        .map_err(|e| CommandError::Spec(super::submit::with_flag_hint(e)))?;
    let client = client_for(&args.job.client)?;
    let reply = client.serve(&Value::Object(fields)).await?;
    if args.job.client.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        let s = reply.value;
        let url = format!(
            "{}{}",
            args.job.client.controller.trim_end_matches('/'),
            s.url
        );
        output::write_stdout(
            format!("{} {} (generation {})\n", spec.name, url, s.generation).as_bytes(),
        )
        .map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// The object at `key` (made, or replacing what is not an object).
fn object<'a>(fields: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = fields
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().expect("made an object above")
}

fn lay_service_flags(fields: &mut Map<String, Value>, args: &ServeArgs) {
    if let Some(n) = args.min {
        object(fields, "replicas").insert("min".into(), n.into());
    }
    if let Some(n) = args.max {
        object(fields, "replicas").insert("max".into(), n.into());
    }
    if let Some(n) = args.batch_size {
        object(fields, "batching").insert("max_batch_size".into(), n.into());
    }
    if let Some(t) = &args.batch_timeout {
        object(fields, "batching").insert("timeout".into(), t.clone().into());
    }
    if let Some(h) = &args.health {
        fields.insert("health".into(), h.clone().into());
    }
    if args.public {
        fields.insert("public".into(), true.into());
    }
}

/// `runyard services`.
pub async fn list(args: ClientArgs) -> Result<u8, CommandError> {
    let client = client_for(&args)?;
    let reply = client.services().await?;
    if args.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
        return Ok(0);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<9} {:>7} {:>7} {:>9} {:>9}  URL",
        "NAME", "STATUS", "READY", "TARGET", "REQ/S", "P50 MS"
    );
    for s in &reply.value.services {
        let ready = s.replicas.iter().filter(|r| r.ready && !r.draining).count();
        let _ = writeln!(
            out,
            "{:<24} {:<9} {:>7} {:>7} {:>9.1} {:>9}  {}",
            s.name,
            s.status,
            ready,
            format!("{}/{}", s.target, s.max),
            s.traffic.rate,
            s.traffic.p50_ms.map_or("-".into(), |p| format!("{p:.2}")),
            s.url
        );
    }
    output::write_stdout(out.as_bytes()).map_err(CommandError::Stdout)?;
    Ok(0)
}

pub async fn service(c: ServiceCommand) -> Result<u8, CommandError> {
    match c {
        ServiceCommand::Status(a) => {
            let client = client_for(&a.client)?;
            let reply = client.service(&a.name).await?;
            if a.client.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                output::write_stdout(describe(&reply.value).as_bytes())
                    .map_err(CommandError::Stdout)?;
            }
            Ok(0)
        }
        ServiceCommand::Scale(a) => {
            let client = client_for(&a.client)?;
            let req = ScaleRequest {
                min: a.min,
                max: a.max,
            };
            let reply = client.scale_service(&a.name, &req).await?;
            short(&a.client, &reply.raw, &reply.value)
        }
        ServiceCommand::Stop(a) => {
            let client = client_for(&a.client)?;
            let reply = client.stop_service(&a.name).await?;
            short(&a.client, &reply.raw, &reply.value)
        }
        ServiceCommand::Rm(a) => {
            let client = client_for(&a.client)?;
            client.remove_service(&a.name).await?;
            if a.client.json {
                output::write_stdout(
                    format!("{}\n", serde_json::json!({"removed": a.name})).as_bytes(),
                )
                .map_err(CommandError::Stdout)?;
            }
            Ok(0)
        }
        ServiceCommand::Logs(a) => {
            let client = client_for(&a.client)?;
            let s = client.service(&a.name).await?.value;
            let replica = match a.replica {
                Some(n) => s
                    .replicas
                    .iter()
                    .chain(s.ended.iter())
                    .find(|r| r.index == n)
                    .ok_or_else(|| {
                        CommandError::Spec(runyard_model::ValidationError::new(
                            "replica",
                            format!(
                                "service `{}` has no replica {n} (see `runyard service status {}`)",
                                a.name, a.name
                            ),
                        ))
                    })?,
                None => s.replicas.last().or(s.ended.last()).ok_or_else(|| {
                    CommandError::Spec(runyard_model::ValidationError::new(
                        "replica",
                        format!("service `{}` has no replica yet", a.name),
                    ))
                })?,
            };
            if a.follow {
                jobs::follow_logs(&client, &replica.job).await?;
                return Ok(0);
            }
            let mut stream = pin!(client.logs(&replica.job, false, None).await?);
            while let Some(chunk) = stream.next().await {
                output::write_stdout(&chunk?).map_err(CommandError::Stdout)?;
            }
            Ok(0)
        }
    }
}

fn short(client: &ClientArgs, raw: &[u8], s: &ServiceView) -> Result<u8, CommandError> {
    if client.json {
        output::write_json(raw).map_err(CommandError::Stdout)?;
    } else {
        output::write_stdout(
            format!(
                "{}: {} (target {}, replicas [{}, {}])\n",
                s.name, s.status, s.target, s.min, s.max
            )
            .as_bytes(),
        )
        .map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `service status` in words.
pub fn describe(s: &ServiceView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "service   {} ({})", s.name, s.status);
    let _ = writeln!(out, "url       {}", s.url);
    let _ = writeln!(
        out,
        "replicas  target {} in [{}, {}], generation {}{}",
        s.target,
        s.min,
        s.max,
        s.generation,
        if s.public { ", public" } else { "" }
    );
    let t = &s.traffic;
    let _ = writeln!(
        out,
        "traffic   {:.1} req/s, p50 {}, p99 {}, pending {} ({} queued), {} served, {} failed{}",
        t.rate,
        t.p50_ms.map_or("-".into(), |p| format!("{p:.2} ms")),
        t.p99_ms.map_or("-".into(), |p| format!("{p:.2} ms")),
        t.pending,
        t.queued,
        t.total,
        t.failed,
        t.mean_batch
            .map_or(String::new(), |b| format!(", mean batch {b:.1}"))
    );
    if let Some(d) = &s.decision {
        let _ = writeln!(
            out,
            "scaled    {} → {} at {}: {}",
            d.from, d.to, d.at, d.why
        );
    }
    if let Some(e) = &s.policy_error {
        let _ = writeln!(out, "policy    {e} (the default policy applies)");
    }
    if let Some(r) = &s.reason {
        let _ = writeln!(out, "reason    {r}");
    }
    let _ = writeln!(
        out,
        "\n{:>4} {:<26} {:<10} {:<16} {:<7} {:>9} {:>8}  PATH",
        "#", "JOB", "STATUS", "AGENT", "STATE", "IN FLIGHT", "SERVED"
    );
    for r in &s.replicas {
        let _ = writeln!(out, "{}", replica_row(r));
    }
    out
}

fn replica_row(r: &ReplicaView) -> String {
    let state = if r.draining {
        "draining"
    } else if r.unhealthy {
        "unhealthy"
    } else if r.ready {
        "ready"
    } else {
        "starting"
    };
    format!(
        "{:>4} {:<26} {:<10} {:<16} {:<7} {:>9} {:>8}  {}",
        r.index,
        r.job,
        r.status.map_or("creating".into(), |s| s.to_string()),
        r.agent.as_deref().unwrap_or("-"),
        state,
        r.in_flight,
        r.served,
        r.path.as_deref().unwrap_or("-")
    )
}
