//! `runyard token create|ls|revoke` (named API tokens, admins only), `runyard secret set|ls|rm`
//! (controller-side secrets) and `runyard whoami`.

use runyard_model::Timestamp;

use super::{CommandError, client_for};
use crate::args::{ClientArgs, SecretCommand, TokenCommand};
use crate::output;

/// `runyard token ...`.
pub async fn token(command: TokenCommand) -> Result<u8, CommandError> {
    match command {
        TokenCommand::Create(a) => {
            let client = client_for(&a.client)?;
            let reply = client.create_token(&a.name, a.role).await?;
            if a.client.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                // The token alone on stdout (for `$(...)`); what it is on stderr.
                eprintln!(
                    "token `{}` ({}) made; it is shown once: keep it now",
                    reply.value.view.name, reply.value.view.role
                );
                output::write_stdout(format!("{}\n", reply.value.token).as_bytes())
                    .map_err(CommandError::Stdout)?;
            }
        }
        TokenCommand::Ls(a) => {
            let client = client_for(&a)?;
            let reply = client.tokens().await?;
            if a.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                let now = Timestamp::now();
                let rows: Vec<Vec<String>> = reply
                    .value
                    .tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.role.to_string(),
                            format!("{} ago", output::age(now, t.created_at)),
                            t.created_by.clone(),
                        ]
                    })
                    .collect();
                let text = output::table(&["NAME", "ROLE", "CREATED", "BY"], &rows);
                output::write_stdout(text.as_bytes()).map_err(CommandError::Stdout)?;
            }
        }
        TokenCommand::Revoke(a) => {
            let client = client_for(&a.client)?;
            let reply = client.revoke_token(&a.name).await?;
            if a.client.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                output::write_stdout(format!("{} revoked\n", reply.value.name).as_bytes())
                    .map_err(CommandError::Stdout)?;
            }
        }
    }
    Ok(0)
}

/// `runyard whoami`.
pub async fn whoami(args: ClientArgs) -> Result<u8, CommandError> {
    let client = client_for(&args)?;
    let reply = client.whoami().await?;
    if args.json {
        output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
    } else {
        output::write_stdout(format!("{} ({})\n", reply.value.name, reply.value.role).as_bytes())
            .map_err(CommandError::Stdout)?;
    }
    Ok(0)
}

/// `runyard secret ...`.
pub async fn secret(command: SecretCommand) -> Result<u8, CommandError> {
    match command {
        SecretCommand::Set(a) => {
            let value = match &a.from_file {
                Some(path) => {
                    std::fs::read_to_string(path).map_err(|e| CommandError::ReadSpecFile {
                        path: path.clone(),
                        cause: e.to_string(),
                    })?
                }
                None => {
                    let mut v = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut v)
                        .map_err(CommandError::Stdout)?;
                    v
                }
            };
            // A trailing newline (from `echo` or a file) is not part of the secret.
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            let client = client_for(&a.client)?;
            let reply = client.set_secret(&a.name, value).await?;
            if a.client.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                output::write_stdout(format!("{} set\n", reply.value.name).as_bytes())
                    .map_err(CommandError::Stdout)?;
            }
        }
        SecretCommand::Ls(a) => {
            let client = client_for(&a)?;
            let reply = client.secrets().await?;
            if a.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                let now = Timestamp::now();
                let rows: Vec<Vec<String>> = reply
                    .value
                    .secrets
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            format!("{} ago", output::age(now, s.updated_at)),
                            s.updated_by.clone(),
                        ]
                    })
                    .collect();
                let text = output::table(&["NAME", "UPDATED", "BY"], &rows);
                output::write_stdout(text.as_bytes()).map_err(CommandError::Stdout)?;
            }
        }
        SecretCommand::Rm(a) => {
            let client = client_for(&a.client)?;
            let reply = client.remove_secret(&a.name).await?;
            if a.client.json {
                output::write_json(&reply.raw).map_err(CommandError::Stdout)?;
            } else {
                output::write_stdout(format!("{} removed\n", a.name).as_bytes())
                    .map_err(CommandError::Stdout)?;
            }
        }
    }
    Ok(0)
}
