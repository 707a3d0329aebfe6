//! `sail key`: API keys of the caller's org (admins), or of any org (operators).

use clap::Subcommand;
use proto::tenancy as pb;
use proto::tenancy::key_service_client::KeyServiceClient;

use crate::box_cmd::BoxError;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create a key; prints it once (keep it: only its hash is stored).
    Create {
        /// member (uses everything of the org) or admin (also manages keys); operators may
        /// also create operator keys.
        #[arg(long, default_value = "member")]
        role: tenancy::Role,
        /// A label shown by `sail key ls`.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List the org's keys (never their secrets).
    Ls,
    /// Revoke a key by id; it stops working at once.
    Revoke {
        /// The key's id (the 16 hex digits after `sail_`).
        id: String,
    },
    /// Show who the current key is.
    Whoami,
}

fn role_name(r: i32) -> &'static str {
    tenancy::Role::from_proto(r).map_or("?", |r| r.as_str())
}

fn info_json(k: &pb::KeyInfo) -> serde_json::Value {
    serde_json::json!({"id": k.id, "org": k.org, "role": role_name(k.role), "name": k.name, "created_unix_ms": k.created_unix_ms})
}

/// Runs a `sail key` command against `endpoint`, in `org` (empty: the key's own).
pub async fn run(endpoint: &str, org: &str, json: bool, cmd: KeyCmd) -> anyhow::Result<u8> {
    let channel = crate::box_cmd::channel(endpoint).await?;
    let key = tenancy::credentials::find_key(endpoint)?;
    let mut c = KeyServiceClient::new(tenancy::client::authed(channel, key.as_ref()));
    match cmd {
        KeyCmd::Create { role, name } => {
            let req = pb::CreateKeyRequest { org: org.to_owned(), role: role.to_proto() as i32, name };
            let resp = c.create_key(req).await.map_err(BoxError::from)?.into_inner();
            let info = resp.key.unwrap_or_default();
            if json {
                let mut v = info_json(&info);
                v["key"] = serde_json::Value::String(resp.secret);
                println!("{v}");
            } else {
                println!("{}", resp.secret);
                crate::note!(
                    "key {} ({} of org {}): shown this once; use it as SAIL_API_KEY",
                    info.id,
                    role_name(info.role),
                    info.org
                );
            }
        }
        KeyCmd::Ls => {
            let keys = c.list_keys(pb::ListKeysRequest { org: org.to_owned() }).await.map_err(BoxError::from)?.into_inner().keys;
            if json {
                println!("{}", serde_json::Value::Array(keys.iter().map(info_json).collect()));
            } else {
                println!("{:<16}  {:<8}  {:<16}  NAME", "ID", "ROLE", "ORG");
                for k in &keys {
                    println!("{:<16}  {:<8}  {:<16}  {}", k.id, role_name(k.role), k.org, k.name);
                }
            }
        }
        KeyCmd::Revoke { id } => {
            let resp = c.revoke_key(pb::RevokeKeyRequest { id, org: org.to_owned() }).await.map_err(BoxError::from)?.into_inner();
            let info = resp.key.unwrap_or_default();
            if json {
                println!("{}", info_json(&info));
            } else {
                println!("revoked {}", info.id);
            }
        }
        KeyCmd::Whoami => {
            let info = c.who_am_i(pb::WhoAmIRequest {}).await.map_err(BoxError::from)?.into_inner().key.unwrap_or_default();
            if json {
                println!("{}", info_json(&info));
            } else {
                println!("key {} ({} of org {})", info.id, role_name(info.role), info.org);
            }
        }
    }
    Ok(0)
}
