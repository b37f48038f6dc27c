//! `runyard token create|ls|revoke` (named API tokens, admins only) and `runyard whoami`.

use runyard_model::Timestamp;

use super::{CommandError, client_for};
use crate::args::{ClientArgs, TokenCommand};
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
