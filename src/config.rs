//! Node configuration: defaults < TOML file < `RAFTMQ_*` environment < flags.
//!
//! Owns the shape of the configuration file and how its layers combine; the
//! sections themselves are defined by the modules that use them
//! (`broker::BrokerConfig`, `listener::ListenerConfig`, `admin::AdminConfig`).
//! With no configuration at all the node is a working single-node broker bound
//! to localhost only, as Mosquitto 2 does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::admin::AdminConfig;
use crate::broker::BrokerConfig;
use crate::listener::{ListenerConfig, ListenerKind};

/// Environment variables with this prefix override file keys; `__` separates
/// sections: `RAFTMQ_MQTT__MAX_PACKET_SIZE=65536`.
pub const ENV_PREFIX: &str = "RAFTMQ_";

/// Variables with the prefix that belong to the CLI client, not to a node.
const ENV_NOT_CONFIG: &[&str] = &["token", "url", "log"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Rule(String),
}

/// The whole configuration of one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// This node's id in the cluster (1 for a single node).
    pub node_id: u64,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// Broker behaviour and limits.
    pub mqtt: BrokerConfig,
    /// MQTT listeners; when empty, one TCP listener on 127.0.0.1:1883.
    pub listeners: Vec<ListenerConfig>,
    /// Admin HTTP (health, metrics, REST API).
    pub admin: AdminConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            mqtt: BrokerConfig::default(),
            listeners: Vec::new(),
            admin: AdminConfig::default(),
        }
    }
}

/// Values given on the command line; each one, when set, wins over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mqtt_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

/// The address of the listener used when the configuration names none.
pub fn default_mqtt_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

impl Config {
    /// Loads the layers in order and checks the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        // Every section is `#[serde(default)]`, so an empty figment is the default configuration.
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing { path: path.to_path_buf() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_NOT_CONFIG));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn apply(&mut self, overrides: &Overrides) {
        if self.listeners.is_empty() {
            self.listeners.push(ListenerConfig::default());
        }
        if let Some(addr) = overrides.mqtt_listen {
            // The flag moves the first plain TCP listener (the common case of one listener).
            match self.listeners.iter_mut().find(|l| l.kind == ListenerKind::Tcp) {
                Some(listener) => listener.bind = addr,
                None => self.listeners.push(ListenerConfig { bind: addr, ..ListenerConfig::default() }),
            }
        }
        if let Some(addr) = overrides.admin_listen {
            self.admin.listen = addr;
        }
        if let Some(dir) = &overrides.data_dir {
            self.data_dir = dir.clone();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for listener in &self.listeners {
            if !names.insert(listener.name.as_str()) {
                return Err(ConfigError::Rule(format!("two listeners are named {:?}", listener.name)));
            }
        }
        if self.node_id == 0 {
            return Err(ConfigError::Rule("node_id must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_configuration_is_a_localhost_broker() {
        let config = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].bind, default_mqtt_listen());
        assert_eq!(config.admin.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(config.data_dir, PathBuf::from("./data"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raftmq.toml");
        std::fs::write(
            &path,
            "data_dir = \"/var/lib/x\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n[mqtt]\nmax_packet_size = 4096\n",
        )
        .unwrap();
        let overrides = Overrides {
            data_dir: Some(PathBuf::from("/tmp/y")),
            mqtt_listen: Some("127.0.0.1:1999".parse().unwrap()),
            ..Default::default()
        };
        let config = Config::load(Some(&path), &overrides).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/y"));
        assert_eq!(config.admin.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(config.listeners[0].bind, "127.0.0.1:1999".parse().unwrap());
        assert_eq!(config.mqtt.max_packet_size, 4096);
    }

    #[test]
    fn missing_file_and_bad_keys_are_clear_errors() {
        let err = Config::load(Some(Path::new("/nonexistent/raftmq.toml")), &Overrides::default());
        assert!(matches!(err, Err(ConfigError::Missing { .. })));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raftmq.toml");
        std::fs::write(&path, "[mqtt]\nmax_packet_size = \"big\"\n").unwrap();
        let err = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("max_packet_size"), "{err}");
    }
}
