//! `raftmq ctl dynsec ...`: bootstrap and migration of dynamic security
//! (`init`, `import`, `export`). Everything else is administered with
//! Mosquitto's own `mosquitto_ctrl dynsec ...` over MQTT.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;

use super::{json_body, Api, CtlError, TIMEOUT};
use crate::admin::dynsec::{DynsecSetAnswer, InitRequest};

/// Environment variable holding the first admin's password for `init`.
pub const PASSWORD_ENV: &str = "RAFTMQ_DYNSEC_PASSWORD";

#[derive(Subcommand, Debug)]
pub enum DynsecCommand {
    /// Creates the first admin (role `admin`, as `mosquitto_ctrl dynsec init`
    /// does) and turns dynamic security on for the whole cluster. The
    /// password comes from --password-stdin, else RAFTMQ_DYNSEC_PASSWORD,
    /// else a prompt when a terminal is attached.
    Init {
        /// User name of the admin.
        #[arg(long, value_name = "USER")]
        admin: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Replaces the dynamic-security state with a Mosquitto
    /// dynamic-security.json (users keep their passwords).
    Import { file: PathBuf },
    /// Writes the dynamic-security state as a Mosquitto dynamic-security.json
    /// (to standard output, or to FILE with -o).
    Export {
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

fn local(message: impl Into<String>) -> CtlError {
    CtlError::Local(message.into())
}

/// The admin password for `init`, from the first source that has one.
fn read_password(from_stdin: bool) -> Result<String, CtlError> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| local(format!("cannot read the password from standard input: {e}")))?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err(local(format!(
            "no password given: use --password-stdin, set {PASSWORD_ENV}, or run in a terminal"
        )));
    }
    let first = rpassword::prompt_password("Password for the dynamic-security admin: ")
        .map_err(|e| local(format!("cannot read the password: {e}")))?;
    let second = rpassword::prompt_password("Repeat the password: ")
        .map_err(|e| local(format!("cannot read the password: {e}")))?;
    if first != second {
        return Err(local("the passwords do not match"));
    }
    Ok(first)
}

pub(super) async fn execute(api: &Api, cmd: &DynsecCommand, json: bool) -> Result<String, CtlError> {
    let raw = |b: bytes::Bytes| format!("{}\n", String::from_utf8_lossy(&b));
    match cmd {
        DynsecCommand::Init { admin, password_stdin } => {
            let password = read_password(*password_stdin)?;
            if password.is_empty() {
                return Err(local("the password must not be empty"));
            }
            let req = InitRequest { username: admin.clone(), password };
            let (_, body): (DynsecSetAnswer, _) =
                api.call(Method::POST, "/dynsec/init", json_body(&req), TIMEOUT).await?;
            Ok(if json {
                raw(body)
            } else {
                format!("dynamic security initialised: admin user {admin:?} with role \"admin\"\n")
            })
        }
        DynsecCommand::Import { file } => {
            let content = std::fs::read_to_string(file)
                .map_err(|e| local(format!("cannot read {}: {e}", file.display())))?;
            let (answer, body): (DynsecSetAnswer, _) =
                api.call(Method::PUT, "/dynsec", Some(content), TIMEOUT).await?;
            Ok(if json {
                raw(body)
            } else if answer.was_initialised {
                format!("dynamic security replaced by {}\n", file.display())
            } else {
                format!("dynamic security initialised from {}\n", file.display())
            })
        }
        DynsecCommand::Export { output } => {
            let (_, body): (serde_json::Value, _) = api.call(Method::GET, "/dynsec", None, TIMEOUT).await?;
            match output {
                Some(path) => {
                    std::fs::write(path, &body)
                        .map_err(|e| local(format!("cannot write {}: {e}", path.display())))?;
                    Ok(format!("dynamic security written to {}\n", path.display()))
                }
                None => Ok(raw(body)),
            }
        }
    }
}
